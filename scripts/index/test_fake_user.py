"""What a new user of `uv add lightrft-testing` writes: tests of their own loop on FakeStrategy, the
plugin's fixture and its gpu marker (scripts/check-index runs this file and checks the counts)."""

import pytest
import torch
from torch import nn

from lightrft.strategy import get_fake_strategy, get_strategy

X = torch.tensor([[1.0, 2.0, 3.0], [0.5, -1.0, 2.0], [-1.0, 0.0, 1.0], [2.0, 1.0, 0.0]])
Y = X @ torch.tensor([[0.5], [-1.0], [2.0]])


def my_training_loop(strategy, steps: int) -> tuple[list[float], list[float]]:
    """Two micro-batches of 2 rows per optimizer step; returns the full-data loss and the norms."""
    torch.manual_seed(0)
    (model, optim, sched), *_ = strategy.prepare_models_and_optimizers(
        nn.Linear(3, 1), None, None, None, max_steps=steps
    )
    losses, norms = [], []
    for _ in range(steps):
        for rows in (slice(0, 2), slice(2, 4)):
            strategy.backward(nn.functional.mse_loss(model(X[rows]), Y[rows]), model, optim)
            norm = strategy.optimizer_step(optim, model, sched)
            if norm is not None:
                norms.append(norm)
        with torch.no_grad():
            losses.append(float(nn.functional.mse_loss(model(X), Y)))
    return losses, norms


def test_fake_strategy_runs_my_loop_with_accumulation():
    strategy = get_fake_strategy(
        train_batch_size=4, micro_train_batch_size=2, actor_learning_rate=0.1, max_norm=0
    )
    assert type(strategy).__name__ == "FakeStrategy"
    assert (strategy.world_size, strategy.accumulated_gradient) == (1, 2)
    losses, norms = my_training_loop(strategy, steps=60)
    assert len(norms) == 60  # one optimizer step (and one norm) per 2 micro-steps
    assert losses[-1] < 0.05 * losses[0], losses


def test_fake_is_registered_under_its_entry_point():
    s = get_strategy({"strategy": "fake", "train_batch_size": 4, "micro_train_batch_size": 2})
    assert type(s).__name__ == "FakeStrategy" and s.accumulated_gradient == 2


def test_the_plugin_fixture(fake_strategy):  # from the pytest11 entry point of lightrft-testing
    assert type(fake_strategy).__name__ == "FakeStrategy" and fake_strategy.accumulated_gradient == 4


@pytest.mark.gpu(1)
def test_needs_a_gpu():  # the plugin skips it on a machine without CUDA, saying why
    assert torch.cuda.device_count() >= 1
