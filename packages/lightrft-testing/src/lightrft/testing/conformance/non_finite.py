"""A step whose gradient norm is not finite is skipped and counted; training goes on."""

from __future__ import annotations

import math
from typing import Any

import torch

from lightrft.strategy import StrategyBase

from ..harness import build, flat, full_params, train
from ..models import make_batches
from .spec import DATA_SEED, Capability, tiny_model


def measure(strategy: StrategyBase) -> dict[str, Any]:
    model, optim, sched = build(strategy, tiny_model())
    batches = make_batches(DATA_SEED, 3, strategy.config.train_batch_size)
    first = train(strategy, model, optim, sched, batches[:1])
    before = flat(full_params(strategy, model))
    bad = train(strategy, model, optim, sched, batches[1:2], loss_hook=lambda loss: loss * float("nan"))
    after_bad = flat(full_params(strategy, model))
    good = train(strategy, model, optim, sched, batches[2:3])
    after_good = flat(full_params(strategy, model))
    return {
        "first_norm": first["norms"][0],
        "bad_norm": bad["norms"][0],
        "unchanged_after_bad": bool(torch.equal(before, after_bad)),
        "skipped_steps": strategy.skipped_steps,
        "good_norm": good["norms"][0],
        "changed_after_good": not torch.equal(after_bad, after_good),
        "finite_after_good": bool(torch.isfinite(after_good).all()),
    }


def test_non_finite_norm_skips_step(suite: Any) -> None:
    for r in suite.results("non_finite"):
        assert math.isfinite(r["first_norm"])
        assert not math.isfinite(r["bad_norm"])
        assert r["unchanged_after_bad"], "a step with a non-finite gradient norm changed the parameters"
        assert r["skipped_steps"] == 1
        assert math.isfinite(r["good_norm"]) and r["changed_after_good"] and r["finite_after_good"]


CAPABILITY = Capability("non_finite", measure, (test_non_finite_norm_skips_step,))
