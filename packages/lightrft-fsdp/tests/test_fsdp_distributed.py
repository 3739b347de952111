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
from lightrft.testing.tolerance import (
    PARITY_ADAM_EPS,
    adam_step_atol,
    norm_rtol,
    parity_loss_atol,
    parity_param_atol,
)

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
    # Every run trains with Adam's eps of the parity runs: with the default 1e-8 no bound on the
    # gradients' reduction order bounds the parameters (lightrft.testing.tolerance).
    "adam_eps": PARITY_ADAM_EPS,
}
#: Adam's betas of every run (the config's default), for the bounds.
BETAS = (0.9, 0.95)


def param_atol(steps: int, micro_steps: int, n_elements: int, first_step: int = 1) -> float:
    """Per element, how far two runs of ``steps`` optimizer steps of CONFIG that differ in their
    reduction order (``micro_steps`` micro-batch gradients summed per rank then across ranks, or
    all on one rank) may lie apart: tolerance.parity_param_atol (the gradients' sum orders through
    Adam's Lipschitz bound at PARITY_ADAM_EPS, and the clip factor's norm order), at lr <= 1e-2."""
    return parity_param_atol(
        CONFIG["actor_learning_rate"],
        steps,
        micro_steps,
        CONFIG["max_norm"],
        n_elements,
        PARITY_ADAM_EPS,
        betas=BETAS,
        first_step=first_step,
    )


def assert_run_close(
    losses: list[float],
    norms: list[float],
    params: dict[str, Any],
    ref: dict[str, Any],
    micro_steps: int,
    first_step: int = 1,
) -> None:
    """A run against a reference run of the same steps that reduced in another order: parameters
    per element within param_atol, losses within tolerance.parity_loss_atol (the micro-batch losses'
    mean in another order, then the parameters' measured distance to first order), norms within
    tolerance.norm_rtol (the squares summed per shard, then across ranks)."""
    a, b = flat(params), flat(ref["params"])
    diff = (a - b).abs()
    atol = param_atol(len(ref["losses"]), micro_steps, b.numel(), first_step)
    assert float(diff.max()) <= atol, (float(diff.max()), atol)
    dp = float(diff.double().norm())
    for x, y, norm in zip(losses, ref["losses"], ref["norms"], strict=True):
        assert abs(x - y) <= parity_loss_atol(y, norm, dp, micro_steps), (x, y, dp)
    assert norms == pytest.approx(ref["norms"], rel=norm_rtol(b.numel()))


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
    assert optim.param_groups[0]["eps"] == PARITY_ADAM_EPS and optim.param_groups[0]["betas"] == BETAS
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
        # Fake's 8 micro-batch gradients and losses summed in another order (2 ranks x 4): the
        # parameters within parity_param_atol (6.9e-4 here; a wrong update moves elements by ~lr =
        # 1e-2), the losses within parity_loss_atol, the norms within norm_rtol (assert_run_close).
        assert_run_close(r["parity_losses"], r["parity_norms"], r["parity_params"], ref, 8)
        # The clip norm is the global norm over all parameters (the same float on every rank),
        # and clipping bit (norm > max_norm) so the comparison covers the clipped update.
        assert min(r["parity_norms"]) > CONFIG["max_norm"]
    assert main[0]["parity_norms"] == main[1]["parity_norms"]


def test_sequential_without_decoder_layers_shards_and_matches_fake(main: list[dict[str, Any]]) -> None:
    """Issue 7 item 2: a plain nn.Sequential is sharded (root, the embedding, the large Linear),
    warns once how to get per-layer units, and trains like FakeStrategy. Both sides run with one
    thread (rank_threads) and Adam eps PARITY_ADAM_EPS (CONFIG); they differ in reduction order
    only, so each tolerance below is derived in lightrft.testing.tolerance from fp32's unit
    roundoff and the number of summed terms."""
    ref = fake_training(CONFIG, model_seed=31, data_seed=32, steps=3, make_model=make_sequential_lm)
    micro = ref["accumulated_gradient"]  # Fake sums 8 micro-batch gradients; 2 ranks x 4 here
    for r in main:
        assert r["seq_units"] == ["0", "1", "<root>"]
        assert len(r["seq_warnings"]) == 1 and "Sequential has no submodule" in r["seq_warnings"][0]
        assert r["seq_all_dtensor"] is True
        # Parameters within parity_param_atol (7.3e-4 here; a wrong update moves elements by ~lr =
        # 1e-2), losses within parity_loss_atol, the norm's 1.18M squares within norm_rtol (1.3e-3).
        assert_run_close(r["seq_losses"], r["seq_norms"], r["seq_params"], ref, micro)
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
        fused, foreach = r["fused_path"], r["foreach_path"]
        assert fused["fused"] is True and foreach["fused"] is False
        for path in (fused, foreach):
            assert not math.isfinite(path["bad_norm"])
            assert path["unchanged"] == 0.0
            assert path["skipped"] == 1
            assert path["lr_unchanged"] is True
            # Two real steps: the skipped one did not advance Adam's step counters.
            assert path["adam_steps"] == [2.0]
            assert path["grads_cleared"] is True
        # The first step starts from one state on both paths: the same parameters, data and thread
        # count, and the same norm and clip code (total_grad_norm, clip_grads_with_norm): its loss
        # and norm are bitwise equal.
        assert max_diff(fused["initial"], foreach["initial"]) == 0.0
        assert fused["losses"][0] == foreach["losses"][0]
        assert fused["norms"][0] == foreach["norms"][0]
        # Its update: two Adam kernels (fused, foreach) on the same state and gradients, each within
        # gamma(20) (|p| + lr U_1) of the exact AdamW step, per element (tolerance.adam_step_atol).
        p0 = flat(foreach["initial"])
        diff = (flat(fused["after_one"]) - flat(foreach["after_one"])).abs()
        bound = adam_step_atol(p0.abs(), CONFIG["actor_learning_rate"], 1, tuple(foreach["betas"]))
        assert bool((diff <= bound).all()), float((diff - bound).max())
        # The second step's loss: the same data and reduction order on parameters diff apart, to
        # first order (tolerance.parity_loss_atol with one order: micro_steps=1). The second step's
        # norm and update are not compared: they differ by the gradient's response to the
        # parameters' difference (the model's Hessian), which no arithmetic bounds.
        dp = float(diff.double().norm())
        a, b = fused["losses"][1], foreach["losses"][1]
        assert abs(a - b) <= parity_loss_atol(b, foreach["norms"][1], dp, 1), (a, b, dp)


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
        assert two["lr"] == one_rank_saved["lr"]
        # The same global batches from the same loaded state (Adam steps 3 and 4) train the same up
        # to the reduction order: 8 micro-batch gradients on one rank against 2 x 4 (assert_run_close).
        assert_run_close(two["losses"], two["norms"], two["params"], one_rank_saved, 8, first_step=3)


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
    assert one["lr"] == two["xw_lr"]
    # As in test_one_rank_checkpoint_loads_on_two_ranks, the other way round.
    ref = {"losses": two["xw_losses"], "norms": two["xw_norms"], "params": two["xw_params"]}
    assert_run_close(one["losses"], one["norms"], one["params"], ref, 8, first_step=3)


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
        # As in test_loss_norm_and_param_parity_with_fake: 8 micro-batch gradients summed per rank,
        # then across the replicas and the shards (assert_run_close).
        assert_run_close(r["losses"], r["norms"], r["params"], ref, ref["accumulated_gradient"])
