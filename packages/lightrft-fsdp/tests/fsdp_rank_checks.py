"""Functions run on every rank by ``lightrft.testing.run_distributed`` (named
``"fsdp_rank_checks:<function>"``, found through ``pythonpath=`` this directory). They measure with
the pieces of ``lightrft.testing.harness``; the tests assert."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from lightrft.strategy import get_strategy
from lightrft.testing import (
    causal_lm_loss,
    make_batches,
    make_sequential_lm,
    make_tiny_llama,
    make_tiny_model,
)
from lightrft.testing.harness import build, count_reductions, full_params, rank_share, shared_tmpdir, train

LLAMA_VOCAB = 128


# ------------------------------------------------------------------------------------ helpers
def placement_names(p: DTensor) -> list[str]:
    """Placements as ``Shard(0)`` / ``Replicate`` (their str() differs between torch versions)."""
    return [f"Shard({pl.dim})" if pl.is_shard() else type(pl).__name__ for pl in p.placements]


def state_storage_devices(optim: Any) -> list[str]:
    """Where the optimizer states' storage is (a DTensor's local shard, not its wrapper)."""
    return sorted(
        {
            (v.to_local() if isinstance(v, DTensor) else v).device.type
            for st in optim.state.values()
            for v in st.values()
            if torch.is_tensor(v)
        }
    )


def unsharded_grads(model: Any) -> list[torch.Tensor]:
    """The gradients FSDP2 keeps unsharded (and unreduced) while gradient sync is off."""
    out = []
    for module in model.modules():
        if not isinstance(module, FSDPModule):
            continue
        state = module._get_fsdp_state()
        groups = getattr(state, "_fsdp_param_groups", None)
        if groups is None:
            group = getattr(state, "_fsdp_param_group", None)
            groups = [group] if group is not None else []
        for group in groups:
            for fp in group.fsdp_params:
                grad = getattr(fp, "unsharded_accumulated_grad", None)
                if grad is None:
                    grad = fp._unsharded_param.grad if hasattr(fp, "_unsharded_param") else None
                if grad is not None:
                    out.append(grad.detach().float().reshape(-1).cpu())
    return out


# ------------------------------------------------------------------------ 2-rank main launch
def main_checks(config: dict[str, Any], tmp: str) -> dict[str, Any]:
    """Everything that needs two ranks and no other launch, each measured on fresh models."""
    out: dict[str, Any] = {}
    strategy = get_strategy(config)
    out["rank"] = strategy.get_rank()
    out["mesh_shape"] = list(strategy.mesh.shape)
    out.update(_units_and_dtypes(strategy))
    out.update(_parity(strategy, config))
    out.update(_sequential(strategy, config))
    out.update(_no_sync(strategy))
    out.update(_fused_skip_on_device(strategy))
    out.update(_activation_checkpointing(strategy, config))
    out.update(_ema_to_plain(strategy))
    out.update(_weight_buckets(strategy))
    out.update(_optimizer_offload(strategy))
    out.update(_hf_save_and_meta_load(strategy, tmp))
    out.update(_cross_world_save(strategy, tmp))
    return out


def _units_and_dtypes(strategy: Any) -> dict[str, Any]:
    model = strategy.prepare_model(make_tiny_model(0))
    units = sorted(name or "<root>" for name, m in model.named_modules() if isinstance(m, FSDPModule))
    p = model.layers[0].up.weight
    return {
        "units": units,
        "placements": placement_names(p),
        "local_rows": p.to_local().shape[0],
        "full_rows": p.shape[0],
        "all_dtensor": all(isinstance(q, DTensor) for q in model.parameters()),
    }


def _parity(strategy: Any, config: dict[str, Any]) -> dict[str, Any]:
    model, optim, sched = build(strategy, make_tiny_model(11))
    run = train(strategy, model, optim, sched, make_batches(5, 3, config["train_batch_size"]))
    st = strategy.train_state(model)
    return {
        "parity_losses": run["losses"],
        "parity_norms": run["norms"],
        "parity_params": full_params(strategy, model),
        "parity_steps": [st.micro_step, st.global_step, st.skipped_steps],
        "accumulated_gradient": strategy.accumulated_gradient,
        "fused": bool(optim.defaults.get("fused")),
        "groups_wd": [g["weight_decay"] for g in optim.param_groups],
        "groups_sizes": [len(g["params"]) for g in optim.param_groups],
    }


def _sequential(strategy: Any, config: dict[str, Any]) -> dict[str, Any]:
    """A plain nn.Sequential (no decoder-layer class): sharded at the root with its large Linear as
    a unit of its own (and the embedding), then trained like any model."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = strategy.prepare_model(make_sequential_lm(31))
        strategy.prepare_model(make_sequential_lm(31))  # a second model of the class: no second warning
    units = sorted(name or "<root>" for name, m in model.named_modules() if isinstance(m, FSDPModule))
    # Adam's eps is the config's: PARITY_ADAM_EPS (test_fsdp_distributed.CONFIG).
    model, optim, sched = build(strategy, model)
    run = train(strategy, model, optim, sched, make_batches(32, 3, config["train_batch_size"]))
    return {
        "seq_units": units,
        "seq_warnings": [str(w.message) for w in caught if "no_split_modules" in str(w.message)],
        "seq_all_dtensor": all(isinstance(p, DTensor) for p in model.parameters()),
        "seq_losses": run["losses"],
        "seq_norms": run["norms"],
        "seq_params": full_params(strategy, model),
    }


