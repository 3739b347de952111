"""``moving_average``: ``ema = beta * ema + (1 - beta) * model`` over full parameters."""

from __future__ import annotations

from typing import Any

from lightrft.strategy import StrategyBase

from ..harness import build, flat, full_params, train
from ..models import make_batches
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
    return {"max_diff": float((got - expected).abs().max()), "moved": float((trained - initial).abs().max())}


def test_ema(suite: Any) -> None:
    for r in suite.results("ema"):
        assert r["moved"] > 1e-4, "training did not move the parameters: the EMA check would be vacuous"
        # fp32 EMA is exact up to rounding; a bf16 EMA is held to the parity tolerance.
        assert r["max_diff"] < (suite.atol if suite.config()["bf16"] else 1e-6), r["max_diff"]


CAPABILITY = Capability("ema", measure, (test_ema,))
