"""A push that maps the training rank's live weights into SGLang's scheduler once, then replays.

When one training rank feeds one SGLang scheduler (``engine_tp_size=1``, one rank: FSDP2 on one
GPU hands out its fp32 masters as they are), the tensors a push reads are the same storages every
time. The flattened-bucket path copies them into a bucket (a read and a write of every byte more
than the floor) and pays SGLang's per-call cost once per bucket (CUDA IPC handles opened, a
round trip to the scheduler, ``load_weights`` in Python): 118 ms at 3.5B against a 10.6 ms floor.

This path sends the tensors' CUDA IPC handles once, in one ``update_weights_from_tensor`` call
with ``load_format`` naming :func:`load_live` (registered through SGLang's
``custom_weight_loader``). In the scheduler, :func:`load_live` loads them through a
:class:`~lightrft.engines._copy_plan.CopyPlan` (``load_weights`` recorded once, then replayed as
plain copies that also round fp32 to the engine's dtype) and *keeps* the opened tensors. Every
later push whose tensors are the same storages, shapes and dtypes (:class:`LiveSender` checks)
sends one message, ``replay`` with the token of that map: the scheduler replays the plan from
the tensors it holds, which read the masters' current values. One round trip, each master read
once and each engine weight written once.

Every message's tensors are mapped tensors: a replay or release is carried by the map's first
tensor, whose storage the scheduler finds in torch's CUDA IPC cache. SGLang's serializer patches
torch's tensor reducer for CUDA tensors only (``patch_torch._reduce_tensor_modified`` rewrites
argument 6, the device): a CPU tensor in a message fails to pickle with ``IndexError`` (seen on
the H200 on 2026-12-04, where a 0-element CPU carrier stopped the first push).

Ordering: a replayed read has no IPC event to wait on, so the sender synchronizes its stream
before the call; :func:`load_live` synchronizes the scheduler's stream before it returns, so the
next optimizer step cannot overwrite a master the copies still read.

A message :func:`load_live` cannot serve raises, and an exception in a custom loader ends SGLang's
scheduler: the engine then raises :class:`~lightrft.strategy.engine.EngineDiedError` on every rank
of its group, quoting the traceback from its log, with the training state intact. Loud, never
stale weights in silence. The sender never sends such a message by construction: a replay only
follows a successful map to the same scheduler.

Memory: the scheduler's mapping of the masters allocates nothing (it is the same device memory).
The sender's CUDA caching allocator keeps a block whose handle is held elsewhere until it is
released: the held tensors are the live parameters, alive anyway, and :func:`release_message`
lets them go at shutdown or when the sender maps new storages.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from collections.abc import Sequence
from typing import Any

import torch

from ._copy_plan import CopyPlan

logger = logging.getLogger(__name__)

#: The ``load_format`` (and ``custom_weight_loader`` entry) SGLang imports this loader by.
LOADER = f"{__name__}.load_live"

_MAP, _REPLAY, _RELEASE = "lightrft-live-map:", "lightrft-live-replay:", "lightrft-live-release:"


@dataclasses.dataclass
class _Mapped:
    token: str
    tensors: list[tuple[str, torch.Tensor]]


@dataclasses.dataclass
class LiveState:
    """What one scheduler process holds: per model, the tensors of the last map and its plan."""

    mapped: dict[int, _Mapped] = dataclasses.field(default_factory=dict)
    plans: dict[int, CopyPlan] = dataclasses.field(default_factory=dict)
    maps: int = 0
    replays: int = 0


#: The scheduler process's state (module-level: SGLang calls the loader as a plain function).
LIVE_STATE = LiveState()


def _fingerprint(t: torch.Tensor) -> tuple[Any, ...]:
    s = t.untyped_storage()
    return (
        t.device,
        s.data_ptr(),
        s.nbytes(),
        t.storage_offset(),
        tuple(t.shape),
        tuple(t.stride()),
        t.dtype,
    )


class LiveSender:
    """The sender's side: which message a push of ``named`` live tensors needs."""

    def __init__(self) -> None:
        self.token: str | None = None
        self._prints: list[tuple[str, tuple[Any, ...]]] | None = None
        #: The mapped tensor that carries replays and the release (see the module docstring).
        self._carrier: torch.Tensor | None = None
        #: The map of the call in flight (token, fingerprints, carrier) until :meth:`sent`.
        self._pending: tuple[str, list[tuple[str, tuple[Any, ...]]], torch.Tensor] | None = None

    def message(self, named: Sequence[tuple[str, torch.Tensor]]) -> list[tuple[str, torch.Tensor]]:
        """The ``named_tensors`` of the call: a replay of the last map when ``named`` are the same
        names over the same storages, offsets, shapes, strides and dtypes; else a new map (every
        tensor, under a new token). Call :meth:`sent` once the call succeeded."""
        if not named:
            raise ValueError("LiveSender.message: no tensors to push")
        prints = [(n, _fingerprint(t)) for n, t in named]
        if self.token is not None and prints == self._prints:
            return [(_REPLAY + self.token, named[0][1])]  # a mapped tensor carries it
        self._pending = (uuid.uuid4().hex, prints, named[0][1])
        return [(_MAP + self._pending[0], named[0][1]), *named]

    def sent(self, message: Sequence[tuple[str, torch.Tensor]]) -> None:
        """Records that ``message`` reached the engine (a map becomes the one replays refer to)."""
        if message and message[0][0].startswith(_MAP) and self._pending is not None:
            (self.token, self._prints, self._carrier), self._pending = self._pending, None

    def release_message(self) -> list[tuple[str, torch.Tensor]] | None:
        """The message that makes the scheduler drop the mapped tensors (None: nothing mapped);
        carried by a mapped tensor."""
        if self.token is None or self._carrier is None:
            return None
        token, carrier = self.token, self._carrier
        self.token, self._prints, self._carrier = None, None, None
        return [(_RELEASE + token, carrier)]


