"""``moving_average``: ``ema = beta * ema + (1 - beta) * model`` over full parameters."""

from __future__ import annotations

from typing import Any

import torch

from lightrft.strategy import StrategyBase

from ..harness import build, flat, full_params, train
from ..models import make_batches
from ..tolerance import gamma
from .spec import DATA_SEED, Capability, tiny_model


def measure(strategy: StrategyBase) -> dict[str, Any]:
    model, optim, sched = build(strategy, tiny_model())
    initial = flat(full_params(strategy, model))
    ema = strategy.prepare(strategy.prepare_model(tiny_model(), is_training=False))
    train(strategy, model, optim, sched, make_batches(DATA_SEED, 1, strategy.config.train_batch_size))
    trained = flat(full_params(strategy, model))
    strategy.moving_average(model, ema, beta=0.9)
    got = flat(full_params(strategy, ema))
    expected = 0.9 * initial + 0.1 * trained
    return {
        "max_diff": float((got - expected).abs().max()),
        "moved": float((trained - initial).abs().max()),
        "scale": float(torch.maximum(initial.abs(), trained.abs()).max()),
    }


def test_ema(suite: Any) -> None:
    for r in suite.results("ema"):
        assert r["moved"] > 1e-4, "training did not move the parameters: the EMA check would be vacuous"
        # fp32: both sides compute 0.9 a + 0.1 b with at most 2 roundings each (products, sum) plus
        # 0.1's own; 4 roundings of terms below ``scale``: gamma(4) * scale (tolerance.gamma).
        # bf16 (GPU, not run here): the EMA model holds bf16 weights, so on top of those the backend
        # rounds to bf16 at most 6 times per element (its initial copy, the trained weight read in
        # bf16, both products, the sum, the store), each of terms below ``scale``.
        bound = gamma(4) * r["scale"]
        if suite.config()["bf16"]:
            bound += gamma(6, torch.bfloat16) * r["scale"]
        assert r["max_diff"] <= bound, (r["max_diff"], bound)


CAPABILITY = Capability("ema", measure, (test_ema,))
