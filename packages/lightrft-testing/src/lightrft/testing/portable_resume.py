"""Portable resume between backends and world sizes, measured on every rank (``run_distributed``).

Backends are named ``fake``, ``fsdp``, ``ds1``, ``ds2``, ``ds3`` (DeepSpeed ZeRO stage N). A writer
trains 2 steps from the conformance suite's model and data, consumes 2 dataloader batches, saves
``<root>/<backend>-ws<N>/saved`` with ``layout="portable"`` and trains 2 more steps (the
uninterrupted run); a reader builds a differently initialised model, loads a writer's checkpoint
and trains the same 2 steps. They measure; the tests assert.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lightrft.strategy import clean_param_name, get_strategy

from .conformance.spec import BASE_CONFIG, tiny_model
from .harness import build, full_params, train
from .models import make_batches

SAVED_STEPS = 2
RESUMED_STEPS = 2
DATASET = [torch.tensor([i]) for i in range(64)]


#: Every parameter partitioned under ZeRO-3 (DeepSpeed keeps small ones whole by default).
_ZERO3_ALL = {"zero_optimization": {"stage3_param_persistence_threshold": 0}}
BACKENDS: dict[str, dict[str, Any]] = {
    "fake": {"strategy": "fake"},
    "fsdp": {"strategy": "fsdp"},
    "ds1": {"strategy": "deepspeed", "zero_stage": 1},
    "ds2": {"strategy": "deepspeed", "zero_stage": 2},
    "ds3": {"strategy": "deepspeed", "zero_stage": 3, "deepspeed_config": _ZERO3_ALL},
}


def _strategy(backend: str, layout: str = "portable") -> Any:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is invalid: valid are {', '.join(BACKENDS)}")
    return get_strategy({**BASE_CONFIG, **BACKENDS[backend], "ckpt_layout": layout})


def _optimizer_summary(strategy: Any, model: Any, optim: Any) -> dict[str, Any]:
    """Adam moments as full fp32 tensors by parameter name, and the step counts (collective; the
    torch-native backends return them on rank 0 only, empty elsewhere)."""
    if strategy.name == "deepspeed":
        from deepspeed.utils import safe_get_full_optimizer_state

        moments = {}
        for name, p in strategy.unwrap_model(model).named_parameters():
            for m in ("exp_avg", "exp_avg_sq"):
                moments[f"{clean_param_name(name)}.{m}"] = (
                    safe_get_full_optimizer_state(p, m).float().cpu().clone()
                )
        base = model.optimizer.optimizer
        steps = sorted({float(st["step"]) for st in base.state.values() if "step" in st})
        return {"moments": moments, "steps": steps}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    sd = get_optimizer_state_dict(
        strategy.unwrap_model(model), optim, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    state = sd.get("state", {})  # empty on ranks other than 0 (cpu_offload)
    moments = {f"{k}.{m}": v[m].float().clone() for k, v in state.items() for m in ("exp_avg", "exp_avg_sq")}
    steps = sorted({float(v["step"]) for v in state.values()})
    return {"moments": moments, "steps": steps}


def write(backend: str, root: str, layout: str = "portable") -> dict[str, Any]:
    """Trains SAVED_STEPS, saves ``root/<backend>-ws<N>`` in the portable layout, trains on."""
    strategy = _strategy(backend, layout)
    model, optim, sched = build(strategy, tiny_model())
    loader = strategy.setup_dataloader(DATASET, batch_size=2, shuffle=True)
    batches = make_batches(5, SAVED_STEPS + RESUMED_STEPS, strategy.config.train_batch_size)
    train(strategy, model, optim, sched, batches[:SAVED_STEPS])
    it = iter(loader)
    next(it), next(it)
    name = f"{backend}-ws{strategy.world_size}"
    strategy.save_ckpt(model, Path(root) / name, tag="saved")
    saved = {
        "optimizer": _optimizer_summary(strategy, model, optim),
        "lr": sched.get_last_lr(),
        "saved_params": full_params(strategy, model),
    }
    after = train(strategy, model, optim, sched, batches[SAVED_STEPS:])
    out = {"name": name, "losses": after["losses"], "params": full_params(strategy, model), **saved}
    out["loader"] = loader.state_dict()
    return out


def read(backend: str, root: str, names: list[str]) -> dict[str, Any]:
    """For each writer in ``names``: a fresh model (another init) loads its checkpoint and trains
    RESUMED_STEPS; what it loaded and the losses it got."""
    out: dict[str, Any] = {}
    world_size = 1
    for name in names:
        strategy = _strategy(backend)  # a fresh one per checkpoint: its own dataloader list
        world_size = strategy.world_size
        model, optim, sched = build(strategy, tiny_model(4242))
        loader = strategy.setup_dataloader(DATASET, batch_size=2, shuffle=True)
        strategy.load_ckpt(model, Path(root) / name)
        loaded = {
            "optimizer": _optimizer_summary(strategy, model, optim),
            "lr": sched.get_last_lr(),
            "loader": loader.state_dict(),
            "global_step": strategy.train_state(model).global_step,
        }
        batches = make_batches(5, SAVED_STEPS + RESUMED_STEPS, strategy.config.train_batch_size)
        after = train(strategy, model, optim, sched, batches[SAVED_STEPS:])
        out[name] = {**loaded, "losses": after["losses"], "params": full_params(strategy, model)}
    return {"reader": f"{backend}-ws{world_size}", "results": out}


def write_then_read(
    writers: list[str], readers: list[str], root: str, read_names: list[str], layout: str = "portable"
) -> dict[str, Any]:
    """One launch: each of ``writers`` saves, then each of ``readers`` resumes ``read_names`` and
    what was just written."""
    written = [write(b, root, layout) for b in writers]
    names = [*read_names, *(w["name"] for w in written)]
    return {"written": written, "read": [read(b, root, names) for b in readers]}
