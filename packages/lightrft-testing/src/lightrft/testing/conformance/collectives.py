"""``all_reduce`` (mean, sum, max; tensors, scalars, dicts) and ``all_gather`` across ranks."""

from __future__ import annotations

from typing import Any

import torch

from lightrft.strategy import StrategyBase

from .spec import Capability


def measure(strategy: StrategyBase) -> dict[str, Any]:
    r, n = strategy.get_rank(), strategy.world_size
    t = torch.tensor([float(r + 1), 2.0 * (r + 1)])
    return {
        "rank": r,
        "world_size": n,
        "mean": strategy.all_reduce(t, "mean"),
        "sum": strategy.all_reduce(t, "sum"),
        "max": strategy.all_reduce(t, "max"),
        "scalar_mean": strategy.all_reduce(float(r + 1), "mean"),
        "dict_sum": strategy.all_reduce({"a": float(r), "b": torch.tensor(float(r + 1))}, "sum"),
        "gather": strategy.all_gather(torch.full((r + 1, 2), float(r))),
        "gather_scalar": strategy.all_gather(r * 10),
        "gather_0d": strategy.all_gather(torch.tensor(float(r))),
        "int_mean": strategy.all_reduce(torch.tensor([r + 1]), "mean"),
    }


def test_collectives(suite: Any) -> None:
    ranks = suite.results("collectives")
    n = ranks[0]["world_size"]
    assert n == suite.world_size
    vals = torch.tensor([[float(r + 1), 2.0 * (r + 1)] for r in range(n)])
    # Bitwise: every value is a small integer, so any order of summation is exact in fp32, and a
    # mean is that exact sum divided by n, rounded once, on both sides.
    for r in ranks:
        assert torch.equal(r["mean"], vals.sum(0) / n)
        assert torch.equal(r["sum"], vals.sum(0))
        assert torch.equal(r["max"], vals.max(0).values)
        assert r["scalar_mean"] == sum(range(1, n + 1)) / n
        assert r["dict_sum"]["a"] == sum(range(n))
        assert float(r["dict_sum"]["b"]) == sum(range(1, n + 1))
        expected = torch.cat([torch.full((k + 1, 2), float(k)) for k in range(n)])
        assert torch.equal(r["gather"], expected)
        assert r["gather_scalar"] == [10 * k for k in range(n)]
        assert torch.equal(r["gather_0d"], torch.arange(n, dtype=torch.float32))
        assert (
            float(r["int_mean"]) == sum(range(1, n + 1)) / n
        )  # an integer tensor's mean comes back as float


CAPABILITY = Capability("collectives", measure, (test_collectives,))
