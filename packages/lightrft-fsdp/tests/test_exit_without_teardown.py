"""A user's `torchrun train.py` on this backend that never tears down exits 0 on every rank.

The script (``lightrft.testing.exit_check``) trains, saves and loads a checkpoint, pushes to an
engine and returns with the process group, the engine and an unwaited all-reduce alive, while a CPU
hog runs beside it. Without the strategies' exit hook (``lightrft.strategy.teardown``) its ranks
abort at exit (``terminate called without an active exception``, SIGABRT / SIGSEGV) every time:
the unwaited collective makes the failure deterministic. ``scripts/stress-tests`` repeats it.
"""

from __future__ import annotations

import pytest

from lightrft.testing.exit_check import default_engine, exit_problems, launch_without_teardown

pytest.importorskip("transformers")


def test_ranks_exit_zero_without_teardown() -> None:
    launch = launch_without_teardown("fsdp", hogs=1)
    assert exit_problems(launch) == []
    engine = {"hf": "HFEngine", "fake": "FakeEngine"}[default_engine()]
    assert [r["engine"] for r in launch["reports"]] == [engine, engine]
    assert launch["reports"][0]["losses"] == launch["reports"][1]["losses"]
