"""The processes of an SGLang engine: finding them when ``sglang.Engine()`` starts them (with a
deadline on the start), watching them die during every call (``EngineDiedError`` with the last
lines of SGLang's log, instead of a call that waits forever; SGLang's SIGQUIT taken over so a
failing scheduler does not kill training), and stopping and reaping the whole tree at shutdown."""

from __future__ import annotations

import _thread
import multiprocessing
import os
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from lightrft.strategy.engine import EngineDiedError
from lightrft.strategy.utils import child_pids

#: Lines of the scheduler log (and of the stack dump) quoted when the start fails.
_TAIL_LINES = 40
#: Seconds between liveness checks of the engine's processes while a call waits on them (env
#: ``LIGHTRFT_SGLANG_DEATH_POLL_S``; 0 calls SGLang directly, unwatched). A dead scheduler is reported
#: within about this long, instead of a call that waits forever.
DEFAULT_DEATH_POLL_S = 0.5
#: Seconds the engine's processes get to exit after SIGTERM at shutdown, then again after SIGKILL.
_TERM_GRACE_S = 3.0
_KILL_GRACE_S = 5.0
#: Seconds between two walks of the engine's process tree before calls (``EngineProcesses.watched``).
_TREE_REFRESH_S = 10.0
#: monotonic times of the SIGQUITs SGLang's processes sent this process (``_on_sigquit``).
_SIGQUITS: list[float] = []


def _on_sigquit(signum: int, frame: Any) -> None:
    """SIGQUIT from an SGLang subprocess (it failed): remembered, the training process lives on."""
    _SIGQUITS.append(time.monotonic())


class EngineProcesses:
    """The processes one ``sglang.Engine`` started on the group's first rank (schedulers,
    detokenizer, and what they spawn). Found when the engine starts (:meth:`found`), watched
    during every call (:meth:`watched`: a dead one raises :class:`EngineDiedError` quoting the
    log instead of a call that waits forever) and stopped at shutdown (:meth:`shutdown`)."""

    def __init__(self) -> None:
        #: The engine's direct children (SGLang's schedulers and detokenizer).
        self.pids: list[int] = []
        #: Those and their descendants, pid -> start time (``process_tree``): stopped at
        #: shutdown, also the ones a dead scheduler orphaned.
        self.tree: dict[int, str] = {}
        #: SGLang's log, quoted when the engine dies.
        self.log_path: Path | None = None
        self.death_poll_s = float(os.environ.get("LIGHTRFT_SGLANG_DEATH_POLL_S", DEFAULT_DEATH_POLL_S))
        #: (what happened, log tail) once the engine died.
        self.dead: tuple[str, str] | None = None
        #: Whether there is an engine to watch (its first rank, from its start to its shutdown).
        self.watching = False
        self._started_at = time.monotonic()
        self._tree_seen_at = time.monotonic()

    def found(self, before: set[int]) -> None:
        """Records the children this process has now that were not in ``before`` (multiprocessing's
        resource tracker aside): the engine's, just started."""
        self.pids = [p for p in child_pids() if p not in before and "resource_tracker" not in _cmdline(p)]
        self.tree = process_tree(self.pids)
        self._tree_seen_at = self._started_at = time.monotonic()
        self.watching = True

    def find_death(self) -> str | None:
        """What killed the engine, or None while its processes run."""
        if not self.watching:
            return None
        gone = [p for p in self.pids if not _alive(p)]
        if gone:
            return f"its process(es) {gone} (scheduler / detokenizer of {self.log_path}) exited"
        if any(t >= self._started_at for t in _SIGQUITS):
            return "one of its processes reported a failure (SIGQUIT)"
        return None

    def mark_dead(self, what: str, tail: str | None = None) -> EngineDiedError:
        self.dead = (what, _log_tails(self.log_path) if tail is None else tail)
        return EngineDiedError("sglang", *self.dead)

    def watched(self, what: str, call: Callable[[], Any], device: torch.device) -> Any:
        """``call()`` (an SGLang call, first rank) while the engine's processes are watched: a
        dead process raises :class:`EngineDiedError` within ``death_poll_s`` instead of a call that
        waits forever. The call runs on a helper thread (a call left waiting on a dead scheduler
        stays there: the engine is unusable from then on)."""
        death = self.find_death()
        if death is not None:
            raise self.mark_dead(f"{death} before {what}")
        if self.tree and time.monotonic() - self._tree_seen_at > _TREE_REFRESH_S:
            # Processes spawned since (a death would orphan them); not per bucket of a push.
            self.tree = refresh_tree(self.tree)
            self._tree_seen_at = time.monotonic()
        if self.death_poll_s <= 0 or not self.pids:
            return call()
        box: dict[str, Any] = {}
        done = threading.Event()

        def run() -> None:
            try:
                if device.type == "cuda":
                    torch.cuda.set_device(device)
                box["value"] = call()
            except BaseException as e:  # handed to the caller's thread
                box["error"] = e
            finally:
                done.set()

        threading.Thread(target=run, name=f"sglang-{what}", daemon=True).start()
        while not done.wait(self.death_poll_s):
            death = self.find_death()
            if death is not None:
                raise self.mark_dead(f"{death} during {what}")
        if "error" in box:
            death = self.find_death()
            if death is not None:
                raise self.mark_dead(f"{death} during {what}") from box["error"]
            raise box["error"]
        return box["value"]

    def shutdown(self, engine_shutdown: Callable[[], Any]) -> None:
        """``engine_shutdown()`` (SGLang's; 0.5.16: SIGKILL to this process's children, no wait),
        then, whatever it did or raised, every process of the engine's tree that still runs
        (schedulers, detokenizer and what they spawned, also ones a killed scheduler left
        orphaned) gets SIGTERM, then SIGKILL, and this process's children among them are reaped:
        none is left running or as a zombie. Bounded: about ``_TERM_GRACE_S + _KILL_GRACE_S``
        seconds past SGLang's shutdown at most."""
        self.watching = False
        tree = refresh_tree(self.tree)  # before SGLang's kill orphans grandchildren
        try:
            engine_shutdown()
        finally:
            left = stop_process_tree(tree)
            if left:
                warnings.warn(
                    f"SGLang engine processes {left} still exist after SIGKILL and "
                    f"{_KILL_GRACE_S:.0f} s (uninterruptible, e.g. in the GPU driver)",
                    RuntimeWarning,
                    stacklevel=3,
                )


