"""The portable checkpoint layout: one that every backend writes and reads, at any world size.

``<ckpt>/portable`` is a ``torch.distributed.checkpoint`` (DCP) directory holding
``{"model": {name: tensor}, "optimizer": {"state": {name: {"exp_avg", "exp_avg_sq", "step"}},
"param_groups": [{..., "params": [names]}]}}``: model and optimizer state keyed by parameter name
(the format of ``torch.distributed.checkpoint.state_dict.get_state_dict``). DCP stores each
tensor once with its global shape, so sharded writers (FSDP2 DTensors) and unsharded ones (one
process) read each other's files at any world size. The scheduler goes to ``lightrft_scheduler.pt``.

The same functions write and read a backend's native DCP directory (FSDP's ``dcp``): ``subdir``
names it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

PORTABLE_DIR = "portable"
SCHEDULER_FILE = "lightrft_scheduler.pt"
LAYOUTS = ("native", "portable")


def validate_layout(layout: str) -> str:
    """``layout`` if it is one of :data:`LAYOUTS`; ValueError naming it otherwise."""
    if layout not in LAYOUTS:
        raise ValueError(
            f"checkpoint layout={layout!r} is invalid: valid are {', '.join(map(repr, LAYOUTS))}"
        )
    return layout


def save_portable(
    module: torch.nn.Module, optimizer: Any, path: Path, *, no_dist: bool, subdir: str = PORTABLE_DIR
) -> None:
    """Writes ``module``'s and ``optimizer``'s (may be None) state under ``path/subdir``;
    collective over the ranks unless ``no_dist``."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict
    from torch.distributed.checkpoint.state_dict_saver import save

    if optimizer is not None:
        model_sd, optim_sd = get_state_dict(module, optimizer)
        state: dict[str, Any] = {"model": model_sd, "optimizer": optim_sd}
    else:
        state = {"model": get_model_state_dict(module)}
    save(state, checkpoint_id=str(path / subdir), no_dist=no_dist)


def load_portable(
    module: torch.nn.Module,
    optimizer: Any,
    path: Path,
    *,
    strict: bool,
    with_optimizer: bool,
    no_dist: bool,
    subdir: str = PORTABLE_DIR,
) -> None:
    """Reads ``path/subdir`` into ``module`` (and ``optimizer`` when ``with_optimizer``),
    resharding to this world size."""
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_state_dict,
        set_model_state_dict,
        set_state_dict,
    )
    from torch.distributed.checkpoint.state_dict_loader import load

    options = StateDictOptions(strict=strict)
    planner = DefaultLoadPlanner(allow_partial_load=not strict)
    if optimizer is not None and with_optimizer:
        model_sd, optim_sd = get_state_dict(module, optimizer)
        state: dict[str, Any] = {"model": model_sd, "optimizer": optim_sd}
        load(state, checkpoint_id=str(path / subdir), planner=planner, no_dist=no_dist)
        set_state_dict(
            module,
            optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optimizer"],
            options=options,
        )
    else:
        state = {"model": get_model_state_dict(module)}
        load(state, checkpoint_id=str(path / subdir), planner=planner, no_dist=no_dist)
        set_model_state_dict(module, state["model"], options=options)


def save_scheduler(scheduler: Any, path: Path) -> None:
    """Writes ``scheduler``'s state (may be None: nothing is written) to ``path/lightrft_scheduler.pt``."""
    if scheduler is not None:
        torch.save(scheduler.state_dict(), path / SCHEDULER_FILE)


def load_scheduler(scheduler: Any, path: Path, legacy_names: tuple[str, ...] = ()) -> bool:
    """Loads ``path/lightrft_scheduler.pt`` (or the first of ``legacy_names`` present: a name a
    backend wrote before) into ``scheduler``; returns whether a file was loaded."""
    if scheduler is None:
        return False
    for name in (SCHEDULER_FILE, *legacy_names):
        if (path / name).is_file():
            scheduler.load_state_dict(torch.load(path / name, weights_only=True))
            return True
    return False


def read_model_tensors(dcp_dir: Path, load: bool) -> dict[str, Any]:
    """The ``model`` entries of the DCP directory ``dcp_dir`` (portable or a backend's native
    one), offline (no process group): tensors with ``load``, else ``(shape, dtype)`` from the
    metadata alone. Keys are as saved (after ``model.``)."""
    from torch.distributed.checkpoint import FileSystemReader

    meta = FileSystemReader(str(dcp_dir)).read_metadata()
    keys = [k for k in meta.state_dict_metadata if k.startswith("model.")]
    if not load:
        out = {}
        for k in keys:
            md = meta.state_dict_metadata[k]
            size = getattr(md, "size", None)
            dtype = getattr(getattr(md, "properties", None), "dtype", None)
            out[k[len("model.") :]] = (tuple(size) if size is not None else (), dtype)
        return out
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    loaded = _load_state_dict_from_keys(set(keys), checkpoint_id=str(dcp_dir))
    model = loaded.get("model", loaded)
    return {k[len("model.") :] if k.startswith("model.") else k: v for k, v in model.items()}
