"""FSDPV2Strategy on CPU (gloo). One torchrun launch of 2 ranks runs most checks; a group of one
rank in this process writes and reads the checkpoints that move between 1 and 2 ranks; one launch
runs hybrid sharding on 4 ranks."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch.distributed as dist
from torch import nn

from lightrft.strategy import get_fake_strategy
from lightrft.testing import (
    call,
    make_batches,
    make_sequential_lm,
    make_tiny_model,
    rank_threads,
    run_distributed,
)
from lightrft.testing.harness import build, flat, max_diff, train
from lightrft.testing.tolerance import PARITY_ADAM_EPS, norm_rtol, parity_loss_atol, parity_param_atol

#: Where the rank-side functions (``fsdp_rank_checks``) live, for run_distributed and call.
HERE = Path(__file__).resolve().parent

CONFIG: dict[str, Any] = {
    "strategy": "fsdp",
    "seed": 3,
    "bf16": False,
    "train_batch_size": 16,
    "micro_train_batch_size": 2,
    "max_norm": 0.3,
    "actor_learning_rate": 1e-2,
    "l2": 0.01,
    "lr_warmup_ratio": 0.2,
}
#: Not derived (issue 16 item 2, open): the parameter comparisons across reduction orders below
#: train with Adam's default eps (1e-8), where no tolerance on the gradients bounds the parameters
#: (lightrft.testing.tolerance, PARITY_ADAM_EPS); deriving one needs the rank side to train these
#: runs with PARITY_ADAM_EPS, and the checkpoint runs to return their norms. Kept until then.
ATOL = 1e-5


def fake_training(
    config: dict[str, Any],
    model_seed: int,
    data_seed: int,
    steps: int,
    make_model: Callable[[int], nn.Module] = make_tiny_model,
    **optimizer_kwargs: Any,
) -> dict[str, Any]:
    """FakeStrategy on the whole global batch: the reference for the data-parallel run, computed
    with the ranks' thread count (rank_threads), whatever OMP_NUM_THREADS the shell has."""
    cfg = {k: v for k, v in config.items() if k not in ("strategy", "fsdp_shard_size")}
    fake = get_fake_strategy(cfg)
    with rank_threads():
        model, optim, sched = build(fake, make_model(model_seed), **optimizer_kwargs)
        run = train(fake, model, optim, sched, make_batches(data_seed, steps, cfg["train_batch_size"]))
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    return {**run, "params": params, "accumulated_gradient": fake.accumulated_gradient}


@pytest.fixture(scope="module")
def ckpt_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fsdp")


@pytest.fixture(scope="module")
def solo_group() -> Any:
    """A process group of one rank in this process (saves a launch); removed afterwards, with
    the environment variables that setting it up wrote."""
    with pytest.MonkeyPatch.context() as mp:
        for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            mp.delenv(var, raising=False)
        yield
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.fixture(scope="module")
def one_rank_saved(solo_group: Any, ckpt_root: Path) -> dict[str, Any]:
    return call(
        "fsdp_rank_checks:save_checkpoint_after_training",
        {"config": CONFIG, "save_dir": str(ckpt_root / "ckpt1")},
        pythonpath=HERE,
    )


@pytest.fixture(scope="module")
def main(ckpt_root: Path, one_rank_saved: dict[str, Any]) -> list[dict[str, Any]]:
    return run_distributed(
        "fsdp_rank_checks:main_checks", 2, {"config": CONFIG, "tmp": str(ckpt_root)}, pythonpath=HERE
    )


# ------------------------------------------------------------------------------ sharding
def test_units_mesh_and_placements(main: list[dict[str, Any]]) -> None:
    for r in main:
        assert r["mesh_shape"] == [2]
        # Each decoder layer, both embeddings, the head, and the root are FSDP units.
        assert r["units"] == ["<root>", "embed", "layers.0", "layers.1", "lm_head", "pos"]
        assert r["placements"] == ["Shard(0)"] and r["all_dtensor"]
        assert (r["local_rows"], r["full_rows"]) == (32, 64)


