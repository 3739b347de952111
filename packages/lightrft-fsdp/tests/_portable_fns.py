"""Rank functions of test_portable_resume: save the portable layout with one backend and world
size, resume it with another (run by ``run_distributed``). They measure; the test asserts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lightrft.strategy import get_strategy
from lightrft.testing.conformance.checks import BASE_CONFIG, build, full_params, train_steps
from lightrft.testing.models import make_batches

SAVED_STEPS = 2
RESUMED_STEPS = 2
DATASET = [torch.tensor([i]) for i in range(64)]


def _strategy(backend: str) -> Any:
    return get_strategy({**BASE_CONFIG, "strategy": backend, "ckpt_layout": "portable"})


def _optimizer_summary(strategy: Any, model: Any, optim: Any) -> dict[str, Any]:
    """Adam moments as full tensors by parameter name, and the step counts."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    sd = get_optimizer_state_dict(
        strategy.unwrap_model(model), optim, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    moments = {f"{k}.{m}": v[m].float().clone() for k, v in sd["state"].items() for m in ("exp_avg", "exp_avg_sq")}
    steps = sorted({float(v["step"]) for v in sd["state"].values()})
    return {"moments": moments, "steps": steps}


def write(backend: str, root: str) -> dict[str, Any]:
    """Trains SAVED_STEPS, saves ``root/<backend>-ws<N>`` in the portable layout, trains on."""
    strategy = _strategy(backend)
    model, optim, sched = build(strategy)
    loader = strategy.setup_dataloader(DATASET, batch_size=2, shuffle=True)
    batches = make_batches(5, SAVED_STEPS + RESUMED_STEPS, strategy.config.train_batch_size)
    train_steps(strategy, model, optim, sched, batches[:SAVED_STEPS])
    it = iter(loader)
    next(it), next(it)
    name = f"{backend}-ws{strategy.world_size}"
    strategy.save_ckpt(model, Path(root) / name, tag="saved")
    saved = {"optimizer": _optimizer_summary(strategy, model, optim), "lr": sched.get_last_lr()}
    after = train_steps(strategy, model, optim, sched, batches[SAVED_STEPS:])
    out = {"name": name, "losses": after["losses"], "params": full_params(strategy, model), **saved}
    out["loader"] = loader.state_dict()
    strategy.shutdown() if strategy.world_size > 1 else None
    return out


def read(backend: str, root: str, names: list[str]) -> dict[str, Any]:
    """For each writer in ``names``: a fresh model (another init) loads its checkpoint and trains
    RESUMED_STEPS; what it loaded and the losses it got."""
    strategy = _strategy(backend)
    out: dict[str, Any] = {}
    for name in names:
        model, optim, sched = build(strategy, seed=4242)
        loader = strategy.setup_dataloader(DATASET, batch_size=2, shuffle=True)
        strategy.load_ckpt(model, Path(root) / name)
        loaded = {
            "optimizer": _optimizer_summary(strategy, model, optim),
            "lr": sched.get_last_lr(),
            "loader": loader.state_dict(),
            "global_step": strategy.train_state(model).global_step,
        }
        batches = make_batches(5, SAVED_STEPS + RESUMED_STEPS, strategy.config.train_batch_size)
        after = train_steps(strategy, model, optim, sched, batches[SAVED_STEPS:])
        out[name] = {**loaded, "losses": after["losses"], "params": full_params(strategy, model)}
        strategy._dataloaders.clear()
    return {"reader": f"{backend}-ws{strategy.world_size}", "results": out}


def write_then_read(backends: list[str], root: str, read_names: list[str]) -> dict[str, Any]:
    """One launch: each of ``backends`` writes, then each reads ``read_names`` plus what it wrote."""
    written = [write(b, root) for b in backends]
    names = [*read_names, *(w["name"] for w in written)]
    return {"written": written, "read": [read(b, root, names) for b in backends]}
