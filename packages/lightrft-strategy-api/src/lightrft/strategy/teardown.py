"""Leaving torch.distributed cleanly, also when a script never tears down.

A rank used to die at exit with SIGABRT (exit -6) and ``terminate called without an active
exception`` (seen at the end of 2-rank FSDP and ZeRO-3 launches, rarely, more often under load).
The process group's C++ threads (gloo: a ``gloo_tcp_loop`` and two ``pt_gloo_runloop`` threads per
group) outlive ``destroy_process_group``: it only unregisters the groups, and every DeviceMesh,
FSDP state and DeepSpeed group object that still holds one keeps the C++ object, and its threads,
alive until the interpreter's finalization frees them. A collective left running (a ZeRO-3
prefetch, an async all-gather nobody waited for) or just finished (a worker thread still holding the
last reference to its tensors or to a Python callback of its future) then reaches into Python from
that thread while the interpreter is being torn down; CPython ends such a thread with
``pthread_exit``, and the forced unwind through a ``noexcept`` C++ frame calls ``std::terminate``.

So the strategy that creates the process group registers :func:`close_at_exit`; at interpreter exit
(atexit runs while the interpreter is still whole) it, in this order:

1. shuts down every live strategy's engines and backend objects (DeepSpeed engines, ...), which may
   issue collectives of their own;
2. on a normal exit only, waits for every rank at a barrier (bounded), so that no peer is still
   inside a collective with this rank; after an uncaught exception the barrier is skipped (a peer
   may be stuck elsewhere; torchrun stops the others once this rank exits non-zero);
3. destroys the process group (every group, default included);
4. lets the communication threads finish what they hold: until none of them is runnable (a few
   samples in a row, a second at most), the main thread sleeps, which also hands them the GIL.

A script that tears down itself (``strategy.shutdown()``) makes all of this a no-op.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import os
import sys
import threading
import time
import weakref
from datetime import timedelta
from typing import Any

import torch.distributed as dist

#: Strategies that set up torch.distributed in this process; their engines are shut down at exit.
_LIVE: weakref.WeakSet[Any] = weakref.WeakSet()
_state = {"registered": False, "owned": False, "uncaught": False}
#: Names (``/proc/<pid>/task/<tid>/comm``) of the C++ threads of torch.distributed's backends.
COMM_THREADS = ("gloo_tcp_loop", "pt_gloo_runloop", "pt_nccl", "pt_tcpstore")


def register(strategy: Any, created_group: bool) -> None:
    """Called by ``StrategyBase._init_process_group``: ``strategy`` is shut down at exit, and the
    process group destroyed there when this process's strategy created it."""
    _LIVE.add(strategy)
    if created_group:
        _state["owned"] = True
    if _state["registered"]:
        return
    _state["registered"] = True
    previous = sys.excepthook

    def note_uncaught(*exc_info: Any) -> None:
        _state["uncaught"] = True
        previous(*exc_info)

    sys.excepthook = note_uncaught
    atexit.register(close_at_exit)


def close_at_exit() -> None:
    """The atexit hook (see the module docstring); never raises."""
    close_all(barrier=not _state["uncaught"], only_owned=True)


def close_all(barrier: bool = True, only_owned: bool = False) -> None:
    """Steps 1-4 of the module docstring now: every live strategy's engines and backend objects,
    then the process group (with ``only_owned``, only one a strategy of this process created).
    For a launcher that runs strategies inside its own process (``run_distributed``'s ranks)."""
    for strategy in list(_LIVE):
        with contextlib.suppress(Exception):
            strategy._close_backend()
    if _state["owned"] or not only_owned:
        close_process_group(barrier=barrier)


def close_process_group(barrier: bool = True, barrier_timeout: float = 120.0) -> None:
    """Steps 2-4 of the module docstring: barrier (bounded, when ``barrier``), destroy every group,
    let the communication threads settle. Safe to call when nothing is initialised."""
    if dist.is_available() and dist.is_initialized():
        if barrier:
            with contextlib.suppress(Exception):
                work = dist.barrier(async_op=True)
                if work is not None:
                    work.wait(timeout=timedelta(seconds=barrier_timeout))
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
        _state["owned"] = False
    # Objects in reference cycles (FSDP modules, engines) that hold groups are freed now, while
    # the interpreter can still run what their destructors need.
    gc.collect()
    settle_comm_threads()


def _thread_states() -> dict[int, str]:
    """``{tid: state}`` of this process's torch.distributed C++ threads (Linux; empty elsewhere)."""
    out: dict[int, str] = {}
    task = f"/proc/{os.getpid()}/task"
    try:
        tids = os.listdir(task)
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"{task}/{tid}/comm") as f:
                name = f.read().strip()
            if not name.startswith(COMM_THREADS):
                continue
            with open(f"{task}/{tid}/stat") as f:
                # "pid (comm) S ...": the state follows the last ')'.
                out[int(tid)] = f.read().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError, ValueError):
            continue
    return out


def settle_comm_threads(quiet_samples: int = 3, limit_s: float = 1.0) -> bool:
    """Sleeps (handing the GIL to whoever waits for it) until no torch.distributed C++ thread is
    runnable for ``quiet_samples`` samples in a row, ``limit_s`` at most; True when they settled.
    An idle worker waits on its condition variable (state S); one still releasing a finished
    collective's tensors is running or waits for the GIL, which the sleep gives it."""
    if threading.current_thread() is not threading.main_thread():
        return False
    deadline = time.monotonic() + limit_s
    quiet = 0
    while quiet < quiet_samples:
        states = _thread_states()
        quiet = quiet + 1 if all(s != "R" for s in states.values()) else 0
        if time.monotonic() > deadline:
            return False
        time.sleep(0.002)
    return True