def _no_sync(strategy: Any) -> dict[str, Any]:
    """Before the boundary: no reduction, no sharded gradient, local gradients that differ per rank."""
    model, optim, sched = build(strategy, make_tiny_model(11))
    gb = make_batches(6, 1, strategy.config.train_batch_size)[0]
    micro = rank_share(strategy, gb)
    record: list[dict[str, Any]] = []
    for i, mb in enumerate(micro):
        boundary = strategy.is_accumulation_boundary(model)
        loss = causal_lm_loss(model, mb)
        with count_reductions() as counter:
            strategy.backward(loss, model, optim)
        entry = {
            "boundary": boundary,
            "reductions": counter.n,
            "sharded_grads": sum(p.grad is not None for p in model.parameters()),
        }
        if i == 0:
            local = torch.cat(unsharded_grads(model))
            gathered = strategy.all_gather(local[None])
            entry["local_grad_numel"] = local.numel()
            entry["rank_grad_diff"] = float((gathered[0] - gathered[-1]).abs().max())
        record.append(entry)
        strategy.optimizer_step(optim, model, sched)
    return {"no_sync": record, "num_params": len(list(model.parameters()))}


def _fused_skip_on_device(strategy: Any) -> dict[str, Any]:
    """The fused-optimizer path (the one CUDA takes: skip decided on the device, norm read after
    the update is queued) gives the foreach path's numbers and skips a non-finite step. The
    parameters are recorded before and after the first step (one update from one state)."""
    batches = make_batches(17, 3, strategy.config.train_batch_size)
    results = []
    for fused in (False, True):
        s = type(strategy)(strategy.config)
        s.setup_distributed()
        model = s.prepare_model(make_tiny_model(18))
        optim = s.create_optimizer(
            model, lr=s.config.actor_learning_rate, weight_decay=s.config.l2, fused=fused
        )
        model, optim, sched = s.prepare((model, optim, s.create_scheduler(optim, 10)))
        initial = full_params(s, model)
        first = train(s, model, optim, sched, batches[:1])
        after_one = full_params(s, model)
        second = train(s, model, optim, sched, batches[1:2])
        before = full_params(s, model)
        lr_before = [g["lr"] for g in optim.param_groups]
        bad_norm = None
        for mb in rank_share(s, batches[2]):
            s.backward(causal_lm_loss(model, mb) * float("nan"), model, optim)
            bad_norm = s.optimizer_step(optim, model, sched)
        after = full_params(s, model)
        results.append(
            {
                "fused": bool(optim.defaults.get("fused")),
                "losses": first["losses"] + second["losses"],
                "norms": first["norms"] + second["norms"],
                "initial": initial,
                "after_one": after_one,
                "betas": [float(b) for b in optim.param_groups[0]["betas"]],
                "bad_norm": bad_norm,
                "unchanged": max(float((after[k] - before[k]).abs().max()) for k in before),
                "skipped": s.skipped_steps,
                "lr_unchanged": [g["lr"] for g in optim.param_groups] == lr_before,
                "adam_steps": sorted({float(st["step"]) for st in optim.state.values()}),
                "grads_cleared": all(p.grad is None for p in model.parameters()),
            }
        )
    foreach, fused = results
    return {"fused_path": fused, "foreach_path": foreach}


