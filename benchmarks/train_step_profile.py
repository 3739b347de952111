"""Where the RL soak's train step spends its time: on the host or on the device (issue 17).

The soak's iteration time follows the host's speed (docs/benchmarks.md: a pure-Python reference
on the H200's host varied 2x between iterations, and the train step, 70-85 % of an iteration,
varied with it). This runs ``rl_soak.train_step`` alone, the same shapes, the same strategy
settings, no engine, and reports for each step (``python benchmarks/train_step_profile.py
--strategy fsdp --model 3.5b``):

- ``wall_s``: the step from a device sync to a device sync (what the soak's ``train_s`` times);
- ``cpu_s``: CPU seconds of this process's threads in it (a host that waits spinning on the
  device counts here too, so this alone cannot tell who sets the pace);
- ``enqueue_s``: from the start until the host returned from the last call, before the final
  sync: near ``wall_s`` when the host is behind or waits inside the step, far below it when
  the device runs behind the host;
- then one step under ``torch.profiler``: ``device_busy_s``, the union of the device's kernel,
  copy and fill intervals (``_soak.busy_time``: what the device had to do, the floor of this step
  as written), so ``1 - device_busy_s / wall_s`` is the share of the step the device sat idle
  waiting for the host; the kernels launched; the runtime's sync and copy calls (a sync waits
  for the device, and so does a copy to the host) with their count and time; the host time of each part of ``train_step`` (``fwd``,
  ``loss``, ``bwd``, ``step``); the operators with the most host time of their own.

Table on stdout and ``--out``/profile.json. ``--micro-train-batch`` changes how many micro-steps
the one optimizer step accumulates over (the kernels' count falls with it, the device's work
does not); ``--set FIELD=VALUE`` changes a StrategyConfig field (another setting, same run
shape). CPU dry run: ``--device cpu --model tiny --steps 2`` (no device figures there).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _soak  # noqa: E402
import rl_soak  # noqa: E402

#: Runtime calls that can make the host wait for the device (a sync; a copy, when it is to the host).
BLOCKING_CALLS = (
    "cudaStreamSynchronize",
    "cudaDeviceSynchronize",
    "cudaEventSynchronize",
    "cudaMemcpy",
    "cudaMemcpyAsync",
    "cudaStreamWaitEvent",
)
#: Runtime calls that launch work on the device.
LAUNCH_CALLS = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx")
PARTS = ("fwd", "loss", "bwd", "step")
TOP_OPS = 15


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--strategy",
        choices=["fsdp", "deepspeed", "raw"],
        default="fsdp",
        help="raw: the bare model in bf16 with torch's fused AdamW, no strategy (the model's own host work)",
    )
    ap.add_argument("--model", choices=sorted(rl_soak.MODELS), default="3.5b")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument(
        "--new-tokens", type=int, default=64, help="completion length (the soak's --max-new-tokens)"
    )
    ap.add_argument("--micro-train-batch", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=2, help="steps before the timed ones")
    ap.add_argument("--steps", type=int, default=5, help="timed steps")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="a StrategyConfig field over the soak's settings (JSON value: fsdp_reshard_after_forward=false)",
    )
    ap.add_argument("--out", default="/tmp/train_step_profile")
    a = ap.parse_args(argv)
    rl_soak.check_batch_args(ap, a, ("new_tokens", "steps"))
    if a.warmup < 0:
        ap.error(f"--warmup={a.warmup} is invalid: give 0 or more")
    a.overrides = {}
    from lightrft.config import StrategyConfig

    for item in a.set:
        field, sep, value = item.partition("=")
        if not sep or not field:
            ap.error(f"--set {item!r} is invalid: give FIELD=VALUE, e.g. fsdp_reshard_after_forward=false")
        if field not in StrategyConfig.model_fields:  # StrategyConfig would keep it, configuring nothing
            ap.error(f"--set {item!r} is invalid: {field} is not a StrategyConfig field")
        try:
            a.overrides[field] = json.loads(value)
        except json.JSONDecodeError:
            a.overrides[field] = value  # a bare string
    return a


def synthetic_batch(
    a: argparse.Namespace, vocab: int
) -> tuple[list[tuple[list[int], int, list[float]]], list[float]]:
    """The soak's batch shape with random tokens: sequences of ``prompt_len + new_tokens``, engine
    log-probs near what a random model gives (about -log(vocab)), group-normalized advantages."""
    import math
    import random

    rng = random.Random(3)
    n = a.prompts * a.samples
    base = -math.log(vocab)
    batch = [
        (
            [rng.randrange(10, vocab) for _ in range(a.prompt_len + a.new_tokens)],
            a.prompt_len,
            [base + rng.uniform(-0.5, 0.5) for _ in range(a.new_tokens)],
        )
        for _ in range(n)
    ]
    rewards = [rng.random() for _ in range(n)]
    return batch, rl_soak.advantages(rewards, a.samples)


def profile_summary(prof: Any, wall_s: float, cuda: bool) -> dict[str, Any]:
    """The profiled step's figures (see the module docstring) from a finished ``torch.profiler``."""
    from torch.autograd import DeviceType

    intervals, kernels = [], 0
    for e in prof.profiler.kineto_results.events():
        if e.device_type() == DeviceType.CUDA:
            intervals.append((e.start_ns() / 1e9, (e.start_ns() + e.duration_ns()) / 1e9))
            kernels += 1
    by_key = {k.key: k for k in prof.key_averages()}
    # Runtime calls by prefix: CUDA 12+ may name them with a version (cudaLaunchKernelExC_v11060).
    blocking = {
        key: {"count": k.count, "s": k.cpu_time_total / 1e6}
        for key, k in by_key.items()
        if any(key == n or key.startswith(n + "_v") for n in BLOCKING_CALLS)
    }
    launches = sum(k.count for key, k in by_key.items() if key.startswith(LAUNCH_CALLS))
    parts = {p: by_key[p].cpu_time_total / 1e6 for p in PARTS if p in by_key}
    ops = sorted(
        (k for k in by_key.values() if k.key not in PARTS and not k.key.startswith("cuda")),
        key=lambda k: -k.self_cpu_time_total,
    )[:TOP_OPS]
    busy = _soak.busy_time(intervals) if cuda else None
    return {
        "wall_s": wall_s,
        "device_busy_s": busy,
        "device_idle_share": None if busy is None or wall_s <= 0 else max(0.0, 1 - busy / wall_s),
        "device_events": kernels,
        "launches": launches,
        "blocking_calls": blocking,
        "parts_host_s": parts,
        "top_ops": [{"op": k.key, "count": k.count, "self_cpu_s": k.self_cpu_time_total / 1e6} for k in ops],
    }


