"""Gradient accumulation: the step count, the boundary, where parameters change, the scheduler."""

from __future__ import annotations

import math
from typing import Any

import torch

from lightrft.strategy import StrategyBase

from ..harness import build, flat, full_params, param_groups, rank_share
from ..models import causal_lm_loss, make_batches
from .spec import DATA_SEED, Capability, tiny_model


def measure(strategy: StrategyBase) -> dict[str, Any]:
    model, optim, sched = build(strategy, tiny_model())
    batch = make_batches(DATA_SEED, 1, strategy.config.train_batch_size)[0]
    before = flat(full_params(strategy, model))
    changes, returned = [], []
    for i, mb in enumerate(rank_share(strategy, batch)):
        loss = causal_lm_loss(model, mb.to(strategy.device))
        boundary_predicted = strategy.is_accumulation_boundary(model)
        strategy.backward(loss, model, optim)
        returned.append(strategy.optimizer_step(optim, model, sched))
        now = flat(full_params(strategy, model))
        changes.append(
            {"micro": i, "boundary_predicted": boundary_predicted, "changed": not torch.equal(before, now)}
        )
    st = strategy.train_state(model)
    return {
        "accumulated_gradient": strategy.accumulated_gradient,
        "returned": returned,
        "changes": changes,
        "micro_step": st.micro_step,
        "global_step": st.global_step,
        "lr_after": [g["lr"] for g in param_groups(optim)],
    }


def test_accumulation_steps_and_boundaries(suite: Any) -> None:
    cfg = suite.config()
    acc = cfg["train_batch_size"] // (cfg["micro_train_batch_size"] * suite.world_size)
    for r in suite.results("accumulation"):
        assert r["accumulated_gradient"] == acc
        assert len(r["returned"]) == acc
        # None between boundaries, the norm (a finite float) at the boundary.
        assert all(v is None for v in r["returned"][:-1]), r["returned"]
        assert isinstance(r["returned"][-1], float) and math.isfinite(r["returned"][-1])
        # Parameters change only at the boundary, which is_accumulation_boundary predicted.
        assert [c["boundary_predicted"] for c in r["changes"]] == [False] * (acc - 1) + [True]
        assert [c["changed"] for c in r["changes"]] == [False] * (acc - 1) + [True]
        assert (r["micro_step"], r["global_step"]) == (acc, 1)


def test_scheduler_steps_once_per_optimizer_step(suite: Any) -> None:
    fake = suite.fake("accumulation")
    for r in suite.results("accumulation"):
        # Exact: every backend's scheduler is create_scheduler's LambdaLR (stepped by the base or
        # by the backend's engine), the same float64 formula on the same step count and peak.
        assert r["lr_after"] == fake["lr_after"], (r["lr_after"], fake["lr_after"])


CAPABILITY = Capability(
    "accumulation",
    measure,
    (test_accumulation_steps_and_boundaries, test_scheduler_steps_once_per_optimizer_step),
)
