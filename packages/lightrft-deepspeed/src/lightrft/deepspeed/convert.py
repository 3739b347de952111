"""Offline conversion of a native DeepSpeed ZeRO-1/2/3 checkpoint to the portable layout.

No GPU and no process group: DeepSpeed's own ``deepspeed.checkpoint.ds_to_universal`` merges the
per-rank ZeRO partitions into one folder per parameter (``zero/<name>/fp32.pt``, ``exp_avg.pt``,
``exp_avg_sq.pt``, ``step.pt``; the "universal checkpoint"), in a temporary directory; this module
reads those and writes what :mod:`lightrft.strategy.portable` defines: a DCP directory of
``{"model": {name: fp32}, "optimizer": {"state": {name: {exp_avg, exp_avg_sq, step}},
"param_groups": [...]}}`` and the scheduler's state dict. ``lightrft-ckpt convert --to portable``
calls :func:`write_portable`.

Every file DeepSpeed reads here goes through ``torch.load(weights_only=True)`` with DeepSpeed's
checkpoint classes allowed (as in :meth:`DeepspeedStrategy.load_ckpt`), never plain unpickling.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from lightrft.strategy import portable
from lightrft.strategy.weights import clean_param_name

from .zero_state import ADAM_KEYS, deepspeed_safe_globals, weights_only_load

_MODEL_STATES = re.compile(r"^(mp_rank_\d+|zero_pp_rank_\d+_mp_rank_\d+)_model_states\.pt$")


@contextlib.contextmanager
def _weights_only_torch_load() -> Iterator[None]:
    """``torch.load`` with ``weights_only=True`` (DeepSpeed's classes allowed) while DeepSpeed's
    converter runs: it asks for ``weights_only=False`` on the files it reads."""
    original = torch.load
    allowed = deepspeed_safe_globals()

    def load(*args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        with torch.serialization.safe_globals(allowed):
            return original(*args, **kwargs)

    torch.load = load  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.load = original  # type: ignore[assignment]


def _model_states_file(path: Path) -> Path:
    found = sorted(p for p in path.iterdir() if _MODEL_STATES.match(p.name))
    if not found:
        raise FileNotFoundError(
            f"{str(path)!r} holds no DeepSpeed model states file (mp_rank_00_model_states.pt or "
            "zero_pp_rank_0_mp_rank_00_model_states.pt): it is not a native DeepSpeed checkpoint"
        )
    return found[0]


def to_universal(path: Path, out: Path) -> None:
    """Runs DeepSpeed's ``ds_to_universal`` on the native checkpoint directory ``path`` into
    ``out`` (in this process, one worker; its progress goes to stderr)."""
    from deepspeed.checkpoint import ds_to_universal

    args = argparse.Namespace(
        input_folder=str(path),
        output_folder=str(out),
        num_extract_workers=1,
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,  # checkpoints not written for universal loading lack a marker
    )
    with _weights_only_torch_load(), contextlib.redirect_stdout(sys.stderr):  # it prints progress
        ds_to_universal.main(args)


def _load(file: Path) -> Any:
    return weights_only_load(str(file), map_location="cpu")


def _tensor(file: Path) -> Any:
    value = _load(file)
    return value["param"] if isinstance(value, dict) and "param" in value else value


def portable_state(path: Path) -> tuple[dict[str, Any], Any]:
    """``(state, scheduler state or None)`` of the native DeepSpeed checkpoint at ``path``: the
    portable layout's state dict (full fp32 weights, Adam moments and step by parameter name)."""
    model_states = _load(_model_states_file(path))
    shapes: dict[str, Any] = {}
    for group in model_states.get("param_shapes") or []:  # one ordered dict per param group
        shapes.update(group)
    if not shapes:
        raise ValueError(f"{str(path)!r}: its model states hold no param_shapes to convert")
    with tempfile.TemporaryDirectory(prefix="lightrft-ds-universal-") as tmp:
        universal = Path(tmp) / "universal"
        to_universal(path, universal)
        zero = universal / "zero"
        common = _load(zero / "optimizer_state.pt")
        common_step = _common_step(common)
        model: dict[str, torch.Tensor] = {}
        state: dict[str, dict[str, torch.Tensor]] = {}
        for raw_name, shape in shapes.items():
            folder = zero / raw_name
            name = clean_param_name(raw_name)
            model[name] = _tensor(folder / "fp32.pt").float().reshape(tuple(shape)).clone()
            moments = {
                k: _tensor(folder / f"{k}.pt").float().reshape(tuple(shape)).clone() for k in ADAM_KEYS
            }
            step = _tensor(folder / "step.pt") if (folder / "step.pt").is_file() else common_step
            if step is None:
                raise ValueError(f"{str(path)!r}: no Adam step count for {raw_name!r}")
            state[name] = {**moments, "step": torch.tensor(float(step))}
        param_groups = []
        for group, names in zip(common["param_groups"], model_states["param_shapes"]):
            hyper = {k: v for k, v in group.items() if k != "params"}
            param_groups.append({**hyper, "params": [clean_param_name(n) for n in names]})
    full = {"model": model, "optimizer": {"state": state, "param_groups": param_groups}}
    return full, model_states.get("lr_scheduler")


def _common_step(common: dict[str, Any]) -> float | None:
    """The step count ZeRO-3 keeps once for all parameters (ZeRO-1/2 write ``step.pt`` each)."""
    inner = common.get("optimizer_state_dict")
    if isinstance(inner, dict):
        for st in (inner.get("state") or {}).values():
            if "step" in st:
                return float(st["step"])
    for group in common.get("param_groups") or []:
        if "step" in group:
            return float(group["step"])
    return None


def write_portable(path: str | Path, staging: str | Path) -> list[str]:
    """Writes the portable layout of the native DeepSpeed checkpoint ``path`` into ``staging``
    (``portable/`` and, when the checkpoint has a scheduler, ``lightrft_scheduler.pt``); returns
    the names of the parameters written."""
    from torch.distributed.checkpoint.state_dict_saver import save

    path, staging = Path(path), Path(staging)
    state, scheduler = portable_state(path)
    save(state, checkpoint_id=str(staging / portable.PORTABLE_DIR), no_dist=True)
    if scheduler is not None:
        torch.save(scheduler, staging / portable.SCHEDULER_FILE)
    return sorted(state["model"])