def _activation_checkpointing(strategy: Any, config: dict[str, Any]) -> dict[str, Any]:
    """Recomputation changes memory, not numbers: same losses and parameters as without it."""
    batches = make_batches(7, 2, config["train_batch_size"])
    results = []
    for ac in (False, True):
        s = type(strategy)(config, gradient_checkpointing=ac)
        s.setup_distributed()
        model, optim, sched = build(s, make_tiny_model(12))
        run = train(s, model, optim, sched, batches)
        results.append((run["losses"], full_params(s, model)))
    (l0, p0), (l1, p1) = results
    llama = type(strategy)(config, gradient_checkpointing=True)
    llama.setup_distributed()
    lm, lo, ls = build(llama, make_tiny_llama(3, vocab_size=LLAMA_VOCAB))
    ids = make_batches(8, 1, config["train_batch_size"], vocab_size=LLAMA_VOCAB)
    run = train(llama, lm, lo, ls, ids)
    return {
        "ac_loss_diff": max(abs(a - b) for a, b in zip(l0, l1)),
        "ac_param_diff": max(float((p0[k] - p1[k]).abs().max()) for k in p0),
        "ac_llama_enabled": bool(getattr(lm, "is_gradient_checkpointing", False)),
        "ac_llama_loss": run["losses"][0],
    }


def _ema_to_plain(strategy: Any) -> dict[str, Any]:
    """EMA into an unsharded copy (e.g. on CPU) gathers each full parameter."""
    model, optim, sched = build(strategy, make_tiny_model(13))
    ema = make_tiny_model(13)
    initial = {k: v.detach().clone() for k, v in ema.named_parameters()}
    train(strategy, model, optim, sched, make_batches(9, 1, strategy.config.train_batch_size))
    trained = full_params(strategy, model)
    strategy.moving_average(model, ema, beta=0.75)
    diff = max(
        float((p - (0.75 * initial[k] + 0.25 * trained[k])).abs().max()) for k, p in ema.named_parameters()
    )
    moved = max(float((trained[k] - initial[k]).abs().max()) for k in initial)
    return {"ema_plain_diff": diff, "ema_moved": moved}


def _weight_buckets(strategy: Any) -> dict[str, Any]:
    model = strategy.prepare_model(make_tiny_llama(4, vocab_size=LLAMA_VOCAB), is_training=True)
    reference = make_tiny_llama(4, vocab_size=LLAMA_VOCAB)
    budget = 40_000
    sizes, names, max_diff = [], [], 0.0
    ref = dict(reference.named_parameters())
    for bucket in strategy.iter_weight_buckets(model, bucket_bytes=budget):
        sizes.append([t.numel() * t.element_size() for _, t in bucket])
        for n, t in bucket:
            names.append(n)
            max_diff = max(max_diff, float((t.cpu() - ref[n]).abs().max()))
    largest = max(p.numel() * p.element_size() for p in reference.parameters())
    return {
        "bucket_names": names,
        "bucket_expected": [n for n, _ in reference.named_parameters()],
        "bucket_sizes": sizes,
        "bucket_budget": budget,
        "bucket_largest": largest,
        "bucket_max_diff": max_diff,
    }


def _optimizer_offload(strategy: Any) -> dict[str, Any]:
    """Offload / reload between phases leaves training unchanged (on CPU: nothing to move)."""
    batches = make_batches(10, 2, strategy.config.train_batch_size)
    results = []
    for offload in (False, True):
        s = type(strategy)(strategy.config, adam_offload=offload)
        s.setup_distributed()
        model, optim, sched = build(s, make_tiny_model(14))
        for gb in batches:
            s.maybe_load_optimizer(optim)
            train(s, model, optim, sched, [gb])
            s.maybe_offload_optimizer(optim)
        devices = {v.device.type for st in optim.state.values() for k, v in st.items() if torch.is_tensor(v)}
        results.append((full_params(s, model), sorted(devices)))
    (p0, _), (p1, devices) = results
    return {
        "offload_param_diff": max(float((p0[k] - p1[k]).abs().max()) for k in p0),
        "offload_devices": devices,
    }


def _hf_save_and_meta_load(strategy: Any, tmp: str) -> dict[str, Any]:
    """save_model -> transformers.from_pretrained gives the same logits; a meta-initialised
    model sharded first and then filled with load_model gives them too."""
    with shared_tmpdir(strategy, "hf", root=tmp) as out_dir:
        return _hf_round_trips(strategy, out_dir)