def test_optimizer_groups(main: list[dict[str, Any]]) -> None:
    r = main[0]
    assert r["fused"] is False  # CPU
    # Decayed weights; biases and LayerNorm weights without decay.
    assert r["groups_wd"] == [0.01, 0.0]
    assert r["groups_sizes"] == [2 + 2 * 2 + 1, 2 * 4 + 2]


# ------------------------------------------------------------------------------ training
def test_loss_norm_and_param_parity_with_fake(main: list[dict[str, Any]]) -> None:
    ref = fake_training(CONFIG, model_seed=11, data_seed=5, steps=3)
    assert ref["accumulated_gradient"] == 8
    for r in main:
        assert r["accumulated_gradient"] == 4
        assert r["parity_steps"] == [12, 3, 0]
        # The 8 micro-batch losses averaged in another order (2 ranks x 4), and later the measured
        # distance of the parameters, to first order (tolerance.parity_loss_atol).
        dp = float((flat(r["parity_params"]) - flat(ref["params"])).double().norm())
        for a, b, norm in zip(r["parity_losses"], ref["losses"], ref["norms"]):
            assert abs(a - b) <= parity_loss_atol(b, norm, dp, ref["accumulated_gradient"]), (a, b, dp)
        # The clip norm is the global norm over all parameters (the same float on every rank),
        # and clipping bit (norm > max_norm) so the comparison covers the clipped update. Its
        # squares are summed per shard then across ranks (tolerance.norm_rtol).
        n = flat(ref["params"]).numel()
        assert r["parity_norms"] == pytest.approx(ref["norms"], rel=norm_rtol(n))
        assert min(r["parity_norms"]) > CONFIG["max_norm"]
        assert max_diff(r["parity_params"], ref["params"]) < ATOL
    assert main[0]["parity_norms"] == main[1]["parity_norms"]


def test_sequential_without_decoder_layers_shards_and_matches_fake(main: list[dict[str, Any]]) -> None:
    """Issue 7 item 2: a plain nn.Sequential is sharded (root, the embedding, the large Linear),
    warns once how to get per-layer units, and trains like FakeStrategy. Both sides run with one
    thread (rank_threads) and Adam eps PARITY_ADAM_EPS; they differ in reduction order only, so each
    tolerance below is derived in lightrft.testing.tolerance from fp32's unit roundoff and the
    number of summed terms."""
    ref = fake_training(
        CONFIG, model_seed=31, data_seed=32, steps=3, make_model=make_sequential_lm, eps=PARITY_ADAM_EPS
    )
    micro = ref["accumulated_gradient"]  # Fake sums 8 micro-batch gradients; 2 ranks x 4 here
    ref_flat = flat(ref["params"])
    # Every element: the gradients' reduction order through Adam's Lipschitz bound, 3 steps at
    # lr <= 1e-2 (7.3e-4 here; an update that went wrong moves elements by ~lr = 1e-2).
    param_atol = parity_param_atol(
        CONFIG["actor_learning_rate"], 3, micro, CONFIG["max_norm"], ref_flat.numel(), PARITY_ADAM_EPS
    )
    for r in main:
        assert r["seq_units"] == ["0", "1", "<root>"]
        assert len(r["seq_warnings"]) == 1 and "Sequential has no submodule" in r["seq_warnings"][0]
        assert r["seq_all_dtensor"] is True
        diff = (flat(r["seq_params"]) - ref_flat).abs()
        assert float(diff.max()) <= param_atol, (float(diff.max()), param_atol)
        dp = float(diff.double().norm())
        # The first loss is the same 8 micro-batch losses averaged in another order; later ones also
        # move with the parameters' measured distance, to first order (tolerance.parity_loss_atol).
        for a, b, norm in zip(r["seq_losses"], ref["losses"], ref["norms"]):
            assert abs(a - b) <= parity_loss_atol(b, norm, dp, micro), (a, b, dp)
        # The norm sums 1.18M squares per shard then across ranks (tolerance.norm_rtol: 1.3e-3).
        assert r["seq_norms"] == pytest.approx(ref["norms"], rel=norm_rtol(ref_flat.numel()))
        assert min(r["seq_norms"]) > CONFIG["max_norm"]  # clipping bit


