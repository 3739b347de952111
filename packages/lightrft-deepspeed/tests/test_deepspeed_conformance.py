"""The shared conformance suite on 2 gloo ranks (CPU, fp32) at ZeRO stages 1, 2 and 3, measured in
one torchrun launch (``launch_group``: each rank's imports of torch, DeepSpeed and torch._dynamo
cost ~10 s of CPU, more than a stage's checks)."""

from __future__ import annotations

import pytest

conformance = pytest.importorskip(
    "lightrft.testing.conformance", reason="lightrft-testing has no conformance suite"
)


class TestDeepspeedZero1Conformance(conformance.StrategyConformanceSuite):
    strategy_name = "deepspeed"
    world_size = 2
    launch_group = "zero-stages"
    config_overrides = {"zero_stage": 1, "bf16": False}


class TestDeepspeedZero2Conformance(conformance.StrategyConformanceSuite):
    strategy_name = "deepspeed"
    world_size = 2
    launch_group = "zero-stages"
    config_overrides = {"zero_stage": 2, "bf16": False}


class TestDeepspeedZero3Conformance(conformance.StrategyConformanceSuite):
    strategy_name = "deepspeed"
    world_size = 2
    launch_group = "zero-stages"
    # Partition every parameter (DeepSpeed keeps small ones whole by default), so that gathering,
    # EMA and weight buckets are really exercised on the tiny model.
    config_overrides = {
        "zero_stage": 3,
        "bf16": False,
        "deepspeed_config": {"zero_optimization": {"stage3_param_persistence_threshold": 0}},
    }
