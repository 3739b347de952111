"""Loss, clip-norm and parameter parity with FakeStrategy, itself checked against plain torch."""

from __future__ import annotations

from typing import Any

import torch

from lightrft.strategy import StrategyBase

from ..distributed import rank_threads
from ..harness import build, flat, full_params, train
from ..models import make_batches
from .reference import reference_training
from .spec import BASE_CONFIG, DATA_SEED, STEPS, Capability, tiny_model


def measure(strategy: StrategyBase) -> dict[str, Any]:
    model, optim, sched = build(strategy, tiny_model())
    run = train(
        strategy, model, optim, sched, make_batches(DATA_SEED, STEPS, strategy.config.train_batch_size)
    )
    params = full_params(strategy, model)
    return {**run, "params": flat(params), "names": sorted(params)}


def test_loss_parity_with_fake(suite: Any) -> None:
    fake = suite.fake("parity")
    for r in suite.results("parity"):
        suite.close(r["losses"], fake["losses"], "global mean loss per step")


def test_clip_norm_parity_with_fake(suite: Any) -> None:
    fake = suite.fake("parity")
    ranks = suite.results("parity")
    for r in ranks:
        suite.close(r["norms"], fake["norms"], "gradient norm returned by optimizer_step")
    # The same norm on every rank, and clipping really bit (norm above max_norm) in this run.
    assert all(r["norms"] == ranks[0]["norms"] for r in ranks)
    assert max(ranks[0]["norms"]) > suite.config()["max_norm"]


def test_parameter_parity_with_fake(suite: Any) -> None:
    fake = suite.fake("parity")
    for r in suite.results("parity"):
        assert r["names"] == fake["names"]
        suite.close(r["params"], fake["params"], "parameters after training")


def test_fake_matches_hand_written_reference(suite: Any) -> None:
    """The reference itself is checked against plain torch, so parity means correctness."""
    fake = suite.fake("parity")
    with rank_threads():  # the thread count Fake's run had (run_checks): the same kernels' splits
        ref = reference_training(
            {**BASE_CONFIG, **{k: v for k, v in suite.config_overrides.items() if k in BASE_CONFIG}}
        )
    assert torch.allclose(torch.tensor(fake["losses"]), torch.tensor(ref["losses"]), atol=1e-6, rtol=1e-5)
    assert torch.allclose(torch.tensor(fake["norms"]), torch.tensor(ref["norms"]), atol=1e-6, rtol=1e-5)
    assert torch.allclose(fake["params"], ref["params"], atol=1e-6, rtol=1e-5)


CAPABILITY = Capability(
    "parity",
    measure,
    (
        test_loss_parity_with_fake,
        test_clip_norm_parity_with_fake,
        test_parameter_parity_with_fake,
        test_fake_matches_hand_written_reference,
    ),
)
