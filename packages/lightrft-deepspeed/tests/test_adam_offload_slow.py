"""adam_offload (DeepSpeedCPUAdam) against FakeStrategy on 2 CPU ranks.

DeepSpeedCPUAdam JIT-builds its op for about 100 s on CPU, so this test is opt-in:
``LIGHTRFT_RUN_SLOW=1 uv run --package lightrft-deepspeed pytest packages/lightrft-deepspeed -k adam_offload``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lightrft.testing import run_distributed
from lightrft.testing.conformance import BASE_CONFIG, check_results, run_checks
from lightrft.testing.tolerance import (
    ADAM_STEP_ROUNDINGS,
    PARITY_ADAM_EPS,
    adam_drift_atol,
    adam_step_atol,
    float32_scalar_roundings,
    norm_rtol,
    parity_loss_atol,
    parity_param_atol,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        os.environ.get("LIGHTRFT_RUN_SLOW") != "1",
        reason="builds DeepSpeedCPUAdam (~100 s on CPU); set LIGHTRFT_RUN_SLOW=1 to run",
    ),
]


def test_adam_offload_uses_cpu_adam_and_matches_fake() -> None:
    out = run_distributed(
        "deepspeed_rank_checks:run",
        2,
        {"names": ["adam_offload_zero2"]},
        timeout=900,
        pythonpath=Path(__file__).parent,
    )
    fake = run_checks("fake", {}, checks=["parity"])["parity"]["result"]
    assert fake["adam"] == {"eps": PARITY_ADAM_EPS, "betas": [0.9, 0.95]}
    betas = (0.9, 0.95)
    lr, micro = (
        BASE_CONFIG["actor_learning_rate"],
        BASE_CONFIG["train_batch_size"] // BASE_CONFIG["micro_train_batch_size"],
    )
    steps, n = len(fake["losses"]), fake["params"].numel()
    # Per element: Fake's 4 micro-batch gradients summed in another order than 2 ranks x 2, through
    # Adam's Lipschitz bound at PARITY_ADAM_EPS (tolerance.parity_param_atol), plus, at each step,
    # the two kernels' own roundings (DeepSpeedCPUAdam against torch's AdamW,
    # tolerance.adam_step_atol), with DeepSpeedCPUAdam's float32 betas and bias corrections
    # (float32_scalar_roundings) and, at step t, the state's roundings of the t - 1 steps before it
    # carried in (t times a step's). |p| at any step: the final |p| plus the most 3 steps can move
    # it (adam_drift_atol / 2).
    p_abs = fake["params"].abs() + adam_drift_atol([lr] * steps, betas) / 2
    atol = parity_param_atol(lr, steps, micro, BASE_CONFIG["max_norm"], n, PARITY_ADAM_EPS, betas=betas)
    for t in range(1, steps + 1):
        roundings = t * (ADAM_STEP_ROUNDINGS + float32_scalar_roundings(t, betas))
        atol = atol + adam_step_atol(p_abs, lr, t, betas, roundings=roundings)
    for r in check_results(out, "adam_offload_zero2"):
        assert r["optimizer"] == "DeepSpeedCPUAdam"
        diff = (r["params"] - fake["params"]).abs()
        assert bool((diff <= atol).all()), float((diff - atol).max())
        # Losses: the micro-batch losses' mean in another order, and later the parameters' measured
        # distance, to first order (tolerance.parity_loss_atol); the norm's squares are summed in
        # another order (tolerance.norm_rtol).
        dp = float(diff.double().norm())
        for a, b, norm in zip(r["losses"], fake["losses"], fake["norms"], strict=True):
            assert abs(a - b) <= parity_loss_atol(b, norm, dp, micro), (a, b, dp)
        assert r["norms"] == pytest.approx(fake["norms"], rel=norm_rtol(n))