def load_live(model: torch.nn.Module, named_tensors: Sequence[tuple[str, torch.Tensor]]) -> None:
    """SGLang's custom weight loader (``load_format=LOADER``), run in the scheduler: serves a
    map, replay or release message (see the module docstring); raises on any other."""
    state = LIVE_STATE
    if not named_tensors:
        raise ValueError("lightrft live push: an empty message")
    head, rest = named_tensors[0][0], list(named_tensors[1:])
    key = id(model)
    t0 = time.perf_counter()
    if head.startswith(_MAP):
        plan = state.plans.setdefault(key, CopyPlan())
        state.mapped.pop(key, None)  # the previous map's tensors go before the new ones load
        plan.push(model, rest, model.load_weights)
        state.mapped[key] = _Mapped(head[len(_MAP) :], rest)
        state.maps += 1
        _say_plan("map", plan, len(rest))
    elif head.startswith(_REPLAY):
        mapped, token = state.mapped.get(key), head[len(_REPLAY) :]
        if mapped is None or mapped.token != token:
            have = None if mapped is None else mapped.token
            raise LookupError(
                f"lightrft live push: a replay of map {token!r}, but this scheduler holds {have!r}"
            )
        state.plans[key].push(model, mapped.tensors, model.load_weights)
        state.replays += 1
    elif head.startswith(_RELEASE):
        state.mapped.pop(key, None)
    else:
        raise ValueError(f"lightrft live push: the first name is {head!r}, not a live-push message")
    held = state.mapped.get(key)
    if held is not None and held.tensors and held.tensors[0][1].is_cuda:
        torch.cuda.current_stream().synchronize()  # the sender may write the masters next
    if head.startswith(_REPLAY) and state.replays <= 3:  # the scheduler's side, copies waited for
        took = time.perf_counter() - t0
        _say_plan(f"replay {state.replays} ({took * 1e3:.2f} ms here)", state.plans[key], len(held.tensors))


def _say_plan(what: str, plan: CopyPlan, n: int) -> None:
    """One line in SGLang's log: how the plan serves the pushes (replayed copies, or names loaded
    by ``load_weights`` every time: refused, or the whole plan off)."""
    logger.info(
        "lightrft live push, %s of %d tensors: plan %s, %d names refused, disabled=%s",
        what,
        n,
        dict(plan.stats),
        len(plan.refused),
        plan.disabled,
    )


__all__ = ["LIVE_STATE", "LOADER", "LiveSender", "LiveState", "load_live"]
