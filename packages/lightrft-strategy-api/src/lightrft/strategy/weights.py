"""Parameter names and bucketing for weight sync (train -> engine), written once for every backend."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TypeVar

import torch

from .engine import WeightBucket

T = TypeVar("T")

# Prefixes that wrappers insert in front of the real parameter names.
_WRAPPER_PARTS = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod")


def clean_param_name(name: str) -> str:
    """Maps a training-side parameter name to the plain module name.

    Removes wrapper components (``_fsdp_wrapped_module``, ``_checkpoint_wrapped_module``,
    ``_orig_mod``) anywhere in the name and a leading ``module.`` (DeepSpeed / DDP engines).
    """
    parts = [p for p in name.split(".") if p not in _WRAPPER_PARTS]
    while parts and parts[0] == "module":
        parts = parts[1:]
    return ".".join(parts)


def tensor_nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def plan_buckets(sizes: Iterable[tuple[str, int]], bucket_bytes: int) -> list[list[str]]:
    """Groups names (in order) into buckets of at most ``bucket_bytes``; a larger tensor is alone."""
    return [[name for name, _ in bucket] for bucket in _greedy_buckets(sizes, bucket_bytes, lambda x: x[1])]


def _greedy_buckets(items: Iterable[T], bucket_bytes: int, nbytes: Callable[[T], int]) -> Iterator[list[T]]:
    """``items`` in order, cut into runs of at most ``bucket_bytes`` (by ``nbytes``); an item larger
    than that forms a run of its own. Lazy: one run is held at a time."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes={bucket_bytes} is invalid: it must be > 0")
    bucket: list[T] = []
    used = 0
    for item in items:
        n = nbytes(item)
        if bucket and used + n > bucket_bytes:
            yield bucket
            bucket, used = [], 0
        bucket.append(item)
        used += n
    if bucket:
        yield bucket


def sync_dtype(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    """The dtype ``tensor`` is sent to an engine in: ``dtype`` for floating-point tensors (None:
    their own); integer and bool tensors are never cast."""
    return dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype


def cast_named_tensors(
    named_tensors: Iterable[tuple[str, torch.Tensor]], dtype: torch.dtype | None
) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` pairs with each tensor in its :func:`sync_dtype`."""
    for name, tensor in named_tensors:
        target = sync_dtype(tensor, dtype)
        yield name, (tensor if tensor.dtype == target else tensor.to(target))


def bucket_named_tensors(
    named_tensors: Iterable[tuple[str, torch.Tensor]],
    bucket_bytes: int,
    name_map: Callable[[str], str] = clean_param_name,
) -> Iterator[WeightBucket]:
    """Streams ``(name, tensor)`` pairs into buckets of at most ``bucket_bytes`` (a larger tensor
    forms a bucket of its own). Only one bucket is held at a time, so the extra memory is bounded
    by ``max(bucket_bytes, largest tensor)``."""
    for bucket in _greedy_buckets(named_tensors, bucket_bytes, lambda x: tensor_nbytes(x[1])):
        yield [(name_map(name), tensor) for name, tensor in bucket]


def live_storages(model: object) -> frozenset[int]:
    """The storage addresses (``untyped_storage().data_ptr()``) of ``model``'s parameters as this
    rank holds them (a DTensor's local shard; empty placeholders, such as ZeRO-3's, are left out).
    A pushed tensor over one of them is the parameter itself: valid, and in place, between pushes
    (what an engine that ``maps_live_weights`` needs to know)."""
    parameters = getattr(model, "parameters", None)
    if not callable(parameters):
        return frozenset()
    from torch.distributed.tensor import DTensor

    out = set()
    for p in parameters():
        local = p.to_local() if isinstance(p, DTensor) else p
        if local.numel() > 0:
            out.add(local.untyped_storage().data_ptr())
    return frozenset(out)


@torch.no_grad()
def copy_bucket_into(params: Mapping[str, torch.Tensor], bucket: WeightBucket) -> list[str]:
    """Copies a bucket into an engine's own tensors by name (casting to their dtype and device).
    An unknown name or a shape mismatch raises, naming the weight. Returns the names copied."""
    for name, tensor in bucket:
        target = params.get(name)
        if target is None:
            raise KeyError(
                f"weight {name!r} is not a parameter of the engine's model; known: {sorted(params)[:8]}..."
            )
        if tuple(target.shape) != tuple(tensor.shape):
            raise ValueError(
                f"weight {name!r} has shape {tuple(tensor.shape)}; the engine expects {tuple(target.shape)}"
            )
        target.copy_(tensor.detach().to(target.device, target.dtype))
    return [name for name, _ in bucket]