def start_with_deadline(create: Callable[[], Any], timeout_s: float, log_path: Path | None) -> Any:
    """``create()`` (``sglang.Engine(...)``, which waits for its schedulers without a limit), with a
    deadline: after ``timeout_s`` seconds the processes it spawned are sent SIGABRT (faulthandler
    writes their stacks to ``<log_path>.stacks``), then SIGKILL; ``Engine()`` notices a dead
    scheduler within 5 s (``_wait_for_scheduler_ready``, 0.5.16 ``engine.py:1370-1396``) and
    raises, and if it still has not returned 30 s later the main thread is interrupted. Any failure
    is raised with the last lines of the log (a ``TimeoutError`` when the deadline passed)."""
    before = set(child_pids())
    done = threading.Event()
    fired = threading.Event()
    in_main_thread = threading.current_thread() is threading.main_thread()

    def watchdog() -> None:
        if done.wait(timeout_s):
            return
        fired.set()
        _stop_children(before)
        if not done.wait(30.0) and in_main_thread:
            _thread.interrupt_main()

    t0 = time.monotonic()
    if timeout_s > 0:
        threading.Thread(target=watchdog, name="sglang-start-deadline", daemon=True).start()
    try:
        return create()
    except BaseException as e:
        took = time.monotonic() - t0
        if fired.is_set():
            raise TimeoutError(
                f"SGLang engine was not ready after {timeout_s:.0f} s (start_timeout_s / "
                f"LIGHTRFT_SGLANG_START_TIMEOUT); its scheduler processes were stopped.\n"
                + _log_tails(log_path)
            ) from e
        if isinstance(e, Exception):
            raise RuntimeError(
                f"SGLang engine failed to start after {took:.0f} s: {type(e).__name__}: {e}\n"
                + _log_tails(log_path)
            ) from e
        raise
    finally:
        done.set()


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _stop_children(before: set[int]) -> None:
    """SIGABRT, then SIGKILL after 10 s, to the children spawned since ``before`` (SGLang's
    schedulers and detokenizer; multiprocessing's resource tracker is left alone)."""
    victims = [p for p in child_pids() if p not in before and "resource_tracker" not in _cmdline(p)]
    for sig in (signal.SIGABRT, signal.SIGKILL):
        for p in victims:
            try:
                os.kill(p, sig)
            except OSError:
                pass
        deadline = time.monotonic() + 10.0
        while sig == signal.SIGABRT and time.monotonic() < deadline and any(map(_alive, victims)):
            time.sleep(0.5)


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (exists and is not a zombie)."""
    stat = _stat(pid)
    return stat is not None and stat[0] != "Z"


def _stat(pid: int) -> tuple[str, int, str] | None:
    """``pid``'s state letter, parent pid and start time (clock ticks since boot, which tells a
    reused pid apart) from ``/proc/<pid>/stat``; None when there is no such process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[-1].split()
        return fields[0], int(fields[1]), fields[19]
    except (OSError, IndexError, ValueError):
        return None