def _hf_round_trips(strategy: Any, out_dir: Path) -> dict[str, Any]:
    model, optim, sched = build(strategy, make_tiny_llama(5, vocab_size=LLAMA_VOCAB))
    train(
        strategy,
        model,
        optim,
        sched,
        make_batches(11, 1, strategy.config.train_batch_size, vocab_size=LLAMA_VOCAB),
    )
    strategy.save_model(model, out_dir / "model")
    ids = make_batches(12, 1, 3, seq_len=10, vocab_size=LLAMA_VOCAB)[0]
    model.eval()
    with torch.no_grad():
        logits = model(ids).logits.float()
    result: dict[str, Any] = {}
    if strategy.is_rank_0():
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(out_dir / "model", torch_dtype=torch.float32).eval()
        with torch.no_grad():
            hf_logits = hf(ids).logits.float()
        result["hf_logit_diff"] = float((hf_logits - logits).abs().max())
        result["hf_class"] = type(hf).__name__
        result["hf_architectures"] = list(hf.config.architectures or [])
        result["hf_files"] = sorted(p.name for p in (out_dir / "model").iterdir())

    with strategy.init_model_context(meta_init=True):
        meta_model = make_tiny_llama(99, vocab_size=LLAMA_VOCAB)
    result["meta_built"] = all(p.is_meta for p in meta_model.parameters())
    meta_model = strategy.prepare_model(meta_model, is_training=True)
    result["meta_after_shard"] = any(p.is_meta for p in meta_model.parameters())
    result["meta_local_numel"] = sum(p.to_local().numel() for p in meta_model.parameters())
    result["full_numel"] = sum(p.numel() for p in meta_model.parameters())
    # The documented order: optimizer first (it holds the sharded parameters), weights after.
    optim2 = strategy.create_optimizer(meta_model, lr=1e-2, weight_decay=0.0)
    meta_model, optim2, _ = strategy.prepare((meta_model, optim2, None))
    strategy.load_model(meta_model, out_dir / "model")
    meta_model.eval()
    with torch.no_grad():
        meta_logits = meta_model(ids).logits.float()
    meta_model.train()
    result["meta_logit_diff"] = float((meta_logits - logits).abs().max())
    # ... and it trains: one step on a batch lowers the loss on it.
    batches = make_batches(13, 2, strategy.config.train_batch_size, vocab_size=LLAMA_VOCAB)
    result["meta_train_losses"] = train(strategy, meta_model, optim2, None, [batches[0], batches[0]])[
        "losses"
    ]
    return result


def _cross_world_save(strategy: Any, tmp: str) -> dict[str, Any]:
    """Loads the 1-rank checkpoint (written in the pytest process), trains 2 steps; then trains
    its own model 2 steps and saves a checkpoint for the 1-rank load; records 2 more steps."""
    one = load_checkpoint_and_train(strategy, str(Path(tmp) / "ckpt1"))
    root = (
        Path(tmp) / "ckpt2"
    )  # a fixed place: the 1-rank test in the pytest process loads it (save_ckpt makes it)
    model, optim, sched = build(strategy, make_tiny_model(15))
    batches = make_batches(16, 4, strategy.config.train_batch_size)
    train(strategy, model, optim, sched, batches[:2])
    strategy.save_ckpt(model, root, tag="two_ranks", client_state={"note": "from 2 ranks"})
    saved = full_params(strategy, model)
    after = train(strategy, model, optim, sched, batches[2:])
    return {
        "from_one": one,
        "xw_saved": saved,
        "xw_losses": after["losses"],
        "xw_norms": after["norms"],
        "xw_params": full_params(strategy, model),
        "xw_lr": [g["lr"] for g in optim.param_groups],
    }


# ------------------------------------------------------------------ resharding between worlds
def save_checkpoint_after_training(config: dict[str, Any], save_dir: str) -> dict[str, Any]:
    """Trains 2 steps, saves a checkpoint, trains 2 more (the reference for whoever loads it)."""
    strategy = get_strategy(config)
    model, optim, sched = build(strategy, make_tiny_model(15))
    batches = make_batches(16, 4, strategy.config.train_batch_size)
    train(strategy, model, optim, sched, batches[:2])
    strategy.save_ckpt(
        model, save_dir, tag="saved", client_state={"note": f"from {strategy.world_size} ranks"}
    )
    saved = full_params(strategy, model)
    after = train(strategy, model, optim, sched, batches[2:])
    return {
        "saved": saved,
        "losses": after["losses"],
        "norms": after["norms"],
        "params": full_params(strategy, model),
        "lr": [g["lr"] for g in optim.param_groups],
    }


def load_checkpoint_and_train(strategy: Any, load_dir: str) -> dict[str, Any]:
    """Loads a checkpoint written by another world size into a differently initialised model and
    trains the same 2 steps the writer trained after saving."""
    model, optim, sched = build(strategy, make_tiny_model(77))
    _, client = strategy.load_ckpt(model, load_dir)
    loaded = full_params(strategy, model)
    st = strategy.train_state(model)
    steps = [st.micro_step, st.global_step]
    batches = make_batches(16, 4, strategy.config.train_batch_size)
    after = train(strategy, model, optim, sched, batches[2:])
    return {
        "world_size": strategy.world_size,
        "loaded": loaded,
        "client": client,
        "steps": steps,
        "losses": after["losses"],
        "norms": after["norms"],
        "params": full_params(strategy, model),
        "lr": [g["lr"] for g in optim.param_groups],
    }


