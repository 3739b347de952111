"""On 2 CUDA GPUs: the conformance suite with NCCL and bf16, and DeepSpeed-specific checks.

Skipped, with the reason, where fewer than 2 GPUs are visible (the ``gpu`` marker of
lightrft-testing's pytest plugin).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from lightrft.testing import run_distributed
from lightrft.testing.conformance import StrategyConformanceSuite
from lightrft.testing.conformance import check_results as result

pytestmark = pytest.mark.gpu(2)
HERE = Path(__file__).resolve().parent

#: NVLink multicast off (see the GPU machine's notes); children inherit the rest.
NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


class _GpuBf16Suite(StrategyConformanceSuite):
    strategy_name = "deepspeed"
    world_size = 2
    # Losses and norms of a bf16 run against FakeStrategy's fp32 one. Not derived (issue 16 item 2,
    # open; GPU only, not run here): a bf16 forward's error grows through the layers by the
    # network's own constants. (The parameters' bound is derived: suite.assert_params_close.)
    atol = 5e-2
    rtol = 5e-2
    launch_env = NCCL_ENV


class TestDeepspeedZero1ConformanceGPU(_GpuBf16Suite):
    config_overrides = {"zero_stage": 1, "bf16": True}


class TestDeepspeedZero2ConformanceGPU(_GpuBf16Suite):
    config_overrides = {"zero_stage": 2, "bf16": True}


class TestDeepspeedZero3ConformanceGPU(_GpuBf16Suite):
    config_overrides = {
        "zero_stage": 3,
        "bf16": True,
        "deepspeed_config": {"zero_optimization": {"stage3_param_persistence_threshold": 0}},
    }


_RESULTS: dict[str, list[dict[str, Any]]] = {}


def gpu_check(name: str) -> list[dict[str, Any]]:
    """Runs one check of deepspeed_rank_checks on 2 GPUs, in its own launch (cached): a hang or a crash fails
    that check alone, named, with the ranks' stderr. One launch per check costs ~15 s of start-up
    each, but one launch for all of them ran past its limit on 2 x H100 (the first also builds
    FusedAdam), and then every check failed without saying which one was slow."""
    if name not in _RESULTS:
        _RESULTS[name] = run_distributed(
            "deepspeed_rank_checks:run",
            world_size=2,
            kwargs={"names": [name], "overrides": {"bf16": True}},
            env=NCCL_ENV,
            timeout=180,
            pythonpath=HERE,
        )
    return _RESULTS[name]


@pytest.mark.parametrize("stage", [2, 3])
def test_gpu_training_uses_fused_adam_in_bf16(stage: int) -> None:
    for r in result(gpu_check(f"gpu_training_zero{stage}"), f"gpu_training_zero{stage}"):
        assert r["basic_optimizer"] == "FusedAdam"
        assert r["param_dtype"] == "torch.bfloat16"
        assert all(math.isfinite(n) for n in r["norms"])
        assert r["losses"][-1] < r["losses"][0] - 0.05  # the same batch six times: the loss falls


@pytest.mark.parametrize("stage", [2, 3])
def test_gpu_save_model_round_trip(stage: int) -> None:
    r0 = result(gpu_check(f"hf_save_zero{stage}"), f"hf_save_zero{stage}")[0]
    assert "model.safetensors" in r0["files"]
    # Not derived (issue 16 item 2, open; GPU only, not run here): the same bf16 weights on the
    # same GPU, but the engine's forward and transformers' may pick different GEMM kernels, and a
    # one-ulp (2**-8 relative) difference in one layer's output grows through the later layers by
    # the network's Lipschitz constants, which no returned number bounds. Kept until the check
    # returns a derivable quantity (or pins the kernels and compares exactly).
    assert r0["max_diff"] <= 1e-2


def test_gpu_zero_init_load_model() -> None:
    for r in result(gpu_check("zero_init_load_model"), "zero_init_load_model"):
        assert r["partitioned"] == r["num_params"]
        # Not derived (issue 16 item 2, open; GPU only, not run here): a bf16 model's logits against
        # the fp32 reference's, whose difference grows through the layers by the network's own
        # constants (as in test_gpu_save_model_round_trip).
        assert r["max_diff"] <= 5e-2


@pytest.mark.parametrize("stage", [2, 3])
def test_gpu_skip_keeps_optimizer_state(stage: int) -> None:
    for r in result(gpu_check(f"skip_state_zero{stage}"), f"skip_state_zero{stage}"):
        assert not math.isfinite(r["bad_norm"]) and r["unchanged"]
        assert r["skipped"] == 1 and r["epoch_after_bad"] == r["epoch_before"]


def test_gpu_zero3_buckets() -> None:
    for r in result(gpu_check("zero3_buckets"), "zero3_buckets"):
        assert r["names"] == r["expected_names"]
        assert r["max_gathered"] <= max(r["bucket_bytes"], r["largest"]) < r["total"]