def test_no_gradient_sync_before_the_boundary(main: list[dict[str, Any]]) -> None:
    for r in main:
        steps = r["no_sync"]
        assert [s["boundary"] for s in steps] == [False, False, False, True]
        assert [s["reductions"] for s in steps[:3]] == [0, 0, 0]
        assert steps[3]["reductions"] > 0
        # Nothing was reduce-scattered into the sharded gradients before the boundary ...
        assert [s["sharded_grads"] for s in steps[:3]] == [0, 0, 0]
        assert steps[3]["sharded_grads"] == r["num_params"]
        # ... and the local (unsharded) gradients differ between the ranks: each saw its own data.
        assert steps[0]["local_grad_numel"] > 0
        assert steps[0]["rank_grad_diff"] > 1e-4


def test_non_finite_norm_skips_on_both_optimizer_paths(main: list[dict[str, Any]]) -> None:
    for r in main:
        assert r["fused_path"]["fused"] is True and r["foreach_path"]["fused"] is False
        for path in (r["fused_path"], r["foreach_path"]):
            assert not math.isfinite(path["bad_norm"])
            assert path["unchanged"] == 0.0
            assert path["skipped"] == 1
            assert path["lr_unchanged"] is True
            # Two real steps: the skipped one did not advance Adam's step counters.
            assert path["adam_steps"] == [2.0]
            assert path["grads_cleared"] is True
        # Not yet of either kind (issue 16 item 2, open): the two paths are different Adam kernels
        # (the fused one orders its products differently), so their first updates may differ by a
        # rounding; the second step's gradients then differ by an amount the arithmetic does not
        # bound, and Adam's default eps (1e-8) divides that by the gradients' own size. A derived
        # bound needs the rank side to compare one update from one state; these thresholds are
        # the earlier ones, kept until it does.
        assert r["fused_vs_foreach_loss_diff"] < 1e-6
        assert r["fused_vs_foreach_norm_diff"] < 1e-6
        assert r["fused_vs_foreach_param_diff"] < 1e-6


def test_activation_checkpointing_keeps_numbers(main: list[dict[str, Any]]) -> None:
    for r in main:
        # Bitwise by construction: the same model, data, sharding and thread count (run_distributed
        # gives every rank RANK_THREADS); recomputation repeats the forward's ops in their order.
        assert r["ac_loss_diff"] == 0.0
        assert r["ac_param_diff"] == 0.0
        assert r["ac_llama_enabled"] is True
        assert math.isfinite(r["ac_llama_loss"]) and r["ac_llama_loss"] > 1.0


def test_ema_into_unsharded_model(main: list[dict[str, Any]]) -> None:
    for r in main:
        assert r["ema_moved"] > 1e-3
        # Bitwise by construction: moving_average computes beta * ema + (1 - beta) * full, the
        # same two products and one sum as the check's 0.75 * initial + 0.25 * trained, on the
        # same floats (full_tensor gathers them unchanged).
        assert r["ema_plain_diff"] == 0.0


def test_weight_buckets_complete_equal_and_bounded(main: list[dict[str, Any]]) -> None:
    for r in main:
        assert r["bucket_names"] == r["bucket_expected"]
        assert r["bucket_max_diff"] == 0.0
        assert len(r["bucket_sizes"]) > 2
        for sizes in r["bucket_sizes"]:
            # A bucket stays within the budget unless one tensor alone is larger.
            assert sum(sizes) <= r["bucket_budget"] or len(sizes) == 1
            assert sum(sizes) <= max(r["bucket_budget"], r["bucket_largest"])


def test_optimizer_offload_round_trip_keeps_training(main: list[dict[str, Any]]) -> None:
    for r in main:
        assert r["offload_param_diff"] == 0.0
        assert r["offload_devices"] == ["cpu"]


