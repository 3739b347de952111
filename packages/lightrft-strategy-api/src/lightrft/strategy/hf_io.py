"""Hugging Face style model directories: safetensors weights, config.json, tokenizer files."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import torch

from .checkpoint import TMP_PREFIX, replace_dir

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


def _config_dict(config: Any) -> dict[str, Any] | None:
    if config is None:
        return None
    if hasattr(config, "to_dict"):
        return config.to_dict()
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return dataclasses.asdict(config)
    if isinstance(config, dict):
        return dict(config)
    return None


def _contiguous_unshared(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share storage (tied weights): give each its own copy."""
    seen: set[int] = set()
    out: dict[str, torch.Tensor] = {}
    for name, t in state_dict.items():
        t = t.detach()
        ptr = t.untyped_storage().data_ptr() if t.numel() else -1
        if ptr in seen or not t.is_contiguous():
            t = t.clone().contiguous()
        elif ptr != -1:
            seen.add(ptr)
        out[name] = t.cpu()
    return out


def is_peft_model(model: Any) -> bool:
    """A ``peft.PeftModel`` (checked by duck typing: peft is not a dependency)."""
    return (
        hasattr(model, "peft_config") and hasattr(model, "base_model") and hasattr(model, "save_pretrained")
    )


def original_class_name(model: Any) -> str:
    """The user's class name (:func:`original_class`)."""
    return original_class(model).__name__


def original_class(model: Any) -> type:
    """The user's class: FSDP2 swaps a sharded module's class for a generated ``FSDP<Class>``
    subclass (bases ``FSDPModule`` and the user's class)."""
    for cls in type(model).__mro__:
        if not cls.__name__.startswith("FSDP"):
            return cls
    return type(model)


@contextlib.contextmanager
def as_original_class(model: Any) -> Iterator[Any]:
    """``model`` seen as its user's class for the duration (see :func:`original_class`).

    transformers >= 5 renames weights on ``save_pretrained`` (the reverse of the conversions it
    applies on load), and looks the conversions up by the class name of each sub-model, then by
    its ``model_type``. A generated ``FSDP<Class>`` name misses the class entry and falls back to
    the ``model_type``'s, which for a vision-language model nests the names wrongly:
    ``model.language_model.model.layers.*`` for Gemma 3, a directory vLLM cannot load
    (``test_fsdp_multimodal.py``: the saved names equal those of the plain model's save). ``architectures`` in
    config.json comes from the class name too. No FSDP method runs during the save (the state
    dict is given, gathered beforehand), so the swap back is all that is needed."""
    cls = original_class(model)
    generated = type(model)
    if cls is generated:
        yield model
        return
    model.__class__ = cls
    try:
        yield model
    finally:
        model.__class__ = generated


def write_hf_directory(
    model: torch.nn.Module,
    state_dict: dict[str, torch.Tensor],
    output_dir: str | os.PathLike,
    tokenizer: Any = None,
    max_shard_size: str | int = "5GB",
) -> Path:
    """Writes ``state_dict`` (full, on CPU) as a Hugging Face directory, atomically.

    PEFT models save their adapters (``adapter_model.safetensors``, ``adapter_config.json``);
    Hugging Face models go through ``save_pretrained`` (config, generation config, sharded
    safetensors); any other module gets ``model.safetensors`` and, when it has a ``config``
    (``to_dict()``, a dataclass or a dict), ``config.json``.
    """
    final = Path(output_dir)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.parent / f"{TMP_PREFIX}{final.name}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    if is_peft_model(model):
        # PEFT: adapter weights and adapter_config.json only (peft filters the full state dict).
        cast(Any, model).save_pretrained(str(staging), state_dict=state_dict, safe_serialization=True)
    elif hasattr(model, "save_pretrained") and hasattr(model, "config"):
        with as_original_class(model) as plain:
            cast(Any, plain).save_pretrained(
                staging, state_dict=state_dict, safe_serialization=True, max_shard_size=max_shard_size
            )
    else:
        from safetensors.torch import save_file

        save_file(_contiguous_unshared(state_dict), str(staging / WEIGHTS_NAME), metadata={"format": "pt"})
        cfg = _config_dict(getattr(model, "config", None))
        if cfg is not None:
            (staging / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True, default=str))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(staging))
    replace_dir(staging, final)
    return final


def read_hf_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Reads every safetensors shard of a Hugging Face directory (or one .safetensors file)."""
    from safetensors.torch import load_file

    p = Path(path)
    if p.is_file():
        return load_file(str(p))
    index = p / INDEX_NAME
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(f.name for f in p.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"path={str(p)!r} holds no .safetensors weights")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(p / f)))
    return state
