"""FakeStrategy as the seed documents it (unprepared models, no process group) and as LightRFT's
own code calls a strategy (positional constructor, ``args=``, ``optimizer_step(..., name=)``)."""

import argparse

import pytest
import torch
from torch import nn

from lightrft.strategy import get_fake_strategy
from lightrft.testing import FakeStrategy


def _model_and_optimizer(seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 1))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def _loss(model: nn.Module, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(4, 6, generator=g), torch.randn(4, 1, generator=g)
    return nn.functional.mse_loss(model(x), y)


def test_the_seeds_testing_pattern_verbatim(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model, optimizer = _model_and_optimizer()
    loss = _loss(model)
    before = [p.detach().clone() for p in model.parameters()]
    # ---- verbatim from the seed's design document ----
    from lightrft.strategy import get_fake_strategy

    strategy = get_fake_strategy()
    strategy.setup_distributed()
    strategy.backward(loss, model, optimizer)
    strategy.save_ckpt(model, "checkpoints")
    # ---------------------------------------------------
    # The default config accumulates 128 micro-steps: the loss was scaled, nothing stepped yet.
    assert strategy.accumulated_gradient == 128
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert strategy.train_state(model).micro_step == 0
    assert (tmp_path / "checkpoints" / "latest").read_text() == "global_step0"


def test_adopted_model_trains_checkpoints_and_resumes_like_a_prepared_one(tmp_path):
    cfg = {"train_batch_size": 2, "micro_train_batch_size": 1, "max_norm": 1.0}
    # Adopted on first use ...
    adopted = get_fake_strategy(cfg)
    model, optimizer = _model_and_optimizer()
    # ... and prepared explicitly: the same numbers.
    prepared = get_fake_strategy(cfg, strict=True)
    model2, optimizer2 = _model_and_optimizer()
    model2, optimizer2, _ = prepared.prepare((model2, optimizer2, None))
    norms, norms2 = [], []
    for i in range(4):
        adopted.backward(_loss(model, i), model, optimizer)
        norms.append(adopted.optimizer_step(optimizer, model))
        prepared.backward(_loss(model2, i), model2, optimizer2)
        norms2.append(prepared.optimizer_step(optimizer2, model2))
    assert norms[0] is None and norms[2] is None and norms[1] is not None and norms[1] > 0
    assert norms == norms2
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))
    assert adopted.train_state(model).global_step == 2

    adopted.save_ckpt(model, tmp_path, tag="t")
    resumed = get_fake_strategy(cfg)
    fresh, fresh_opt = _model_and_optimizer(seed=5)
    resumed.backward(_loss(fresh, 0) * 0, fresh, fresh_opt)  # adopts the pair (zero gradient)
    resumed.load_ckpt(fresh, tmp_path, tag="t")
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), fresh.parameters()))
    assert resumed.train_state(fresh).global_step == 2
    exp_avg = optimizer.state[next(iter(model.parameters()))]["exp_avg"]
    assert torch.equal(fresh_opt.state[next(iter(fresh.parameters()))]["exp_avg"], exp_avg)


def test_strict_refuses_an_unprepared_model():
    strategy = get_fake_strategy(strict=True)
    model, optimizer = _model_and_optimizer()
    with pytest.raises(ValueError, match="was not prepared for training by this strategy"):
        strategy.backward(_loss(model), model, optimizer)
    with pytest.raises(ValueError, match="strategy.prepare"):
        strategy.optimizer_step(optimizer, model)


def test_hand_written_backward_then_optimizer_step_without_scheduler():
    # LightRFT's unit test: loss.backward() by hand, then optimizer_step(..., name=...), no scheduler.
    strategy = FakeStrategy(seed=42, max_norm=1.0, micro_train_batch_size=2, train_batch_size=8, args=None)
    model, optimizer = _model_and_optimizer()
    _loss(model).backward()
    before = [p.detach().clone() for p in model.parameters()]
    norm = strategy.optimizer_step(optimizer, model, name="test")
    assert norm is not None and norm > 0  # setup_distributed not called: one micro-step per step
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_optimizer_step_steps_the_scheduler_passed_by_keyword():
    strategy = get_fake_strategy({"train_batch_size": 1, "micro_train_batch_size": 1})
    model, optimizer = _model_and_optimizer()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (step + 1))
    strategy.backward(_loss(model), model, optimizer)
    strategy.optimizer_step(optimizer, model, scheduler=scheduler, name="actor")
    # Exact: LambdaLR's lr is base_lr * factor, 1e-2 * (1.0 / 2) in float64; halving is exact.
    assert scheduler.last_epoch == 1 and optimizer.param_groups[0]["lr"] == 1e-2 * 0.5


class _LightRFTArgs:
    """The attribute object LightRFT's own FakeStrategy test builds."""

    seed = 999
    max_norm = 3.0
    micro_train_batch_size = 8
    train_batch_size = 32
    bf16 = True
    adam_offload = True
    zpg = 2
    engine_tp_size = 4
    actor_learning_rate = 1e-4
    plot_every = 100  # unknown to StrategyConfig: kept as an extra argument


def test_config_comes_from_args():
    strategy = FakeStrategy(args=_LightRFTArgs())
    assert strategy.config.seed == 999 and strategy.seed == 999
    assert strategy.config.max_norm == 3.0 and strategy.config.adam_offload is True
    assert strategy.config.zpg == 2 and strategy.get_extra_arg("plot_every") == 100
    assert isinstance(strategy.args, _LightRFTArgs)


def test_lightrft_positional_constructor_puts_explicit_values_over_args():
    args = argparse.Namespace(seed=999, max_norm=3.0, micro_train_batch_size=8, train_batch_size=32, l2=0.25)
    strategy = FakeStrategy(7, 0.5, 2, 16, args=args)
    assert (strategy.seed, strategy.max_norm) == (7, 0.5)
    assert (strategy.micro_train_batch_size, strategy.train_batch_size) == (2, 16)
    assert strategy.config.l2 == 0.25  # the rest comes from args
    assert strategy.args is args
    strategy.setup_distributed()
    assert strategy.accumulated_gradient == 8


def test_constructor_misuse_is_named():
    with pytest.raises(TypeError, match="at most 4 positional values"):
        FakeStrategy(1, 1.0, 1, 1, 5)
    with pytest.raises(TypeError, match="seed both positionally and as keywords"):
        FakeStrategy(1, seed=2)


def test_optimizer_offload_calls_are_no_ops_that_return_the_optimizer():
    strategy = get_fake_strategy()
    _, optimizer = _model_and_optimizer()
    assert strategy.maybe_offload_optimizer(optimizer) is optimizer
    assert strategy.maybe_load_optimizer(optimizer) is optimizer
