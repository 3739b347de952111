"""The lightrft-testing conformance suite against FSDPV2Strategy: 2 gloo ranks on CPU, and
2 GPUs with NCCL and bf16 when they are there."""

from __future__ import annotations

import pytest

from lightrft.testing.conformance import StrategyConformanceSuite


class TestFSDPConformance(StrategyConformanceSuite):
    strategy_name = "fsdp"
    world_size = 2
    config_overrides = {"bf16": False}


@pytest.mark.gpu(2)
class TestFSDPConformanceGPUbf16(StrategyConformanceSuite):
    """NCCL and bf16 compute (fp32 master weights and reduction): parity within bf16 tolerance."""

    strategy_name = "fsdp"
    world_size = 2
    config_overrides = {"bf16": True}
    # Losses and norms of a bf16 run against FakeStrategy's fp32 one. Not derived (issue 16 item 2,
    # open; GPU only, not run here): a bf16 forward's error grows through the layers by the
    # network's own constants. (The parameters' bound is derived: suite.assert_params_close.)
    atol = 6e-2
    rtol = 3e-2
