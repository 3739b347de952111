"""SGLang's flattened weight buckets: one uint8 buffer per bucket and tensor-parallel rank, the
tensors cast once to the engine's dtype and laid at aligned offsets, which each scheduler reads
back as views (``update_weights_from_tensor(load_format="flattened_bucket")`` over a CUDA IPC
handle: no copy). :func:`unflatten_bucket` is what SGLang's receiver does."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from lightrft.strategy.engine import WeightBucket

#: Byte alignment of each tensor inside a flattened bucket (``view(dtype)`` needs aligned offsets).
_ALIGN = 16


@dataclasses.dataclass(frozen=True)
class BucketEntry:
    """Where one tensor lies in a flattened bucket (bytes ``start:end`` of a uint8 buffer)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    start: int
    end: int


def flatten_bucket(
    bucket: WeightBucket, device: torch.device | str, dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, list[BucketEntry]]:
    """Packs a bucket into one uint8 buffer on ``device``: each tensor is cast to ``dtype``
    (floating-point tensors only; None keeps their dtype) and copied once into its aligned slice.
    Returns the buffer and where each tensor lies in it."""
    if not bucket:
        raise ValueError("cannot flatten an empty weight bucket")
    entries: list[BucketEntry] = []
    offset = 0
    for name, t in bucket:
        target = dtype if dtype is not None and t.is_floating_point() else t.dtype
        nbytes = t.numel() * torch.empty((), dtype=target).element_size()
        start = -(-offset // _ALIGN) * _ALIGN
        entries.append(BucketEntry(name, tuple(t.shape), target, start, start + nbytes))
        offset = start + nbytes
    flat = torch.empty(offset, dtype=torch.uint8, device=device)
    for (_, t), e in zip(bucket, entries):
        if e.end > e.start:
            flat[e.start : e.end].view(e.dtype).copy_(t.detach().reshape(-1))
    return flat, entries


def unflatten_bucket(flat: torch.Tensor, entries: Sequence[BucketEntry]) -> list[tuple[str, torch.Tensor]]:
    """The tensors of a flattened bucket, as views of ``flat`` (what SGLang's receiver does)."""
    return [(e.name, flat[e.start : e.end].view(e.dtype).reshape(e.shape)) for e in entries]


__all__ = ["BucketEntry", "flatten_bucket", "unflatten_bucket"]
