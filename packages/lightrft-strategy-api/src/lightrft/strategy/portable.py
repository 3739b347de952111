"""The portable checkpoint layout: one that every backend writes and reads, at any world size.

``<ckpt>/portable`` is a ``torch.distributed.checkpoint`` (DCP) directory holding
``{"model": {name: tensor}, "optimizer": {"state": {name: {"exp_avg", "exp_avg_sq", "step"}},
"param_groups": [{..., "params": [names]}]}}``: model and optimizer state keyed by parameter name
(the format of ``torch.distributed.checkpoint.state_dict.get_state_dict``). DCP stores each
tensor once with its global shape, so sharded writers (FSDP2 DTensors) and unsharded ones (one
process) read each other's files at any world size. The scheduler goes to ``lightrft_scheduler.pt``.
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


def save_portable(module: torch.nn.Module, optimizer: Any, path: Path, *, no_dist: bool) -> None:
    """Writes ``module``'s and ``optimizer``'s (may be None) state under ``path/portable``;
    collective over the ranks unless ``no_dist``."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict
    from torch.distributed.checkpoint.state_dict_saver import save

    if optimizer is not None:
        model_sd, optim_sd = get_state_dict(module, optimizer)
        state: dict[str, Any] = {"model": model_sd, "optimizer": optim_sd}
    else:
        state = {"model": get_model_state_dict(module)}
    save(state, checkpoint_id=str(path / PORTABLE_DIR), no_dist=no_dist)


def load_portable(
    module: torch.nn.Module, optimizer: Any, path: Path, *, strict: bool, with_optimizer: bool, no_dist: bool
) -> None:
    """Reads ``path/portable`` into ``module`` (and ``optimizer`` when ``with_optimizer``),
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
        load(state, checkpoint_id=str(path / PORTABLE_DIR), planner=planner, no_dist=no_dist)
        set_state_dict(
            module,
            optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optimizer"],
            options=options,
        )
    else:
        state = {"model": get_model_state_dict(module)}
        load(state, checkpoint_id=str(path / PORTABLE_DIR), planner=planner, no_dist=no_dist)
        set_model_state_dict(module, state["model"], options=options)
