"""A sleep-mode vLLM engine shut down and left to the process's exit prints nothing (GPU machine).

    python scripts/gpu/exit_clean.py --out DIR

On 2026-12-03 (H200, vLLM 0.26.0) the multimodal run printed ``CUDA Error: invalid argument at
cumem_allocator.cpp:235`` at exit: its engine was parked asleep at level 2 by
``engine_lifecycle.shutdown()`` and destroyed at exit, and vLLM frees a sleeping allocation with
``cuMemUnmap`` on an address its sleep already unmapped. ``VLLMEngine`` now maps a sleeping engine
back before destroying it (``vllm_engine._map_back_before_free``).

Two child processes run the same short job (a small engine, one generation, a level-2 sleep,
``engine_lifecycle.shutdown()``, exit): one with the map-back disabled (``--child unfixed``: the
message must appear, or this check could not fail), one as shipped (``--child fixed``: it must
not). Both must exit 0. Writes ``DIR/exit_clean.json``; exits 1 when a check failed.

First run (H200, 2026-12-04, engines with ``enforce_eager``): neither child printed the message,
so that run could not tell the fix from the old code. The engines now capture CUDA graphs, as the
multimodal run's did (``docs/benchmarks.md``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

MESSAGE = "cumem_allocator.cpp"


def child(mode: str) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import edges  # the same model, strategy and greedy generation as the edge checks

    if mode == "unfixed":
        from lightrft.engines import vllm_engine

        vllm_engine._map_back_before_free = lambda llm, asleep: None  # the code before the fix
    strategy = edges.make_strategy("vllm", "cuda", engine_mem_util=0.1, engine_enforce_eager=False)
    model = edges.make_model("tiny", seed=1)
    strategy.setup_inference_engine(model=model)
    out = edges.greedy(strategy, edges.prompts("tiny", n=2), max_new=4)
    strategy.maybe_sleep_inference_engine(2)
    strategy.engine_lifecycle.shutdown()  # parked asleep; the exit destroys it
    print(f"generated {out}", flush=True)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="exit-clean-out")
    ap.add_argument("--child", choices=["fixed", "unfixed"], default=None)
    args = ap.parse_args()
    if args.child:
        return child(args.child)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = {}
    for mode in ("unfixed", "fixed"):
        t = time.monotonic()
        p = subprocess.run(
            [sys.executable, __file__, "--child", mode],
            capture_output=True,
            text=True,
            env={**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"},
            timeout=240,
        )
        text = p.stdout + p.stderr
        (out / f"{mode}.txt").write_text(text)
        lines = [line for line in text.splitlines() if MESSAGE in line]
        runs[mode] = {"rc": p.returncode, "message_lines": lines, "seconds": round(time.monotonic() - t, 1)}
        print(f"{mode}: rc={p.returncode} in {runs[mode]['seconds']} s, {len(lines)} line(s) naming {MESSAGE}")
    checks = {
        "both exit 0": runs["unfixed"]["rc"] == 0 and runs["fixed"]["rc"] == 0,
        "without the map-back the message appears (the check can fail)": bool(runs["unfixed"]["message_lines"]),
        "as shipped no message": not runs["fixed"]["message_lines"],
    }
    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'} {name}")
    (out / "exit_clean.json").write_text(json.dumps({"runs": runs, "checks": checks}, indent=2))
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
