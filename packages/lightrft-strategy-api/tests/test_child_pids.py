"""lightrft.strategy.utils.child_pids: a process's direct children, from /proc or from psutil
(the SGLang engine's process supervisor and the RL soak's host-RSS probe both list them with it)."""

from __future__ import annotations

import subprocess
import sys
import types

import pytest

from lightrft.strategy.utils import child_pids

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

# A child that starts a grandchild, prints its pid and then waits to be killed.
_PARENT = (
    "import subprocess, sys, time\n"
    "g = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
    "print(g.pid, flush=True)\n"
    "time.sleep(60)\n"
)


@pytest.fixture
def no_psutil(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "psutil", None)  # `import psutil` raises ImportError


@linux_only
def test_proc_lists_the_direct_children_only(no_psutil: None) -> None:
    procs = [
        subprocess.Popen([sys.executable, "-c", _PARENT], stdout=subprocess.PIPE, text=True) for _ in range(2)
    ]
    try:
        assert procs[0].stdout is not None and procs[1].stdout is not None
        grandchildren = [int(p.stdout.readline()) for p in procs]  # type: ignore[union-attr]
        mine = set(child_pids())
        assert {p.pid for p in procs} <= mine
        assert not set(grandchildren) & mine  # not this process's children
        assert child_pids(procs[0].pid) == [grandchildren[0]]
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert not {p.pid for p in procs} & set(child_pids())  # reaped: gone from the list


@linux_only
def test_proc_of_a_process_that_is_gone_is_empty(no_psutil: None) -> None:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    assert child_pids(p.pid) == []


def test_psutil_is_used_when_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[int] = []

    class Error(Exception):
        pass

    class Process:
        def __init__(self, pid: int) -> None:
            asked.append(pid)
            if pid == 2:
                raise Error("no such process")

        def children(self) -> list[types.SimpleNamespace]:
            return [types.SimpleNamespace(pid=11), types.SimpleNamespace(pid=12)]

    monkeypatch.setitem(sys.modules, "psutil", types.SimpleNamespace(Process=Process, Error=Error))
    assert child_pids(7) == [11, 12]
    assert child_pids(2) == []  # gone meanwhile: psutil.Error
    assert asked == [7, 2]