# ------------------------------------------------------------------------- model files
def test_save_model_loads_in_transformers_with_identical_logits(main: list[dict[str, Any]]) -> None:
    r = main[0]
    assert r["hf_class"] == "LlamaForCausalLM"
    assert r["hf_architectures"] == ["LlamaForCausalLM"]
    assert "config.json" in r["hf_files"] and any(f.endswith(".safetensors") for f in r["hf_files"])
    # Bitwise by construction: save_model writes the fp32 weights unrounded and transformers
    # runs the same LlamaForCausalLM ops on them, in the same rank, with the same thread count.
    assert r["hf_logit_diff"] == 0.0


def test_meta_init_shards_then_loads_weights(main: list[dict[str, Any]]) -> None:
    for r in main:
        assert r["meta_built"] is True and r["meta_after_shard"] is False
        # Each rank holds about half of the parameters.
        assert r["meta_local_numel"] <= r["full_numel"] // 2 + 64
        # Bitwise by construction: the same saved weights, model class, sharding and thread count.
        assert r["meta_logit_diff"] == 0.0
        first, second = r["meta_train_losses"]
        assert second < first


# -------------------------------------------------------------------------- checkpoints
def test_one_rank_checkpoint_loads_on_two_ranks(
    main: list[dict[str, Any]], one_rank_saved: dict[str, Any]
) -> None:
    for r in main:
        two = r["from_one"]
        assert two["world_size"] == 2
        assert max_diff(two["loaded"], one_rank_saved["saved"]) == 0.0
        assert two["client"] == {"note": "from 1 ranks"}
        # (micro_step, global_step): 2 optimizer steps of 4 micro-steps each on 2 ranks (8 on 1 rank).
        assert two["steps"] == [8, 2]
        # The same global batches on two ranks train the same (up to summation order).
        assert two["losses"] == pytest.approx(one_rank_saved["losses"], abs=ATOL)
        assert two["lr"] == one_rank_saved["lr"]
        assert max_diff(two["params"], one_rank_saved["params"]) < ATOL


def test_two_rank_checkpoint_loads_on_one_rank(
    main: list[dict[str, Any]], solo_group: Any, ckpt_root: Path
) -> None:
    from lightrft.strategy import get_strategy

    one = call(
        "fsdp_rank_checks:load_checkpoint_and_train",
        {"strategy": get_strategy(CONFIG), "load_dir": str(ckpt_root / "ckpt2")},
        pythonpath=HERE,
    )
    two = main[0]
    assert one["world_size"] == 1
    assert max_diff(one["loaded"], two["xw_saved"]) == 0.0
    assert one["client"] == {"note": "from 2 ranks"}
    # (micro_step, global_step): 2 optimizer steps of 8 micro-steps each on 1 rank.
    assert one["steps"] == [16, 2]
    assert one["losses"] == pytest.approx(two["xw_losses"], abs=ATOL)
    assert one["lr"] == two["xw_lr"]
    assert max_diff(one["params"], two["xw_params"]) < ATOL


# ------------------------------------------------------------------------ hybrid sharding
@pytest.mark.slow
def test_hybrid_sharding_on_four_ranks() -> None:
    config = {**CONFIG, "fsdp_shard_size": 2}
    results = run_distributed("fsdp_rank_checks:hybrid_checks", 4, {"config": config}, pythonpath=HERE)
    ref = fake_training(CONFIG, model_seed=11, data_seed=5, steps=2)
    for r in results:
        assert r["mesh_shape"] == [2, 2] and r["mesh_dims"] == ["replicate", "shard"]
        assert r["placements"] == ["Replicate", "Shard(0)"]
        assert r["local_rows"] == 32
        # As in test_loss_norm_and_param_parity_with_fake (tolerance.parity_loss_atol, norm_rtol).
        dp = float((flat(r["params"]) - flat(ref["params"])).double().norm())
        for a, b, norm in zip(r["losses"], ref["losses"], ref["norms"]):
            assert abs(a - b) <= parity_loss_atol(b, norm, dp, ref["accumulated_gradient"]), (a, b, dp)
        assert r["norms"] == pytest.approx(ref["norms"], rel=norm_rtol(flat(ref["params"]).numel()))
        assert max_diff(r["params"], ref["params"]) < ATOL
