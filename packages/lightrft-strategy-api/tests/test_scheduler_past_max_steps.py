"""Training past the scheduler's ``max_steps`` is reported once, not passed over in silence."""

from __future__ import annotations

import warnings

import pytest
import torch

from lightrft.strategy import get_fake_strategy
from lightrft.strategy.schedulers import ScheduleLR, create_scheduler


def _opt() -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)


@pytest.mark.parametrize("kind", ["cosine_with_min_lr", "linear", "constant_with_warmup"])
def test_warns_once_when_stepped_past_max_steps(kind):
    opt = _opt()
    sched = create_scheduler(opt, kind, max_steps=4, warmup_ratio=0.0, min_lr_ratio=0.1)
    assert isinstance(sched, ScheduleLR)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the max_steps optimizer steps themselves never warn
        for _ in range(4):
            opt.step()
            sched.step()
    final_lr = opt.param_groups[0]["lr"]
    with pytest.warns(UserWarning) as record:
        for _ in range(3):  # three steps past the end: one warning
            opt.step()
            sched.step()
    assert len(record) == 1
    msg = str(record[0].message)
    assert "past max_steps=4" in msg and "step 5" in msg and f"{final_lr:.3g}" in msg
    assert record[0].filename == __file__  # points at the caller's line
    # Exact: past max_steps the progress is clamped to 1.0, so the factor is the same float64
    # expression on the same inputs as at the last step (the schedule really ended).
    assert opt.param_groups[0]["lr"] == final_lr


def test_warned_flag_survives_state_dict_round_trip():
    opt = _opt()
    sched = create_scheduler(opt, "linear", max_steps=2)
    with pytest.warns(UserWarning, match="max_steps=2"):
        for _ in range(3):
            opt.step()
            sched.step()
    resumed = create_scheduler(_opt(), "linear", max_steps=2)
    resumed.load_state_dict(sched.state_dict())
    assert resumed.last_epoch == 3 and resumed.warned_past_max_steps
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resumed.step()


def test_strategy_loop_past_max_steps_warns():
    """Through the strategy: max_steps=2 given to prepare_models_and_optimizers, 3 optimizer steps."""
    strategy = get_fake_strategy({"train_batch_size": 2, "micro_train_batch_size": 2, "seed": 0})
    model = torch.nn.Linear(3, 1)
    (model, optim, sched), _, _, _ = strategy.prepare_models_and_optimizers(model, None, None, None, None, 2)
    x = torch.ones(2, 3)
    caught: list[warnings.WarningMessage] = []
    for step in range(3):
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            loss = model(x).pow(2).mean()
            strategy.backward(loss, model, optim)
            strategy.optimizer_step(optim, model, sched)
        past = [m for m in w if "max_steps" in str(m.message)]
        assert len(past) == (1 if step == 2 else 0), (step, [str(m.message) for m in w])
        caught += past
    assert "past max_steps=2 (this is step 3)" in str(caught[0].message)
