"""Deferred initialisation (optional: offered by strategies that override ``init_model_context``):
a model built under ``init_model_context(meta_init=True)``, prepared, then filled by ``load_model``
holds exactly the saved weights and trains like an eagerly built one."""

from __future__ import annotations

from typing import Any

from lightrft.strategy import StrategyBase

from ..harness import build, flat, full_params, shared_tmpdir, train
from ..models import make_batches
from ..tolerance import PARITY_ADAM_EPS
from .spec import DATA_SEED, MODEL_SEED, STEPS, Capability, tiny_model


def measure(strategy: StrategyBase) -> dict[str, Any]:
    batches = make_batches(DATA_SEED, STEPS, strategy.config.train_batch_size)
    with shared_tmpdir(strategy, "meta") as root:
        eager, _, _ = build(strategy, tiny_model())
        expected = full_params(strategy, eager)
        strategy.save_model(eager, root / "hf")
        with strategy.init_model_context(meta_init=True):
            deferred = tiny_model(MODEL_SEED + 7)
        deferred_kinds = sorted(
            {"meta" if p.is_meta else "empty" if p.numel() == 0 else "real" for p in deferred.parameters()}
        )
        # The order every backend supports: shard (allocates the local part), fill, then optimize.
        model = strategy.prepare_model(deferred, is_training=True)
        strategy.load_model(model, root / "hf")
        model, optim, sched = build(strategy, model, eps=PARITY_ADAM_EPS)  # as parity.measure
        loaded = full_params(strategy, model)
        run = train(strategy, model, optim, sched, batches)
        trained = flat(full_params(strategy, model))
    return {
        "deferred_kinds": deferred_kinds,
        "names": sorted(loaded),
        "expected_names": sorted(expected),
        "load_max_diff": float((flat(loaded) - flat(expected)).abs().max()),
        "losses": run["losses"],
        "params": trained,
    }


def test_meta_init_then_load_model(suite: Any) -> None:
    fake = suite.fake("parity")
    for r in suite.results("meta_init"):
        assert r["names"] == r["expected_names"]
        assert r["load_max_diff"] == 0.0
        # Training from the loaded weights is training from the suite's model: FakeStrategy's
        # parity run, within the parity run's bounds.
        assert r["names"] == fake["names"]
        suite.assert_losses_close(r["losses"], r["params"], "losses after meta init + load_model")
        suite.assert_params_close(r["params"], "parameters after meta init + load_model + training")


CAPABILITY = Capability(
    "meta_init", measure, (test_meta_init_then_load_model,), optional_method="init_model_context"
)
