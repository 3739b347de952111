"""No gradient reduction between accumulation boundaries (where the strategy declares it)."""

from __future__ import annotations

from typing import Any

import pytest

from lightrft.strategy import StrategyBase

from ..harness import build, count_reductions, rank_share
from ..models import causal_lm_loss, make_batches
from .spec import DATA_SEED, Capability, tiny_model


def measure(strategy: StrategyBase) -> dict[str, Any]:
    """Counts gradient reductions issued during each micro-step's backward."""
    model, optim, sched = build(strategy, tiny_model())
    batch = make_batches(DATA_SEED, 1, strategy.config.train_batch_size)[0]
    counts: list[dict[str, Any]] = []
    for mb in rank_share(strategy, batch):
        boundary = strategy.is_accumulation_boundary(model)
        loss = causal_lm_loss(model, mb.to(strategy.device))
        with count_reductions() as counter:
            strategy.backward(loss, model, optim)
        counts.append({"boundary": boundary, "reductions": counter.n})
        strategy.optimizer_step(optim, model, sched)
    return {
        "counts": counts,
        "syncs_only_at_boundary": strategy.syncs_only_at_boundary,
        "world_size": strategy.world_size,
    }


def test_no_gradient_sync_between_boundaries(suite: Any) -> None:
    for r in suite.results("no_sync"):
        if not r["syncs_only_at_boundary"]:
            pytest.skip(
                f"{suite.strategy_name} declares syncs_only_at_boundary=False (reduces every micro-step)"
            )
        between = [c["reductions"] for c in r["counts"] if not c["boundary"]]
        at = [c["reductions"] for c in r["counts"] if c["boundary"]]
        assert between and all(n == 0 for n in between), (
            f"gradient reductions between boundaries: {r['counts']}"
        )
        if r["world_size"] > 1:
            assert at and all(n > 0 for n in at), f"no gradient reduction at the boundary: {r['counts']}"


CAPABILITY = Capability("no_sync", measure, (test_no_gradient_sync_between_boundaries,))
