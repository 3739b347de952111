"""lightrft.strategy.teardown in one process: closing a group stops its communication threads."""

from __future__ import annotations

import gc
import os
import sys

import pytest
import torch
import torch.distributed as dist

from lightrft.strategy import teardown
from lightrft.strategy.utils import free_port

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="thread states come from /proc")


@pytest.fixture
def solo_group(monkeypatch: pytest.MonkeyPatch):
    for name, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0",
                        "WORLD_SIZE": "1"}.items():  # fmt: skip
        monkeypatch.setenv(name, value)
    dist.init_process_group("gloo")
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def _gloo_workers() -> int:
    return sum(1 for tid in os.listdir("/proc/self/task")
               if open(f"/proc/self/task/{tid}/comm").read().startswith("pt_gloo_runloop"))  # fmt: skip


@linux_only
def test_close_process_group_stops_the_gloo_threads(solo_group: None) -> None:
    t = torch.ones(8)
    dist.all_reduce(t)
    assert _gloo_workers() > 0  # the check below is not vacuous
    teardown.close_process_group(barrier=True)
    gc.collect()
    assert not dist.is_initialized()
    # Nothing holds the group any more: its C++ object is gone, and its threads with it.
    assert _gloo_workers() == 0
    assert teardown.settle_comm_threads() is True


def test_close_process_group_without_a_group_is_a_no_op() -> None:
    assert not dist.is_initialized()
    teardown.close_process_group()
    assert not dist.is_initialized()


@linux_only
def test_thread_states_name_the_comm_threads(solo_group: None) -> None:
    states = teardown._thread_states()
    assert states and set(states.values()) <= set("RSDTtZXIWPK")