def process_tree(pids: Iterable[int]) -> dict[int, str]:
    """``pids`` and all their descendants that exist now, each with its start time."""
    tree: dict[int, str] = {}
    todo = list(pids)
    while todo:
        pid = todo.pop()
        stat = _stat(pid)
        if pid in tree or stat is None:
            continue
        tree[pid] = stat[2]
        todo += child_pids(pid)
    return tree


def _still(tree: dict[int, str]) -> dict[int, tuple[str, int]]:
    """The processes of ``tree`` that exist (zombies too) and are the ones recorded (same start
    time), pid -> (state, parent pid)."""
    out = {}
    for pid, start in tree.items():
        stat = _stat(pid)
        if stat is not None and stat[2] == start:
            out[pid] = stat[:2]
    return out


def refresh_tree(tree: dict[int, str]) -> dict[int, str]:
    """``tree`` plus the descendants its running processes have now."""
    running = [pid for pid, (state, _) in _still(tree).items() if state != "Z"]
    return {**tree, **process_tree(running)}


def left_processes(tree: dict[int, str]) -> list[int]:
    """The processes of ``tree`` that are left: running, or a zombie this process has not reaped
    (a zombie of another parent is that parent's to reap)."""
    me = os.getpid()
    return sorted(pid for pid, (state, ppid) in _still(tree).items() if state != "Z" or ppid == me)


def _reap(tree: dict[int, str]) -> None:
    """Reaps this process's exited children in ``tree``: multiprocessing's own first (SGLang
    starts its schedulers and detokenizer as ``multiprocessing.Process``, which keeps their exit
    codes), then any other zombie child with ``waitpid``."""
    multiprocessing.active_children()  # joins every finished multiprocessing child
    me = os.getpid()
    for pid, (state, ppid) in _still(tree).items():
        if state == "Z" and ppid == me:
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:  # reaped meanwhile (by its Process or Popen object)
                pass


def stop_process_tree(
    tree: dict[int, str], term_grace_s: float | None = None, kill_grace_s: float | None = None
) -> list[int]:
    """SIGTERM to every process of ``tree`` that still runs, SIGKILL to those still running after
    ``term_grace_s``; this process's children among them are reaped as they exit. Returns the
    processes left (``left_processes``) after ``kill_grace_s`` more; normally none."""
    graces = (
        (signal.SIGTERM, _TERM_GRACE_S if term_grace_s is None else term_grace_s),
        (signal.SIGKILL, _KILL_GRACE_S if kill_grace_s is None else kill_grace_s),
    )
    left: list[int] = []
    for sig, grace in graces:
        for pid, (state, _) in _still(tree).items():
            if state != "Z":
                try:
                    os.kill(pid, sig)
                except OSError:
                    pass
        deadline = time.monotonic() + grace
        while True:
            _reap(tree)
            left = left_processes(tree)
            if not left or time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        if not left:
            break
    return left


def _tail(path: Path, n: int) -> list[str]:
    try:
        with open(path, errors="replace") as f:
            return f.readlines()[-n:]
    except OSError:
        return []


def _log_tails(log_path: Path | None) -> str:
    """The last lines of SGLang's log and of the schedulers' stack dumps, for an error message."""
    if log_path is None:
        return "(no SGLang log file)"
    parts = []
    for path, what in ((log_path, "SGLang log"), (Path(str(log_path) + ".stacks"), "scheduler stacks")):
        lines = _tail(path, _TAIL_LINES)
        head = f"--- {what} {path} (last {len(lines)} lines) ---\n"
        parts.append(head + ("".join(lines) if lines else "(empty)\n"))
    return "".join(parts)


__all__ = [
    "EngineProcesses",
    "left_processes",
    "process_tree",
    "refresh_tree",
    "start_with_deadline",
    "stop_process_tree",
]
