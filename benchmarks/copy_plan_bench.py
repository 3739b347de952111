"""The host cost of a weight push's replay (``lightrft.engines._copy_plan.CopyPlan``) against the
raw backend: one ``torch._foreach_copy_`` over the same targets and sources, lists made in advance.

A push at 1.5-3.5B replays 270-300 names; on the H200 (2026-12-04 night) SGLang's scheduler spent
6.8-12.1 ms in the replay against a bytes' floor of about 2.4 ms at 1.5B. What the plan adds over
the raw call is Python: matching the names, putting each incoming tensor into its recorded view,
and the runs of copies. This benchmark measures that addition with tensors so small that the
copies themselves cost next to nothing, on the device given (``--device cuda`` on the GPU
machine: the launch of one ``_foreach_copy_`` is then the raw floor).

Two loaders: ``plain`` (one parameter per name, copied whole, as an unfused model) and ``fused``
(q, k and v into slices of one ``qkv`` parameter, the incoming tensor whole, as vLLM and SGLang
load attention). Each figure is the median of ``--repeats`` timed replays after ``--warmup``.

    uv run python benchmarks/copy_plan_bench.py --names 300
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial
from typing import Any

import torch

from lightrft.engines._copy_plan import CopyPlan


class Plain(torch.nn.Module):
    def __init__(self, n: int, device: str) -> None:
        super().__init__()
        self.ps = torch.nn.ParameterList(
            torch.nn.Parameter(torch.zeros(4, 4, dtype=torch.bfloat16, device=device)) for _ in range(n)
        )

    def names(self) -> list[str]:
        return [f"{i}.w" for i in range(len(self.ps))]

    def load_weights(self, named: list[tuple[str, torch.Tensor]]) -> None:
        for name, t in named:
            self.ps[int(name.split(".")[0])].data.copy_(t)


class Fused(torch.nn.Module):
    def __init__(self, n: int, device: str) -> None:
        super().__init__()
        self.ps = torch.nn.ParameterList(
            torch.nn.Parameter(torch.zeros(12, 4, dtype=torch.bfloat16, device=device))
            for _ in range(max(1, n // 3))
        )

    def names(self) -> list[str]:
        return [f"{i}.{p}" for i in range(len(self.ps)) for p in "qkv"]

    def load_weights(self, named: list[tuple[str, torch.Tensor]]) -> None:
        for name, t in named:
            i, part = name.split(".")
            k = "qkv".index(part)
            self.ps[int(i)].data[4 * k : 4 * (k + 1)].copy_(t)


def median_ms(fn: Any, repeats: int, warmup: int, sync: Any) -> float:
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--names", type=int, default=300, help="tensors per push")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (CPU)")
    a = ap.parse_args()
    if a.names < 3:
        ap.error(f"--names={a.names} is invalid: give 3 or more")
    torch.set_num_threads(a.threads)
    sync = torch.cuda.synchronize if a.device.startswith("cuda") else (lambda: None)
    print(f"copy plan replay, {a.names} tensors per push, device {a.device}, torch {torch.__version__}")
    print(f"{'loader':<8} {'plan ms':>9} {'raw ms':>9} {'plan/raw':>9} {'us/name over raw':>17}")
    for cls in (Plain, Fused):
        model = cls(a.names, a.device)
        g = torch.Generator().manual_seed(0)
        named = [(n, torch.randn(4, 4, generator=g).to(a.device)) for n in model.names()]
        plan = CopyPlan()
        plan.push(model, named, model.load_weights)  # recorded
        reference = {k: v.detach().clone() for k, v in model.state_dict().items()}
        plan_ms = median_ms(partial(plan.push, model, named, model.load_weights), a.repeats, a.warmup, sync)
        assert plan.stats["loaded"] == 0 and plan.stats["replayed"] > 0, plan.stats
        for k, v in model.state_dict().items():  # the replays wrote what load_weights wrote
            assert torch.equal(v, reference[k]), k
        # The raw backend: the same copies as one call, targets and sources listed in advance.
        dsts, srcs = [], []
        for name, t in named:
            i, part = name.split(".")
            p = model.ps[int(i)].data
            dsts.append(p if cls is Plain else p[4 * "qkv".index(part) : 4 * ("qkv".index(part) + 1)])
            srcs.append(t)
        raw_ms = median_ms(partial(torch._foreach_copy_, dsts, srcs), a.repeats, a.warmup, sync)
        extra_us = (plan_ms - raw_ms) * 1e3 / len(named)
        print(
            f"{cls.__name__.lower():<8} {plan_ms:>9.3f} {raw_ms:>9.3f} {plan_ms / raw_ms:>9.2f} {extra_us:>17.2f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
