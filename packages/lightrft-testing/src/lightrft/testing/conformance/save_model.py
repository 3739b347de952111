"""``save_model`` writes a full Hugging Face safetensors directory that ``load_model`` reads back."""

from __future__ import annotations

from typing import Any

from lightrft.strategy import StrategyBase

from ..harness import build, full_params, shared_tmpdir, train
from ..models import make_batches
from .spec import DATA_SEED, MODEL_SEED, Capability, tiny_model


def measure(strategy: StrategyBase) -> dict[str, Any]:
    from safetensors.torch import load_file

    result: dict[str, Any] = {}
    with shared_tmpdir(strategy, "hf") as root:
        model, optim, sched = build(strategy, tiny_model())
        train(strategy, model, optim, sched, make_batches(DATA_SEED, 1, strategy.config.train_batch_size))
        expected = full_params(strategy, model)
        out = root / "hf"
        strategy.save_model(model, out)
        if strategy.is_rank_0():
            saved = {}
            for f in out.glob("*.safetensors"):
                saved.update(load_file(str(f)))
            result["files"] = sorted(p.name for p in out.iterdir())
            result["missing"] = sorted(set(expected) - set(saved))
            result["max_diff"] = max(
                float((saved[k].float() - v).abs().max()) for k, v in expected.items() if k in saved
            )
        strategy.barrier()
        model2, _, _ = build(strategy, tiny_model(MODEL_SEED + 5))
        strategy.load_model(model2, out)
        loaded = full_params(strategy, model2)
        result["load_max_diff"] = max(float((loaded[k] - expected[k]).abs().max()) for k in expected)
    return result


def test_save_model_is_full_and_loadable(suite: Any) -> None:
    ranks = suite.results("save_model")
    r0 = ranks[0]
    assert "model.safetensors" in r0["files"] or "model.safetensors.index.json" in r0["files"]
    assert "config.json" in r0["files"]
    assert r0["missing"] == []
    assert r0["max_diff"] == 0.0
    for r in ranks:
        assert r["load_max_diff"] == 0.0


CAPABILITY = Capability("save_model", measure, (test_save_model_is_full_and_loadable,))
