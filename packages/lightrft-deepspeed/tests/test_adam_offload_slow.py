"""adam_offload (DeepSpeedCPUAdam) against FakeStrategy on 2 CPU ranks.

DeepSpeedCPUAdam JIT-builds its op for about 100 s on CPU, so this test is opt-in:
``LIGHTRFT_RUN_SLOW=1 uv run --package lightrft-deepspeed pytest packages/lightrft-deepspeed -k adam_offload``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from lightrft.testing import run_distributed
from lightrft.testing.conformance import BASE_CONFIG, check_results, run_checks
from lightrft.testing.tolerance import norm_rtol, parity_loss_atol

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
    for r in check_results(out, "adam_offload_zero2"):
        assert r["optimizer"] == "DeepSpeedCPUAdam"
        # Fake averages its 4 micro-batch losses in another order than 2 ranks x 2, and later losses
        # move with the parameters' measured distance, to first order (tolerance.parity_loss_atol);
        # the norm's squares are summed in another order (tolerance.norm_rtol).
        micro = BASE_CONFIG["train_batch_size"] // BASE_CONFIG["micro_train_batch_size"]
        dp = float((r["params"] - fake["params"]).double().norm())
        for a, b, norm in zip(r["losses"], fake["losses"], fake["norms"]):
            assert abs(a - b) <= parity_loss_atol(b, norm, dp, micro), (a, b, dp)
        assert r["norms"] == pytest.approx(fake["norms"], rel=norm_rtol(fake["params"].numel()))
        # Not derived (issue 16 item 2, open): DeepSpeedCPUAdam's own arithmetic against torch's
        # AdamW, with Adam's default eps (1e-8), where no tolerance on the gradients bounds the
        # parameters (lightrft.testing.tolerance, PARITY_ADAM_EPS). Kept until the run uses it.
        assert torch.allclose(r["params"], fake["params"], atol=1e-5, rtol=1e-4)
