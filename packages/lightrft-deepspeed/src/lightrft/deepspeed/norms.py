"""The gradient norm on the host without draining the GPU queue, and the skip of a bare client
optimizer (ZeRO-0 in fp32) whose norm is not finite."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from lightrft.strategy.utils import HostScalar


class _NormOnHost:
    """Descriptor of ``_global_grad_norm`` on DeepSpeed's optimizer: when DeepSpeed stores the
    norm (right after computing it, before the optimizer kernels), it is copied to pinned host
    memory in stream order and an event recorded. ``optimizer_step`` then waits for that event
    only, not for the whole step: a plain ``float(norm)`` after ``engine.step()`` would drain the
    GPU queue and leave the GPU idle while the next forward is launched (~5% at ZeRO-2)."""

    def __get__(self, obj: Any, objtype: Any = None) -> Any:
        if obj is None:
            return self
        return obj.__dict__.get("_global_grad_norm")

    def __set__(self, obj: Any, value: Any) -> None:
        obj.__dict__["_global_grad_norm"] = value
        if torch.is_tensor(value) and value.is_cuda and value.numel() == 1:
            obj.__dict__["_lightrft_norm_event"] = (value, HostScalar(value))
        else:
            obj.__dict__["_lightrft_norm_event"] = None


_NORM_CLASSES: dict[type, type] = {}


def capture_norm_on_host(optimizer: Any) -> None:
    """Gives DeepSpeed's optimizer object a subclass (same name) whose ``_global_grad_norm`` is
    a :class:`_NormOnHost`; the optimizer is otherwise unchanged."""
    if optimizer is None or not hasattr(optimizer, "_global_grad_norm") or not torch.cuda.is_available():
        return
    cls = type(optimizer)
    if isinstance(cls.__dict__.get("_global_grad_norm"), _NormOnHost):
        return
    if cls not in _NORM_CLASSES:
        _NORM_CLASSES[cls] = type(cls.__name__, (cls,), {"_global_grad_norm": _NormOnHost()})
    current = optimizer.__dict__.pop("_global_grad_norm", None)
    optimizer.__class__ = _NORM_CLASSES[cls]
    optimizer._global_grad_norm = current


def read_norm(engine: Any) -> float:
    """The norm of the step that just ran, as a float (the same on every rank)."""
    value = engine.get_global_grad_norm()
    if value is None:
        return math.nan
    captured = getattr(engine.optimizer, "__dict__", {}).get("_lightrft_norm_event")
    if captured is not None and captured[0] is value:
        return float(captured[1])
    return float(value)


@contextlib.contextmanager
def skip_if(optimizer: Optimizer, skip: bool, params: list[nn.Parameter]) -> Iterator[None]:
    """Makes ``engine.step()`` a counted skip for a bare client optimizer: its ``step`` does
    nothing and ``overflow`` tells DeepSpeed to count the skip and leave the LR scheduler alone.
    Gradients are zeroed (DeepSpeed clips them before stepping and cannot clip no gradients)."""
    optimizer.overflow = skip  # type: ignore[attr-defined]
    if not skip:
        yield
        return
    for p in params:
        p.grad.zero_()  # type: ignore[union-attr]
    optimizer.step = _no_step  # type: ignore[method-assign]
    try:
        yield
    finally:
        del optimizer.step
        optimizer.overflow = False  # type: ignore[attr-defined]


def _no_step(*args: Any, **kwargs: Any) -> None:
    return None


def grad_norm(params: list[nn.Parameter]) -> float:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    return float(torch.nn.utils.get_total_norm(grads, 2.0))
