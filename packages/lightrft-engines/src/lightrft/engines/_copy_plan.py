"""Replaying a model's ``load_weights`` as plain copies (the fast path of a weight push).

An engine's ``load_weights(named_tensors)`` maps each full Hugging Face tensor onto its own
parameters: fused projections (``q/k/v`` into ``qkv_proj``), the tensor-parallel shard, vocabulary
padding. For standard loaders all of that is views of the incoming tensor copied into views of
the parameters (``narrow`` + ``copy_``), decided by names and shapes only. Per update that Python
costs far more than the copies themselves.

:class:`CopyPlan` runs ``load_weights`` once under a :class:`~torch.utils._python_dispatch.
TorchDispatchMode` that records every operation writing into the model's parameters, with the
view of the incoming tensor it read (offset, sizes and strides into that tensor). Later pushes of
tensors with the same names, shapes, strides and dtypes replay the recorded writes against the
new tensors: the same result, a few microseconds per copy.

A write the plan cannot replay exactly (one that reads a tensor computed by the loader, such as a
cast or a concatenation, or an in-place op that is not a copy or a fill) makes the plan *refuse*
that name: it is loaded by ``load_weights`` every time. A changed name, shape or dtype records the
bucket again. Nothing is ever replayed that was not recorded from the same kind of input.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_REPLAYABLE = {"copy_", "fill_", "zero_"}


class _Src(NamedTuple):
    """A recorded argument that was a view of the incoming tensor (elements from its start)."""

    size: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int

    def of(self, t: torch.Tensor) -> torch.Tensor:
        """The same view of another incoming tensor of the recorded shape, strides and dtype."""
        return t.as_strided(self.size, self.stride, t.storage_offset() + self.offset)


@dataclass
class _Write:
    """One recorded write: ``op`` applied to ``dst`` (a view of a parameter) with arguments that are
    constants or views of the incoming tensor (:class:`_Src`)."""

    op: Any
    dst: torch.Tensor
    args: tuple[Any, ...]


@dataclass
class _Entry:
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype
    writes: list[_Write] = field(default_factory=list)


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


class _Recorder(TorchDispatchMode):
    """Records writes into parameter storage during one ``load_weights`` call."""

    def __init__(self, params: Sequence[torch.Tensor], inputs: Sequence[tuple[str, torch.Tensor]]) -> None:
        super().__init__()
        self.param_storages = {_storage_key(p) for p in params}
        # Incoming tensors may share one storage (a gathered bucket): find them by address range.
        self.inputs = [(n, t, t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for n, t in inputs]
        self.writes: list[tuple[str | None, _Write]] = []
        self.refused: set[str] = set()
        self.last_name: str | None = None
        self.unowned: list[_Write] = []  # writes seen before any input was read

    def _which_input(self, t: torch.Tensor) -> tuple[str, torch.Tensor] | None:
        if t.device.type == "meta" or t.numel() == 0:
            return None
        ptr = t.data_ptr()
        for name, base, lo, hi in self.inputs:
            if _storage_key(t) == _storage_key(base) and lo <= ptr < hi:
                return name, base
        return None

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        # Which input does this op read (for ownership of the writes that follow)?
        for a in args:
            if isinstance(a, torch.Tensor):
                hit = self._which_input(a)
                if hit is not None:
                    self.last_name = hit[0]
        schema = func._schema
        written = [
            args[i] if i < len(args) else kwargs.get(arg.name)
            for i, arg in enumerate(schema.arguments)
            if arg.alias_info is not None and arg.alias_info.is_write
        ]
        targets = [
            t for t in written if isinstance(t, torch.Tensor) and _storage_key(t) in self.param_storages
        ]
        if not targets:
            return out
        name = self.last_name
        opname = schema.name.split("::")[-1]
        if opname not in _REPLAYABLE or kwargs or len(targets) != 1 or args[0] is not targets[0]:
            self._refuse(name)
            return out
        rec_args: list[Any] = []
        for a in args[1:]:
            if isinstance(a, torch.Tensor):
                hit = self._which_input(a)
                if hit is None:
                    self._refuse(name)  # reads a tensor the loader computed: not replayable
                    return out
                src_name, base = hit
                if (name is not None and src_name != name) or a.dtype != base.dtype:
                    self._refuse(name)
                    return out
                name = src_name
                offset = (a.data_ptr() - base.data_ptr()) // a.element_size()
                rec_args.append(_Src(tuple(a.shape), tuple(a.stride()), offset))
            else:
                rec_args.append(a)
        write = _Write(func, args[0], tuple(rec_args))
        if name is None:
            self.unowned.append(write)
        else:
            self.writes.append((name, write))
        return out

    def _refuse(self, name: str | None) -> None:
        if name is None:
            self.refused.add("*")
        else:
            self.refused.add(name)


class CopyPlan:
    """Per-name recorded writes of a model's ``load_weights`` (see the module docstring)."""

    def __init__(self) -> None:
        self.entries: dict[str, _Entry] = {}
        self.refused: set[str] = set()
        self.disabled = False
        self.stats = {"recorded": 0, "replayed": 0, "loaded": 0}
        #: Replay steps per sequence of names (:meth:`_schedule`); cleared by every recording.
        self._schedules: dict[tuple[str, ...], list[_CopyRun | _OpStep]] = {}

    def _matches(self, name: str, t: torch.Tensor) -> bool:
        e = self.entries.get(name)
        return (
            e is not None
            and e.shape == tuple(t.shape)
            and e.stride == tuple(t.stride())
            and e.dtype == t.dtype
        )

    def push(
        self,
        model: torch.nn.Module,
        bucket: Sequence[tuple[str, torch.Tensor]],
        load_weights: Callable[[list[tuple[str, torch.Tensor]]], Any],
    ) -> None:
        """Loads ``bucket`` into ``model``: replays what it can, records or loads the rest."""
        if self.disabled:
            load_weights(list(bucket))
            self.stats["loaded"] += len(bucket)
            return
        replay, known, fresh = [], [], []  # replayed / always loaded (refused) / to record
        for n, t in bucket:
            (known if n in self.refused else replay if self._matches(n, t) else fresh).append((n, t))
        with torch.no_grad():
            self._replay(replay)
        self.stats["replayed"] += len(replay)
        if known:
            load_weights(known)
            self.stats["loaded"] += len(known)
        if fresh:
            self._record(model, fresh, load_weights)

    def _record(
        self,
        model: torch.nn.Module,
        bucket: list[tuple[str, torch.Tensor]],
        load_weights: Callable[[list[tuple[str, torch.Tensor]]], Any],
    ) -> None:
        self._schedules.clear()  # the entries change below
        params = [*model.parameters(), *model.buffers()]
        rec = _Recorder(params, bucket)
        with rec:
            load_weights(bucket)
        if "*" in rec.refused or rec.unowned and len(bucket) > 1:
            # A write no input can be tied to: replaying per name would misplace it.
            self.disabled = True
            return
        for n, _ in bucket:
            self.entries.pop(n, None)
            if n in rec.refused:
                self.refused.add(n)
        owned: dict[str, list[_Write]] = {}
        if rec.unowned:
            owned.setdefault(bucket[0][0], []).extend(rec.unowned)
        for n, w in rec.writes:
            owned.setdefault(n, []).append(w)
        for n, t in bucket:
            if n in self.refused:
                continue
            self.entries[n] = _Entry(tuple(t.shape), tuple(t.stride()), t.dtype, owned.get(n, []))
        self.stats["recorded"] += len(bucket)

    def _replay(self, named: list[tuple[str, torch.Tensor]]) -> None:
        """Re-applies the recorded writes of ``named`` in order, from the schedule of these names
        (:meth:`_schedule`, built once per sequence of names): the incoming tensors are put into
        the recorded views and each run of plain copies goes to the device as one
        ``_foreach_copy_``."""
        if not named:
            return
        key = tuple(n for n, _ in named)
        steps = self._schedules.get(key)
        if steps is None:
            if len(self._schedules) >= _MAX_SCHEDULES:
                self._schedules.clear()
            steps = self._schedules[key] = self._schedule(key)
        tensors = [t for _, t in named]
        for step in steps:
            if isinstance(step, _CopyRun):
                srcs = [tensors[i] if v is None else v.of(tensors[i]) for i, v in step.srcs]
                torch._foreach_copy_(step.dsts, srcs)
            else:
                t = tensors[step.index]
                w = step.write
                w.op(w.dst, *[a.of(t) if isinstance(a, _Src) else a for a in w.args])

    def _schedule(self, names: tuple[str, ...]) -> list[_CopyRun | _OpStep]:
        """The steps that replay ``names``' writes in order. Plain copies gather into runs (one
        ``_foreach_copy_`` each); a write that is not a copy ends a run, and a copy whose target
        overlaps one already in the run starts a new one, so the order of overlapping writes is
        kept. A source view that is the whole incoming tensor is taken as it is (no
        ``as_strided``). The steps depend on the recorded entries only (targets, views, ops), never
        on the values pushed: built once per sequence of names, dropped when anything is recorded
        again."""
        steps: list[_CopyRun | _OpStep] = []
        run = _CopyRun([], [])
        spans: list[tuple[int, int]] = []  # the targets of the run being gathered

        def flush() -> None:
            nonlocal run
            if run.dsts:
                steps.append(run)
                run = _CopyRun([], [])
                spans.clear()

        for i, name in enumerate(names):
            e = self.entries[name]
            for w in e.writes:
                a = w.args[0] if len(w.args) == 1 else None
                if w.op is torch.ops.aten.copy_.default and isinstance(a, _Src):
                    span = _span(w.dst)
                    if any(lo < span[1] and span[0] < hi for lo, hi in spans):
                        flush()
                    whole = (a.size, a.stride, a.offset) == (e.shape, e.stride, 0)
                    run.dsts.append(w.dst)
                    run.srcs.append((i, None if whole else a))
                    spans.append(span)
                else:  # any other write, a copy from a constant among them, keeps its place
                    flush()
                    steps.append(_OpStep(w, i))
        flush()
        return steps


#: Schedules kept per plan (one per sequence of names pushed; a push is one or a few buckets).
_MAX_SCHEDULES = 64


@dataclass
class _CopyRun:
    """Plain copies replayed as one ``_foreach_copy_``: targets, and for each its incoming tensor
    (by position in the push) with the recorded view of it (None: the whole tensor)."""

    dsts: list[torch.Tensor]
    srcs: list[tuple[int, _Src | None]]


@dataclass
class _OpStep:
    """Any other recorded write, applied to the incoming tensor at ``index``."""

    write: _Write
    index: int


def _span(t: torch.Tensor) -> tuple[int, int]:
    """The bytes of ``t``'s storage that ``t`` can touch (a conservative range for overlap)."""
    start = t.data_ptr()
    extent = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()) if size > 0) + 1
    return start, start + extent * t.element_size()
