"""DeepSpeed-specific checks, run inside every rank of one torchrun launch (named
``"deepspeed_rank_checks:run"``, found through ``run_distributed(..., pythonpath=)`` this directory).

Each check measures and returns numbers with the pieces of ``lightrft.testing.harness``; the
assertions are in ``test_deepspeed_distributed.py`` / ``test_deepspeed_gpu.py``. One launch runs
them all (DeepSpeed's import and engine set-up dominate a launch), each on a strategy of its own
ZeRO stage, isolated by ``harness.run_isolated``.
"""

from __future__ import annotations

import contextlib
import importlib
import math
from collections.abc import Callable
from typing import Any

import torch

from lightrft.deepspeed import DeepspeedStrategy
from lightrft.deepspeed import strategy as ds_strategy
from lightrft.testing.conformance import BASE_CONFIG, DATA_SEED, MODEL_SEED
from lightrft.testing.conformance import CHECKS as CONFORMANCE_CHECKS
from lightrft.testing.harness import (
    build,
    flat,
    full_params,
    param_groups,
    run_isolated,
    shared_tmpdir,
    train,
)
from lightrft.testing.models import make_batches, make_sequential_lm, make_tiny_llama, make_tiny_model
from lightrft.testing.tolerance import PARITY_ADAM_EPS

CONFIG: dict[str, Any] = {**BASE_CONFIG, "bf16": False}
#: Partition every parameter under ZeRO-3 (DeepSpeed keeps small ones whole by default).
ZERO3_ALL_PARTITIONED = {"zero_optimization": {"stage3_param_persistence_threshold": 0}}
LLAMA_VOCAB = 128


def make_strategy(stage: int, **overrides: Any) -> DeepspeedStrategy:
    cfg = {**CONFIG, "zero_stage": stage, **overrides}
    if stage == 3 and "deepspeed_config" not in overrides:
        cfg["deepspeed_config"] = ZERO3_ALL_PARTITIONED
    strategy = DeepspeedStrategy(cfg)
    strategy.setup_distributed()
    return strategy


def _llama_ids(strategy: DeepspeedStrategy) -> torch.Tensor:
    return make_batches(5, 1, 2, seq_len=12, vocab_size=LLAMA_VOCAB)[0].to(strategy.device)


def _hf_loss(model: Any, ids: torch.Tensor) -> torch.Tensor:
    return model(ids, labels=ids).loss


def _train_llama(strategy: DeepspeedStrategy, model: Any, steps: int = 1) -> tuple[Any, Any, Any]:
    engine, optim, sched = build(strategy, model, lr=1e-2, weight_decay=0.01)
    batches = make_batches(11, steps, strategy.config.train_batch_size, seq_len=12, vocab_size=LLAMA_VOCAB)
    train(strategy, engine, optim, sched, batches, loss_fn=_hf_loss)
    return engine, optim, sched


# ------------------------------------------------------------------ checks
def check_hf_save_model(strategy: DeepspeedStrategy) -> dict[str, Any]:
    """Trains a tiny Llama one step, saves it, reloads it with transformers' AutoModelForCausalLM:
    the logits must equal the trained model's."""
    from transformers import AutoModelForCausalLM

    with strategy.init_model_context():
        model = make_tiny_llama(seed=3, vocab_size=LLAMA_VOCAB)
    engine, _, _ = _train_llama(strategy, model)
    ids = _llama_ids(strategy)
    engine.eval()
    with torch.no_grad():
        trained_logits = engine(ids).logits.float()
    with shared_tmpdir(strategy, "hf-save") as root:
        strategy.save_model(engine, root / "hf")
        # Every rank loads (transformers may run collectives of its own when a process group exists).
        loaded = AutoModelForCausalLM.from_pretrained(str(root / "hf"))
        loaded.to(device=strategy.device, dtype=strategy.param_dtype).eval()
        with torch.no_grad():
            logits = loaded(ids).logits.float()
        files = sorted(p.name for p in (root / "hf").iterdir())
    return {"stage": strategy.stage, "files": files, "max_diff": float((logits - trained_logits).abs().max())}


