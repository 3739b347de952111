"""FSDPV2Strategy on 2 GPUs with NCCL and bf16 (skipped, with the reason, without 2 GPUs)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from lightrft.testing import run_distributed

HERE = Path(__file__).resolve().parent

GPU_CONFIG: dict[str, Any] = {
    "strategy": "fsdp",
    "seed": 3,
    "bf16": True,
    "train_batch_size": 16,
    "micro_train_batch_size": 2,
    "max_norm": 1.0,
    "actor_learning_rate": 1e-2,
    "lr_warmup_ratio": 0.0,
}


@pytest.fixture(scope="module")
def gpu(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    tmp: Path = tmp_path_factory.mktemp("gpu")
    return run_distributed(
        "fsdp_rank_checks:gpu_checks", 2, {"config": GPU_CONFIG, "tmp": str(tmp)}, pythonpath=HERE
    )


@pytest.mark.gpu(2)
def test_bf16_training_on_two_gpus_with_nccl(gpu: list[dict[str, Any]]) -> None:
    for r in gpu:
        assert "nccl" in r["backend"]
        # bf16 compute, fp32 master weights and optimizer states, fused AdamW on CUDA.
        assert r["compute_dtypes"] == {"weight": "torch.bfloat16", "output": "torch.bfloat16"}
        assert r["master_dtype"] == "torch.float32" and r["state_dtype"] == "torch.float32"
        assert r["param_device"] == "cuda" and r["fused"] is True
        losses = r["losses"]
        # The same batch 8 times: the loss falls step after step.
        assert losses[-1] < 0.8 * losses[0] and losses[-1] < min(losses[:4]), losses
        assert all(n is not None and n > 0 for n in r["norms"])
    assert gpu[0]["losses"] == gpu[1]["losses"] and gpu[0]["norms"] == gpu[1]["norms"]


@pytest.mark.gpu(2)
def test_optimizer_state_offload_frees_and_restores(gpu: list[dict[str, Any]]) -> None:
    for r in gpu:
        assert r["offload_devices"] == ["cpu"] and r["offload_pinned"] is True
        assert r["offload_freed"] >= 0.9 * r["state_bytes"] > 0
        assert r["reload_devices"] == ["cuda"]
        assert r["params_unchanged_by_roundtrip"] is True
        assert r["after_reload_loss"] > 0


@pytest.mark.gpu(2)
def test_fsdp_cpu_offload_trains_like_on_gpu(gpu: list[dict[str, Any]]) -> None:
    for r in gpu:
        assert r["cpu_offload_param_device"] == "cpu" and r["cpu_offload_pinned"] is True
        assert r["cpu_offload_fused"] is False
        # Not derived (issue 16 item 2, open; GPU only, not run here): the first loss is the same
        # bf16 forward on the same weights, the later ones follow two Adam implementations (CPU
        # foreach, CUDA fused) with Adam's default eps (1e-8), whose rounding differences no
        # gradient tolerance bounds (lightrft.testing.tolerance, PARITY_ADAM_EPS). Kept until the
        # runs use PARITY_ADAM_EPS and return their parameters for tolerance.parity_loss_atol.
        assert r["cpu_offload_losses"] == pytest.approx(r["ref_losses_3"], abs=2e-2)


@pytest.mark.gpu(2)
def test_meta_init_allocates_on_gpu(gpu: list[dict[str, Any]]) -> None:
    for r in gpu:
        assert r["meta_local_device"] == "cuda"