class RawLoop:
    """``--strategy raw``: what ``train_step`` calls on a strategy, done the plain way: backward,
    and every ``accumulation`` micro-steps the gradient clipped to norm 1 and the step taken."""

    def __init__(self, accumulation: int) -> None:
        self.accumulation, self.micro = accumulation, 0

    def backward(self, loss: Any, model: Any, optimizer: Any) -> None:
        loss.backward()

    def optimizer_step(self, optimizer: Any, model: Any, scheduler: Any) -> None:
        import torch

        self.micro += 1
        if self.micro % self.accumulation == 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    if a.device == "cpu":
        # One thread: on a GPU machine the host issues the step's operators from one thread too.
        torch.set_num_threads(1)
    from lightrft.strategy import get_strategy

    cuda = a.device == "cuda"
    n_seq = a.prompts * a.samples
    # The soak's training settings (rl_soak.main), without the engine's.
    backend = "fsdp" if a.strategy == "raw" else a.strategy
    strategy = get_strategy({**rl_soak.training_config(backend, n_seq, a.micro_train_batch), **a.overrides})
    t0 = time.perf_counter()
    if a.strategy == "raw":  # no wrapper, no master weights: backward and step as plain torch
        actor = rl_soak.build_model(a.model, a.device, torch.bfloat16)
        optim = torch.optim.AdamW(actor.parameters(), lr=1e-5, fused=cuda)
        train_as: Any = RawLoop(n_seq // a.micro_train_batch)
    else:
        actor, optim = rl_soak.build_trained(strategy, a.strategy, a.model, a.device, 1e-5)
        train_as = strategy
    n_params = sum(p.numel() for p in actor.parameters())
    build_s = time.perf_counter() - t0
    batch, adv = synthetic_batch(a, rl_soak.VOCAB[a.model])

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def one_step(mark: Any = None) -> dict[str, float]:
        sync()
        t, c = time.perf_counter(), time.process_time()
        kw = {"mark": mark} if mark else {}
        loss, mad_sum, mad_n = rl_soak.train_step(
            train_as, actor, optim, batch, adv, a.micro_train_batch, **kw
        )
        enq = time.perf_counter() - t
        sync()
        wall = time.perf_counter() - t
        return {
            "wall_s": wall,
            "enqueue_s": enq,
            "cpu_s": time.process_time() - c,
            "loss": float(loss.detach()),
            "lp_mad": float(mad_sum) / max(1, mad_n),
        }

    steps = [one_step() for _ in range(a.warmup + a.steps)][a.warmup :]
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        profiled = one_step(mark=record_function)
    # One more step under cProfile: the Python functions with the most time of their own (the hooks
    # of FSDP2 and DeepSpeed are Python, invisible to the operator table). cProfile slows Python
    # calls, so read the ranking, not the seconds.
    import cProfile
    import pstats

    py_prof = cProfile.Profile()
    py_prof.enable()
    py_wall = one_step()["wall_s"]
    py_prof.disable()
    py_prof.dump_stats(str(out / "python.pstats"))  # for pstats' print_callers later
    stats = pstats.Stats(py_prof)
    py_top = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:TOP_OPS]  # (file, line, name): tottime
    python_top = [
        {"function": f"{Path(f).name}:{line} {name}", "calls": v[1], "own_s": v[2], "cum_s": v[3]}
        for (f, line, name), v in py_top
    ]
    result = {
        "args": vars(a),
        "params_b": n_params / 1e9,
        "build_s": build_s,
        "steps": steps,
        "medians": {k: statistics.median(s[k] for s in steps) for k in ("wall_s", "enqueue_s", "cpu_s")},
        "host_ref_s": [_soak.host_reference()[1] for _ in range(5)],
        "profiled": profile_summary(prof, profiled["wall_s"], cuda),
        "python_profiled": {"wall_s": py_wall, "top": python_top},
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "versions": {"torch": torch.__version__},
    }
    with open(out / "profile.json", "w") as f:
        json.dump(result, f, indent=2)
    print(format_table(result))
    strategy.shutdown()
    return 0


