"""Collectives over tensors, dicts of them and python scalars; identity without a process group."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

_OPS = {
    "mean": dist.ReduceOp.SUM,
    "sum": dist.ReduceOp.SUM,
    "max": dist.ReduceOp.MAX,
    "min": dist.ReduceOp.MIN,
}


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size(group: Any = None) -> int:
    return dist.get_world_size(group) if is_distributed() else 1


def rank(group: Any = None) -> int:
    return dist.get_rank(group) if is_distributed() else 0


def all_reduce(data: Any, op: str = "mean", device: torch.device | None = None, group: Any = None) -> Any:
    """Reduces ``data`` over ranks: a tensor keeps its device and dtype (a mean of an integer
    tensor is returned as float), a python number comes back as a python number, a dict is reduced
    value by value."""
    if op not in _OPS:
        raise ValueError(f"op={op!r} is invalid: valid are {', '.join(_OPS)}")
    if isinstance(data, dict):
        return {k: all_reduce(v, op, device, group) for k, v in data.items()}
    is_tensor = torch.is_tensor(data)
    t = data if is_tensor else torch.tensor(data, dtype=torch.float64)
    if not is_distributed():
        out = t.clone()
    else:
        comm_device = device if device is not None else t.device
        out = t.detach().clone().to(comm_device)
        if op == "mean" and not out.is_floating_point():
            out = out.double()
        dist.all_reduce(out, op=_OPS[op], group=group)
        out = out.to(t.device)
    if op == "mean":
        out = (out if out.is_floating_point() else out.double()) / world_size(group)
    if not is_tensor:
        return out.item()
    return out


def all_gather(data: Any, device: torch.device | None = None, group: Any = None) -> Any:
    """Gathers ``data`` from every rank: tensors are concatenated along dim 0 (0-d tensors
    stacked; first dims may differ between ranks), python scalars become a list, dicts per key."""
    if isinstance(data, dict):
        return {k: all_gather(v, device, group) for k, v in data.items()}
    if not torch.is_tensor(data):
        if not is_distributed():
            return [data]
        out: list[Any] = [None] * world_size(group)
        dist.all_gather_object(out, data, group=group)
        return out
    scalar = data.dim() == 0
    t = data.reshape(1) if scalar else data
    if not is_distributed():
        return t.clone()
    comm_device = device if device is not None else t.device
    n = world_size(group)
    sizes_t = torch.tensor([t.shape[0]], dtype=torch.int64, device=comm_device)
    sizes = [torch.zeros_like(sizes_t) for _ in range(n)]
    dist.all_gather(sizes, sizes_t, group=group)
    lengths = [int(s.item()) for s in sizes]
    longest = max(lengths)
    local = t.detach().to(comm_device)
    if local.shape[0] < longest:
        pad = local.new_zeros((longest - local.shape[0], *local.shape[1:]))
        local = torch.cat([local, pad])
    parts = [torch.empty_like(local) for _ in range(n)]
    dist.all_gather(parts, local.contiguous(), group=group)
    return torch.cat([p[:length] for p, length in zip(parts, lengths)]).to(t.device)


def all_gather_object(obj: Any, group: Any = None) -> list[Any]:
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def broadcast_object(obj: Any, src: int = 0, group: Any = None) -> Any:
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]
