"""Loss, clip-norm and parameter parity with FakeStrategy, itself checked against plain torch."""

from __future__ import annotations

from typing import Any

import torch

from lightrft.strategy import StrategyBase

from ..distributed import rank_threads
from ..harness import build, flat, full_params, param_groups, train
from ..models import make_batches
from ..tolerance import PARITY_ADAM_EPS
from .reference import reference_training
from .spec import BASE_CONFIG, DATA_SEED, STEPS, Capability, tiny_model


def measure(strategy: StrategyBase) -> dict[str, Any]:
    # Adam's eps of the parity runs (tolerance.PARITY_ADAM_EPS): with the default 1e-8 no bound on
    # the gradients' reduction order bounds the parameters.
    model, optim, sched = build(strategy, tiny_model(), eps=PARITY_ADAM_EPS)
    run = train(
        strategy, model, optim, sched, make_batches(DATA_SEED, STEPS, strategy.config.train_batch_size)
    )
    params = full_params(strategy, model)
    group = param_groups(optim)[0]
    return {
        **run,
        "params": flat(params),
        "names": sorted(params),
        # What the optimizer really used, for the bounds (suite.assert_params_close).
        "adam": {"eps": float(group["eps"]), "betas": [float(b) for b in group["betas"]]},
    }


def test_loss_parity_with_fake(suite: Any) -> None:
    for r in suite.results("parity"):
        suite.assert_losses_close(r["losses"], r["params"], "global mean loss per step")


def test_clip_norm_parity_with_fake(suite: Any) -> None:
    ranks = suite.results("parity")
    for r in ranks:
        suite.assert_norms_close(r["norms"], "gradient norm returned by optimizer_step")
    # The same norm on every rank, and clipping really bit (norm above max_norm) in this run.
    assert all(r["norms"] == ranks[0]["norms"] for r in ranks)
    assert max(ranks[0]["norms"]) > suite.config()["max_norm"]


def test_parameter_parity_with_fake(suite: Any) -> None:
    fake = suite.fake("parity")
    for r in suite.results("parity"):
        assert r["names"] == fake["names"]
        # The backend's optimizer took the run's eps and betas (the bounds below are computed with them).
        assert r["adam"] == fake["adam"] and fake["adam"]["eps"] == PARITY_ADAM_EPS
        suite.assert_params_close(r["params"], "parameters after training")


def test_fake_matches_hand_written_reference(suite: Any) -> None:
    """The reference itself is checked against plain torch, so parity means correctness. Bitwise:
    the same model, data and thread count (run_checks and this test both run under rank_threads),
    the same micro-batch losses scaled by 1 / accumulation and summed by autograd in the same
    order, the same clip_grad_norm_ over the parameters in the same order, torch's AdamW on each
    tensor and a learning rate computed by the same float64 formula."""
    fake = suite.fake("parity")
    with rank_threads():  # the thread count Fake's run had (run_checks): the same kernels' splits
        ref = reference_training(
            {**BASE_CONFIG, **{k: v for k, v in suite.config_overrides.items() if k in BASE_CONFIG}}
        )
    assert fake["losses"] == ref["losses"]
    assert fake["norms"] == ref["norms"]
    assert torch.equal(fake["params"], ref["params"])


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