def format_table(r: dict[str, Any]) -> str:
    m, p = r["medians"], r["profiled"]
    a = r["args"]
    lines = [
        f"{a['strategy']} {r['params_b']:.2f}B, {a['prompts'] * a['samples']} sequences of "
        f"{a['prompt_len']}+{a['new_tokens']} tokens, micro-batch {a['micro_train_batch']}, on {r['device']}"
        + (f", with {a['overrides']}" if a.get("overrides") else ""),
        f"  step (median of {len(r['steps'])}): wall {m['wall_s']:.3f} s, enqueue {m['enqueue_s']:.3f} s, "
        f"cpu {m['cpu_s']:.3f} s; host reference {statistics.median(r['host_ref_s']) * 1e3:.1f} ms",
    ]
    busy = p["device_busy_s"]
    if busy is not None:
        lines.append(
            f"  profiled step: wall {p['wall_s']:.3f} s, device busy {busy:.3f} s "
            f"(idle {p['device_idle_share']:.0%}), {p['device_events']} device events, {p['launches']} launches"
        )
    else:
        lines.append(f"  profiled step: wall {p['wall_s']:.3f} s (no device figures on CPU)")
    if p["parts_host_s"]:
        lines.append(
            "  host time per part: " + ", ".join(f"{k} {v:.3f} s" for k, v in p["parts_host_s"].items())
        )
    for name, b in p["blocking_calls"].items():
        lines.append(f"  sync/copy {name:<28} x{b['count']:<6} {b['s'] * 1e3:9.1f} ms")
    lines.append("  operators by own host time:")
    for o in p["top_ops"]:
        lines.append(f"    {o['op'][:60]:<60} x{o['count']:<6} {o['self_cpu_s'] * 1e3:9.1f} ms")
    py = r["python_profiled"]
    lines.append(f"  Python functions by own time (cProfile, step {py['wall_s']:.3f} s under it):")
    for f in py["top"]:
        lines.append(
            f"    {f['function'][:60]:<60} x{f['calls']:<6} {f['own_s'] * 1e3:9.1f} ms (cum {f['cum_s'] * 1e3:.0f})"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