def check_gradient_checkpointing(strategy: DeepspeedStrategy) -> dict[str, Any]:
    """gradient_checkpointing=True turns on the model's activation checkpointing and trains to
    the same numbers as without it."""
    plain = make_strategy(strategy.stage)
    runs = {}
    for name, s in (("checkpointed", strategy), ("plain", plain)):
        engine, _, _ = _train_llama(s, make_tiny_llama(seed=9, vocab_size=LLAMA_VOCAB), steps=2)
        runs[name] = {
            "enabled": bool(s.unwrap_model(engine).is_gradient_checkpointing),
            "params": flat(full_params(s, engine)),
        }
    return {
        "enabled": runs["checkpointed"]["enabled"],
        "plain_enabled": runs["plain"]["enabled"],
        "max_diff": float((runs["checkpointed"]["params"] - runs["plain"]["params"]).abs().max()),
    }


def check_peft_save_model(strategy: DeepspeedStrategy) -> dict[str, Any]:
    """A LoRA-wrapped tiny Llama trains one step; save_model writes the adapters only, and peft's
    PeftModel.from_pretrained on a fresh base reproduces the trained logits."""
    from peft import LoraConfig, PeftModel, get_peft_model

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    model = get_peft_model(make_tiny_llama(seed=7, vocab_size=LLAMA_VOCAB), lora)
    engine, _, _ = _train_llama(strategy, model)
    ids = _llama_ids(strategy)
    engine.eval()
    with torch.no_grad():
        trained_logits = engine(ids).logits.float()
    with shared_tmpdir(strategy, "peft") as root:
        strategy.save_model(engine, root / "adapter")
        fresh = make_tiny_llama(seed=7, vocab_size=LLAMA_VOCAB)
        with torch.no_grad():
            base_logits = fresh.to(strategy.device)(ids).logits.float()
        loaded = PeftModel.from_pretrained(fresh, str(root / "adapter")).to(strategy.device).eval()
        with torch.no_grad():
            logits = loaded(ids).logits.float()
        files = sorted(p.name for p in (root / "adapter").iterdir())
    return {
        "files": files,
        "max_diff": float((logits - trained_logits).abs().max()),
        "moved": float((trained_logits - base_logits).abs().max()),
    }


def check_zero_init_load_model(strategy: DeepspeedStrategy) -> dict[str, Any]:
    """zero.Init builds a partitioned tiny Llama (transformers imported for the first time inside
    the context); load_model fills it from a saved reference: its logits (gathered in forward)
    must equal the reference's."""
    import sys

    transformers_was_imported = "transformers" in sys.modules
    with strategy.init_model_context():
        model = make_tiny_llama(seed=22, vocab_size=LLAMA_VOCAB)
    partitioned = [n for n, p in model.named_parameters() if hasattr(p, "ds_id") and p.numel() == 0]
    reference = make_tiny_llama(seed=21, vocab_size=LLAMA_VOCAB)
    with shared_tmpdir(strategy, "hf-load") as root:
        own = root / f"ref{strategy.get_rank()}"  # every rank saves (symmetric), each its own copy
        reference.save_pretrained(str(own))
        strategy.barrier()
        strategy.load_model(model, root / "ref0")
        ids = _llama_ids(strategy)
        engine = strategy.prepare(model)  # frozen: evaluation engine (ZeRO-3 under ZeRO-3 training)
        with torch.no_grad():
            got = engine(ids).logits.float()
            want = reference.to(strategy.device)(ids).logits.float()
    return {
        "transformers_was_imported": transformers_was_imported,
        "partitioned": len(partitioned),
        "num_params": len(list(model.parameters())),
        "max_diff": float((got - want).abs().max()),
    }


