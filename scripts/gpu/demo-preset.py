#!/usr/bin/env python3
"""`lightrft-demo --preset gpu` on one GPU, within a time budget: metrics.jsonl, the reward curve and
the log go to --out, then a short table and a check that the reward rose.

On the GPU machine (PYTHONPATH: the workspace wheels, the demo's rich + matplotlib, and vLLM or
SGLang; this tree's examples/src is put in front so the demo code is this checkout's):

    python3 scripts/gpu/demo-preset.py --engine vllm   --out "$OUT/demo-vllm"   --budget-s 300
    python3 scripts/gpu/demo-preset.py --engine sglang --out "$OUT/demo-sglang" --budget-s 300

Dry run here (CPU, FSDP on one gloo rank, HF engine, the preset shrunk to a few seconds a step):

    uv run --package lightrft-demo python scripts/gpu/demo-preset.py --device cpu --out /tmp/demo-cpu --budget-s 120

The demo gets `--time-budget-s` = budget - RESERVE_S (what start-up before the loop, the final
checkpoint, save_model, the plot and engine shutdown take), and is killed at budget - 5 s if it
overruns; the table is written from whatever metrics.jsonl holds. Exit 0 when the run finished and
the reward rose (mean of the last 10 steps above the first 10 by MIN_RISE), 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
#: Seconds of the budget the training loop leaves for what comes before and after it: imports and
#: engine start (vLLM ~25 s, SGLang 45-100 s), then the last checkpoint, save_model, plot, shutdown.
RESERVE_S = {"vllm": 60.0, "sglang": 120.0, "hf": 20.0}
#: The check: the last 10 steps' mean reward exceeds the first 10 steps' by this much. Chance is
#: 1/32 per token. GPU: 0.3 is far above what sampling noise moves a 10-step mean of 256 sequences
#: x 16 tokens (standard deviation at chance below 0.002) and below what a run that learns reaches.
#: CPU dry run (32 sequences x 8 tokens, 40 steps): the shrunk policy rose ~0.1 in 30 steps; a
#: 10-step mean at chance has a standard deviation of 0.0035, so 0.05 is 14 of those.
MIN_RISE = {"cuda": 0.3, "cpu": 0.05}
#: The CPU dry run: the preset with a policy and batch small enough for a loaded 2-core machine.
CPU_OVERRIDES = [
    "--engine", "hf", "--no-bf16", "--hidden-size", "32", "--num-layers", "1",
    "--prompts-per-rank", "4", "--group-size", "8", "--new-tokens", "8",
    "--micro_train_batch_size", "16", "--actor_learning_rate", "2e-2", "--iterations", "40",
]  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", choices=["vllm", "sglang"], default="vllm")
    p.add_argument(
        "--out", required=True, type=Path, help="metrics.jsonl, reward_curve.png, demo.log, result.json"
    )
    p.add_argument("--budget-s", type=float, default=300.0, help="wall-clock budget of the whole script")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: the dry run (HF engine)")
    p.add_argument("extra", nargs="*", help="more demo options after --, e.g. -- --actor_learning_rate 1e-4")
    a = p.parse_args()
    t0 = time.monotonic()
    engine = "hf" if a.device == "cpu" else a.engine
    if a.budget_s <= RESERVE_S[engine] + 10:
        p.error(
            f"--budget-s {a.budget_s:g} is too small: the {engine} run needs more than {RESERVE_S[engine] + 10:g} s"
        )
    missing = [
        m for m in ("torch", "transformers", "rich", "matplotlib", "yaml", "lightrft.fsdp") if not _has(m)
    ]
    if engine != "hf" and not _has(engine):
        missing.append(engine)
    if missing:
        print(f"demo-preset: missing on the path: {', '.join(missing)} (scripts/gpu-prepare carries the "
              "demo's rich + matplotlib in .whl/demo; add the engine's site to PYTHONPATH)", file=sys.stderr)  # fmt: skip
        return 2

    a.out.mkdir(parents=True, exist_ok=True)
    run_dir = a.out / "run"
    loop_budget = a.budget_s - RESERVE_S[engine]
    argv = [
        "--preset",
        "gpu",
        "--output-dir",
        str(run_dir),
        "--overwrite",
        "--time-budget-s",
        f"{loop_budget:g}",
    ]
    argv += CPU_OVERRIDES if a.device == "cpu" else ["--engine", engine]
    argv += a.extra
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT / "examples" / "src"), *filter(None, [env.get("PYTHONPATH")])]
    )
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LIGHTRFT_DEMO_ARGV"):
        env.pop(name, None)
    if a.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    cmd = [sys.executable, "-m", "lightrft_demo", *argv]
    log_path = a.out / "demo.log"
    print("demo-preset:", " ".join(cmd[1:]), flush=True)
    rc, killed = _run(cmd, env, log_path, deadline=t0 + a.budget_s - 5)
    wall = time.monotonic() - t0

    records = _read_metrics(run_dir / "metrics.jsonl")
    curve = run_dir / "reward_curve.png"
    if records and not curve.is_file():  # killed before the demo drew it
        sys.path.insert(0, str(ROOT / "examples" / "src"))
        from lightrft_demo.metrics import plot_reward_curve

        plot_reward_curve(
            records, curve, title=f"lightrft-demo --preset gpu, engine {engine} (killed at the budget)"
        )
    for name in ("metrics.jsonl", "reward_curve.png", "config.yaml"):
        if (run_dir / name).is_file():
            (a.out / name).write_bytes((run_dir / name).read_bytes())

    result = _summary(records, engine=engine, device=a.device, rc=rc, killed=killed, wall=wall, argv=argv)
    (a.out / "result.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    _print_table(result)
    return 0 if result["ok"] else 1


def _has(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def _run(cmd: list[str], env: dict[str, str], log_path: Path, deadline: float) -> tuple[int, bool]:
    """Runs ``cmd`` with its output in ``log_path`` and on this terminal; kills its process group at
    ``deadline`` (SGLang's schedulers and vLLM's workers go with it)."""
    with log_path.open("w", encoding="utf-8") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True, cwd=ROOT)  # fmt: skip

        def copy() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                log.write(line)
                log.flush()
                sys.stdout.write(line)
                sys.stdout.flush()

        reader = threading.Thread(target=copy, daemon=True)
        reader.start()
        killed = False
        try:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            print(f"\ndemo-preset: budget reached, killing the demo (pid {proc.pid})", flush=True)
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
            killed = True
        rc = proc.wait()
        reader.join(timeout=10)
    return rc, killed


def _read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line torn by a kill
            break
    return out


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def _summary(records: list[dict], **run: object) -> dict:
    rewards = [r["reward"] for r in records]
    window = 10
    moving = [_mean(rewards[max(0, i - window + 1) : i + 1]) for i in range(len(rewards))]

    def first_step_at(level: float) -> int | None:
        return next((records[i]["step"] for i, m in enumerate(moving) if m >= level), None)

    first, last = _mean(rewards[:window]), _mean(rewards[-window:])
    finished = run["rc"] == 0 and not run["killed"]
    min_rise = MIN_RISE[str(run["device"])]
    rose = len(rewards) >= 2 * window and last - first >= min_rise
    steady = records[2:] if len(records) > 3 else records  # the first steps include compilation
    return {
        **run,
        "steps": len(records),
        "reward_first10": first,
        "reward_last10": last,
        "first_step_moving10_at_0.5": first_step_at(0.5),
        "first_step_moving10_at_0.9": first_step_at(0.9),
        "loop_s": (records[-1]["time"] - records[0]["time"] + records[0]["iter_s"]) if records else 0.0,
        "iter_s_mean": _mean([r["iter_s"] for r in steady]),
        "gen_s_mean": _mean([r["gen_s"] for r in steady]),
        "train_s_mean": _mean([r["train_s"] for r in steady]),
        "sync_ms_mean": 1000 * _mean([r["sync_s"] for r in steady]),
        "tokens_per_s_mean": _mean([r["tokens_per_s"] for r in steady]),
        "rewards": rewards,
        "checks": {"finished (exit 0, not killed)": finished, f"reward rose by >= {min_rise}": rose},
        "ok": finished and rose,
    }


def _print_table(r: dict) -> None:
    def f(x: object, spec: str = ".3f") -> str:
        return "-" if x is None else format(x, spec) if isinstance(x, float) else str(x)

    rows = [
        ("engine / device", f"{r['engine']} / {r['device']}"),
        ("exit code", f"{r['rc']}{' (killed at the budget)' if r['killed'] else ''}"),
        ("wall time", f"{r['wall']:.0f} s (training loop {r['loop_s']:.0f} s)"),
        ("steps", str(r["steps"])),
        ("reward: first 10 -> last 10 steps", f"{f(r['reward_first10'])} -> {f(r['reward_last10'])}"),
        ("first step where the 10-step mean >= 0.5 / 0.9", f"{f(r['first_step_moving10_at_0.5'])} / {f(r['first_step_moving10_at_0.9'])}"),
        ("per step: all / generate / train", f"{r['iter_s_mean']:.2f} / {r['gen_s_mean']:.2f} / {r['train_s_mean']:.2f} s"),
        ("weight sync per step", f"{r['sync_ms_mean']:.1f} ms"),
        ("generation", f"{r['tokens_per_s_mean']:.0f} tokens/s"),
    ]  # fmt: skip
    rows += [(f"check: {name}", "ok" if passed else "FAILED") for name, passed in r["checks"].items()]
    width = max(len(k) for k, _ in rows)
    print("\n" + "\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    print("demo-preset:", "all checks passed" if r["ok"] else "a check FAILED")


if __name__ == "__main__":
    sys.exit(main())
