"""A user's `torchrun train.py` on DeepSpeed ZeRO-3 that never tears down exits 0 on every rank: one
launch of ``lightrft.testing.exit_check`` (train, save, load, engine push, an unwaited all-reduce
left at exit) on 2 ranks beside a CPU hog, by lightrft-testing's ExitWithoutTeardownSuite."""

from __future__ import annotations

from lightrft.testing.exit_check import ExitWithoutTeardownSuite


class TestDeepspeedZero3ExitWithoutTeardown(ExitWithoutTeardownSuite):
    backend = "ds3"
