"""Small helpers every backend and engine shares: seeding and RNG state, host reads of device
scalars, a free port, the device cache, a process's children."""

from __future__ import annotations

import os
import random
import socket
from typing import Any, cast

import torch


def set_seed(seed: int) -> None:
    """Seeds python, numpy (when installed) and torch (CPU and every CUDA device)."""
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % (2**32))
    except ImportError:
        pass
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def get_rng_state() -> dict[str, Any]:
    """RNG states in a form that ``torch.load(weights_only=True)`` reads back."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np

        kind, keys, pos, has_gauss, gauss = cast(tuple[Any, ...], np.random.get_state())
        state["numpy"] = [
            kind,
            torch.from_numpy(keys.astype("int64")),
            int(pos),
            int(has_gauss),
            float(gauss),
        ]
    except ImportError:
        pass
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        try:
            import numpy as np

            kind, keys, pos, has_gauss, gauss = state["numpy"]
            np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, gauss))
        except ImportError:
            pass
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class HostScalar:
    """A 0-d (or 1-element) tensor read on the host without draining the device queue.

    On CUDA the value is copied to pinned host memory in stream order and an event is recorded;
    ``float()`` then waits for that event only. Capture the gradient norm *before* queuing the
    optimizer update and read it *after*: the host waits for the norm, not for the update, so the
    next forward is launched while the optimizer kernels still run (a plain ``float(norm)`` after
    ``optimizer.step()`` leaves the GPU idle meanwhile). On CPU it is the value itself."""

    __slots__ = ("_event", "_host")

    def __init__(self, value: torch.Tensor) -> None:
        value = value.detach().reshape(())
        if value.is_cuda:
            self._host = torch.empty((), dtype=value.dtype, pin_memory=True)
            self._host.copy_(value, non_blocking=True)
            self._event: Any = torch.cuda.Event()
            self._event.record()
        else:
            self._host, self._event = value, None

    def __float__(self) -> float:
        if self._event is not None:
            self._event.synchronize()
        return float(self._host)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a process group's ``MASTER_PORT``)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def empty_device_cache() -> None:
    """Returns the CUDA caching allocator's free blocks to the device (after the queued work); a
    no-op without CUDA."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def child_pids(pid: int | None = None) -> list[int]:
    """The direct children of process ``pid`` (this process by default): from psutil when it is
    installed, else from ``/proc/<pid>/task/*/children`` (Linux). Empty when the process is gone,
    or where neither is available."""
    pid = os.getpid() if pid is None else pid
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        try:
            return [c.pid for c in psutil.Process(pid).children()]
        except psutil.Error:  # gone meanwhile
            return []
    out: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(x) for x in f.read().split()]
    except OSError:
        pass
    return out