# ----------------------------------------------------------------------------- hybrid launch
def hybrid_checks(config: dict[str, Any]) -> dict[str, Any]:
    strategy = get_strategy(config)
    model, optim, sched = build(strategy, make_tiny_model(11))
    p = model.layers[0].up.weight
    run = train(strategy, model, optim, sched, make_batches(5, 2, config["train_batch_size"]))
    return {
        "mesh_shape": list(strategy.mesh.shape),
        "mesh_dims": list(strategy.mesh.mesh_dim_names or ()),
        "placements": placement_names(p),
        "local_rows": p.to_local().shape[0],
        "losses": run["losses"],
        "norms": run["norms"],
        "params": full_params(strategy, model),
    }


# -------------------------------------------------------------------------------- GPU launch
def gpu_checks(config: dict[str, Any], tmp: str) -> dict[str, Any]:
    """bf16 on 2 GPUs with NCCL: dtypes, training progress, CPU offload and optimizer offload."""
    out: dict[str, Any] = {}
    strategy = get_strategy(config)
    out["backend"] = str(dist.get_backend())
    model, optim, sched = build(
        strategy, make_tiny_llama(21, vocab_size=LLAMA_VOCAB, hidden_size=128), max_steps=20
    )
    seen: dict[str, str] = {}
    handle = model.model.layers[0].mlp.up_proj.register_forward_hook(
        lambda m, i, o: seen.update(weight=str(m.weight.dtype), output=str(o.dtype))
    )
    batches = make_batches(22, 8, strategy.config.train_batch_size, seq_len=32, vocab_size=LLAMA_VOCAB)
    run = train(strategy, model, optim, sched, [batches[0]] * 8)
    handle.remove()
    out["losses"] = run["losses"]
    out["norms"] = run["norms"]
    out["compute_dtypes"] = seen
    out["master_dtype"] = str(next(model.parameters()).dtype)
    out["param_device"] = str(next(model.parameters()).device.type)
    out["fused"] = bool(optim.defaults.get("fused"))
    out["state_dtype"] = str(next(iter(optim.state.values()))["exp_avg"].dtype)

    # Optimizer-state offload frees device memory; reload restores it and training continues
    # exactly as without the round trip.
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    ref_params = full_params(strategy, model)
    strategy.offload_optimizer(optim)
    out["offload_freed"] = before - torch.cuda.memory_allocated()
    out["state_bytes"] = sum(
        v.to_local().numel() * v.element_size() if isinstance(v, DTensor) else v.numel() * v.element_size()
        for st in optim.state.values()
        for k, v in st.items()
        if torch.is_tensor(v) and k != "step"
    )
    out["offload_devices"] = state_storage_devices(optim)
    out["offload_pinned"] = all(
        (v.to_local() if isinstance(v, DTensor) else v).is_pinned()
        for st in optim.state.values()
        for k, v in st.items()
        if torch.is_tensor(v) and k != "step"
    )
    strategy.reload_optimizer(optim)
    out["reload_devices"] = state_storage_devices(optim)
    out["params_unchanged_by_roundtrip"] = all(
        torch.equal(ref_params[k], v) for k, v in full_params(strategy, model).items()
    )
    out["after_reload_loss"] = train(strategy, model, optim, sched, [batches[1]])["losses"][0]

    # FSDP CPU offload: sharded parameters, gradients and optimizer states on the host.
    offload = type(strategy)(strategy.config, fsdp_cpu_offload=True)
    offload.setup_distributed()
    om, oo, osch = build(offload, make_tiny_llama(21, vocab_size=LLAMA_VOCAB, hidden_size=128), max_steps=20)
    orun = train(offload, om, oo, osch, [batches[0]] * 3)
    out["cpu_offload_param_device"] = str(next(om.parameters()).device.type)
    out["cpu_offload_pinned"] = bool(next(om.parameters()).to_local().is_pinned())
    out["cpu_offload_losses"] = orun["losses"]
    out["cpu_offload_fused"] = bool(oo.defaults.get("fused"))
    out["ref_losses_3"] = run["losses"][:3]

    # Meta-device init on GPUs: only the local shard is ever allocated.
    with strategy.init_model_context(meta_init=True):
        mm = make_tiny_llama(23, vocab_size=LLAMA_VOCAB, hidden_size=128)
    mm = strategy.prepare_model(mm)
    out["meta_local_device"] = str(next(mm.parameters()).to_local().device.type)
    return out