def check_zero3_from_pretrained(strategy: DeepspeedStrategy) -> dict[str, Any]:
    """The package README's pattern: ``from_pretrained`` inside ``init_model_context`` at ZeRO-3
    partitions the model and loads the checkpoint into the partitions (logits equal the saved
    model's); transformers' DeepSpeed switch is off again after the context."""
    from transformers import AutoModelForCausalLM
    from transformers.integrations import is_deepspeed_zero3_enabled

    reference = make_tiny_llama(seed=23, vocab_size=LLAMA_VOCAB)
    with shared_tmpdir(strategy, "hf-pretrained") as root:
        own = root / f"ref{strategy.get_rank()}"
        reference.save_pretrained(str(own))
        strategy.barrier()
        with strategy.init_model_context():
            inside = is_deepspeed_zero3_enabled()
            model = AutoModelForCausalLM.from_pretrained(str(root / "ref0"))
        partitioned = [n for n, p in model.named_parameters() if hasattr(p, "ds_id") and p.numel() == 0]
        ids = _llama_ids(strategy)
        engine = strategy.prepare(model)
        with torch.no_grad():
            got = engine(ids).logits.float()
            want = reference.to(strategy.device)(ids).logits.float()
    return {
        "enabled_inside": inside,
        "enabled_after": is_deepspeed_zero3_enabled(),
        "partitioned": len(partitioned),
        "num_params": len(list(model.parameters())),
        "max_diff": float((got - want).abs().max()),
    }


def check_skip_keeps_optimizer_state(strategy: DeepspeedStrategy) -> dict[str, Any]:
    """A non-finite norm leaves parameters, optimizer state (master weights, Adam moments, step)
    and the learning-rate schedule untouched; the step is counted in skipped_steps."""
    engine, optim, sched = build(strategy, make_tiny_model(MODEL_SEED))
    batches = make_batches(DATA_SEED, 3, strategy.config.train_batch_size)
    train(strategy, engine, optim, sched, batches[:1])

    def snapshot() -> list[torch.Tensor]:
        inner = engine.basic_optimizer
        out = [p.detach().clone() for g in inner.param_groups for p in g["params"]]
        for state in inner.state.values():
            out += [
                v.detach().clone() if torch.is_tensor(v) else torch.tensor(float(v)) for v in state.values()
            ]
        return out + [flat(full_params(strategy, engine))]

    before, lr_before, epoch_before = snapshot(), sched.get_last_lr(), sched.last_epoch
    bad = train(strategy, engine, optim, sched, batches[1:2], loss_hook=lambda loss: loss * math.inf)
    after = snapshot()
    lr_after_bad, epoch_after_bad = sched.get_last_lr(), sched.last_epoch
    good = train(strategy, engine, optim, sched, batches[2:3])
    return {
        "stage": strategy.stage,
        "bad_norm": bad["norms"][0],
        "state_tensors": len(before),
        "unchanged": len(before) == len(after) and all(torch.equal(a, b) for a, b in zip(before, after)),
        "lr_before": lr_before,
        "lr_after_bad": lr_after_bad,
        "epoch_before": epoch_before,
        "epoch_after_bad": epoch_after_bad,
        "epoch_after_good": sched.last_epoch,
        "skipped": strategy.skipped_steps,
        "engine_skipped": engine.skipped_steps,
        "good_norm": good["norms"][0],
    }


def check_zero3_buckets_bounded(strategy: DeepspeedStrategy) -> dict[str, Any]:
    """Weight sync under ZeRO-3 gathers one planned bucket at a time: the bytes gathered at once
    never exceed max(bucket_bytes, largest tensor), and the buckets hold every full parameter."""
    engine, optim, sched = build(strategy, make_tiny_model(MODEL_SEED))
    train(strategy, engine, optim, sched, make_batches(DATA_SEED, 1, 8))
    gathered: list[int] = []
    original = ds_strategy._gathered

    def recording(params: list[Any], modifier_rank: int | None = None) -> Any:
        gathered.append(sum(int(p.ds_numel) * p.element_size() for p in params if hasattr(p, "ds_id")))
        return original(params, modifier_rank)

    ds_strategy._gathered = recording  # type: ignore[assignment]
    try:
        bucket_bytes = 8192
        buckets = [[(n, t.clone()) for n, t in b] for b in strategy.iter_weight_buckets(engine, bucket_bytes)]
    finally:
        ds_strategy._gathered = original  # type: ignore[assignment]
    module = strategy.unwrap_model(engine)
    sizes = {n: int(p.ds_numel) * p.element_size() for n, p in module.named_parameters()}
    full = strategy._full_state_dict(engine)
    names = [n for b in buckets for n, _ in b]
    out: dict[str, Any] = {
        "bucket_bytes": bucket_bytes,
        "largest": max(sizes.values()),
        "total": sum(sizes.values()),
        "max_gathered": max(gathered),
        "num_gathers": len(gathered),
        "num_buckets": len(buckets),
        "names": sorted(names),
        "expected_names": sorted(sizes),
        "local_numel": sum(p.numel() for p in module.parameters()),
    }
    if full is not None:
        out["max_diff"] = max(float((t - full[n]).abs().max()) for b in buckets for n, t in b)
    return out


