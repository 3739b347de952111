"""LightRFT's own call forms at the edges: overrides that must survive
``prepare_models_and_optimizers(..., args, max_steps)``, and FakeStrategy's engine calls without a
model (LightRFT's trainer tests)."""

from __future__ import annotations

import argparse
import warnings

import pytest

from lightrft.strategy import get_fake_strategy, get_strategy
from lightrft.testing import FakeEngine, NoEngineModelWarning, make_tiny_model


def _args(**kw):
    base = {"train_batch_size": 2, "micro_train_batch_size": 1, "actor_learning_rate": 1e-3, "seed": 1}
    return argparse.Namespace(**{**base, **kw})


@pytest.mark.parametrize("build", ["get_fake_strategy", "get_strategy"])
def test_overrides_win_over_the_args_passed_again(build):
    args = _args(strategy="fake")
    make = get_fake_strategy if build == "get_fake_strategy" else get_strategy
    strategy = make(args, actor_learning_rate=5e-2, critic_learning_rate=7e-3)
    with pytest.warns(UserWarning, match=r"actor_learning_rate: args 0\.001, strategy 0\.05"):
        (_, optim, _), (_, c_optim, _), _, _ = strategy.prepare_models_and_optimizers(
            make_tiny_model(seed=0), make_tiny_model(seed=1), None, None, args, 10
        )
    # initial_lr: the scheduler's peak (warmup starts the current lr lower).
    assert {g["initial_lr"] for g in optim.param_groups} == {5e-2}
    assert {g["initial_lr"] for g in c_optim.param_groups} == {7e-3}


def test_args_that_agree_give_no_warning():
    args = _args(strategy="fake")
    strategy = get_fake_strategy(args)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (_, optim, _), *_ = strategy.prepare_models_and_optimizers(
            make_tiny_model(), None, None, None, args, 10
        )
    assert {g["initial_lr"] for g in optim.param_groups} == {1e-3}


def test_lightrfts_trainer_test_calls_on_fake_strategy_without_a_model():
    """LightRFT's ``test_inference_engine_methods`` with the import path changed."""
    strategy = get_fake_strategy(_args())
    with pytest.warns(NoEngineModelWarning, match="model-less FakeEngine stands in for the 'hf' engine"):
        engine = strategy.setup_inference_engine(None)
    assert isinstance(engine, FakeEngine) and engine.model is None
    assert strategy.maybe_sleep_inference_engine() is True  # level 2 by default: nothing to lose
    strategy.wakeup_inference_engine()
    assert not engine.is_sleeping
    assert strategy.engine_generate_local(None) == []
    assert strategy.gather_and_generate(None) == []
    model = make_tiny_model(seed=0)
    strategy.update_engine_weights(model)  # pushes are taken and counted
    assert engine.updates == 1 and engine.names_received == {n for n, _ in model.named_parameters()}
    with pytest.raises(RuntimeError, match="set up without a model.*pass model="):
        strategy.gather_and_generate(prompt_token_ids=[[1, 2]])


def test_lightrfts_critic_pretrain_false_is_accepted():
    strategy = get_fake_strategy(_args(critic_pretrain=False))
    assert strategy.config.critic_pretrain is False and strategy.args.critic_pretrain is False


def test_a_model_still_builds_a_real_engine():
    strategy = get_fake_strategy({**vars(_args()), "engine_type": "fake"})
    with warnings.catch_warnings():
        warnings.simplefilter("error", NoEngineModelWarning)
        engine = strategy.setup_inference_engine(model=make_tiny_model(seed=0))
    assert engine.model is not None
    strategy.update_engine_weights(make_tiny_model(seed=0))
    out = strategy.gather_and_generate(prompt_token_ids=[[1, 2]], sleep_engine=False)
    assert len(out) == 1 and len(out[0].output_token_ids) == 16  # greedy, the default 16 new tokens