def check_parity(strategy: DeepspeedStrategy) -> dict[str, Any]:
    """The conformance suite's parity run (3 optimizer steps with accumulation and clipping)."""
    return {"stage": strategy.stage, **CONFORMANCE_CHECKS["parity"](strategy)}


def check_fsdp_reference(strategy: DeepspeedStrategy) -> dict[str, Any]:
    """The same parity run on FSDPV2Strategy, in the same process group."""
    from lightrft.fsdp.strategy import FSDPV2Strategy

    fsdp = FSDPV2Strategy({**CONFIG, "strategy": "fsdp"})
    fsdp.setup_distributed()
    return CONFORMANCE_CHECKS["parity"](fsdp)


def check_gpu_bf16_training(strategy: DeepspeedStrategy) -> dict[str, Any]:
    """bf16 on CUDA: the optimizer is FusedAdam and losses fall over a few steps."""
    engine, optim, sched = build(strategy, make_tiny_model(MODEL_SEED))
    batch = make_batches(DATA_SEED, 1, strategy.config.train_batch_size)[0]
    run = train(strategy, engine, optim, sched, [batch] * 6)
    return {
        "basic_optimizer": type(engine.basic_optimizer).__name__,
        "param_dtype": str(next(strategy.unwrap_model(engine).parameters()).dtype),
        "losses": run["losses"],
        "norms": run["norms"],
    }


def sequential_parity_run(strategy: Any) -> dict[str, Any]:
    """A plain nn.Sequential (no decoder-layer class), 3 optimizer steps with accumulation and
    clipping: the run every backend must match (issue 7 item 2: FSDP must not refuse it)."""
    # Adam's eps of the parity runs (lightrft.testing.tolerance): rounding cannot flip an update.
    model, optim, sched = build(strategy, make_sequential_lm(31), eps=PARITY_ADAM_EPS)
    run = train(strategy, model, optim, sched, make_batches(32, 3, strategy.config.train_batch_size))
    params = full_params(strategy, model)
    group = param_groups(optim)[0]
    adam = {"eps": float(group["eps"]), "betas": [float(b) for b in group["betas"]]}
    return {**run, "params": flat(params), "names": sorted(params), "adam": adam}


def check_fsdp_sequential(strategy: DeepspeedStrategy) -> dict[str, Any]:
    """The nn.Sequential run on FSDPV2Strategy, in the same process group."""
    from lightrft.fsdp.strategy import FSDPV2Strategy

    fsdp = FSDPV2Strategy({**CONFIG, "strategy": "fsdp"})
    fsdp.setup_distributed()
    return sequential_parity_run(fsdp)


def check_adam_offload(strategy: DeepspeedStrategy) -> dict[str, Any]:
    """adam_offload at ZeRO-2: DeepSpeedCPUAdam trains the conformance model 3 steps (Adam's eps
    of the conformance parity run, PARITY_ADAM_EPS)."""
    model, optim, sched = build(strategy, make_tiny_model(MODEL_SEED), eps=PARITY_ADAM_EPS)
    run = train(strategy, model, optim, sched, make_batches(DATA_SEED, 3, strategy.config.train_batch_size))
    return {
        "optimizer": type(getattr(optim, "optimizer", optim)).__name__,
        "losses": run["losses"],
        "norms": run["norms"],
        "params": flat(full_params(strategy, model)),
    }


def check_cpu_comm_op(strategy: DeepspeedStrategy) -> dict[str, Any]:
    """On CPU, DeepSpeed's torch backend was made without its shared-memory op (not built), and
    DeepSpeed's builder function is back in place afterwards."""
    import deepspeed.comm.comm as ds_comm

    ds_comm_torch = importlib.import_module("deepspeed.comm.torch")  # not deepspeed.comm's `torch`

    return {
        "shm_comm_op": repr(ds_comm.cdb.shm_comm_op),
        "builder_restored": ds_comm_torch.build_shm_op.__name__ == "build_shm_op",
    }


# ------------------------------------------------------------------ runner
CHECKS: dict[str, tuple[int, Callable[[DeepspeedStrategy], dict[str, Any]], dict[str, Any]]] = {
    # First: transformers must not be imported yet (zero.Init's signature-mismatch trap).
    "zero_init_load_model": (3, check_zero_init_load_model, {}),
    "cpu_comm_op": (2, check_cpu_comm_op, {}),
    "hf_save_zero0": (0, check_hf_save_model, {}),
    "hf_save_zero2": (2, check_hf_save_model, {}),
    "hf_save_zero3": (3, check_hf_save_model, {}),
    "skip_state_zero0": (0, check_skip_keeps_optimizer_state, {}),
    "skip_state_zero2": (2, check_skip_keeps_optimizer_state, {}),
    "skip_state_zero3": (3, check_skip_keeps_optimizer_state, {}),
    "zero3_buckets": (3, check_zero3_buckets_bounded, {}),
    "peft_save_zero3": (3, check_peft_save_model, {}),
    "grad_ckpt_zero2": (2, check_gradient_checkpointing, {"gradient_checkpointing": True}),
    "zero3_from_pretrained": (3, check_zero3_from_pretrained, {}),
    "parity_zero0": (0, check_parity, {}),
    "parity_zero1": (1, check_parity, {}),
    "parity_zero2": (2, check_parity, {}),
    "parity_zero3": (3, check_parity, {}),
    "fsdp_reference": (0, check_fsdp_reference, {}),
    "sequential_zero1": (1, sequential_parity_run, {}),
    "sequential_zero2": (2, sequential_parity_run, {}),
    "sequential_zero3": (3, sequential_parity_run, {}),
    "fsdp_sequential": (0, check_fsdp_sequential, {}),
    # Opt-in (builds DeepSpeedCPUAdam, ~100 s on CPU): test_adam_offload_slow.py.
    "adam_offload_zero2": (2, check_adam_offload, {"adam_offload": True}),
    "gpu_training_zero2": (2, check_gpu_bf16_training, {}),
    "gpu_training_zero3": (3, check_gpu_bf16_training, {}),
}
#: The checks of the CPU run (gloo, fp32).
CPU_CHECKS = [name for name in CHECKS if not name.startswith(("gpu_", "adam_offload"))]
#: The checks of the GPU run (NCCL, bf16 where it applies).
GPU_CHECKS = ["zero_init_load_model", "zero3_from_pretrained", "hf_save_zero2", "hf_save_zero3", "skip_state_zero2", "skip_state_zero3",
              "zero3_buckets", "gpu_training_zero2", "gpu_training_zero3"]  # fmt: skip


def run(names: list[str] | None = None, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Runs the named checks (default: CPU_CHECKS) in this rank, each on a fresh strategy of its
    stage; ``{name: {"ok", "result"|"error"}}`` (``harness.run_isolated``)."""
    strategies: list[DeepspeedStrategy] = []

    def check(name: str) -> Callable[[], dict[str, Any]]:
        stage, fn, extra = CHECKS[name]

        def measure() -> dict[str, Any]:
            strategy = make_strategy(stage, **extra, **(overrides or {}))
            strategies.append(strategy)
            return fn(strategy)

        return measure

    results = run_isolated([(name, check(name)) for name in names or CPU_CHECKS])
    for strategy in reversed(strategies):  # the first one owns the process group
        with contextlib.suppress(Exception):
            strategy.shutdown()
    return results
