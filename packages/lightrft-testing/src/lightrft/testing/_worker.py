"""Entry point of one rank of :func:`lightrft.testing.run_distributed` (``python -m``)."""

from __future__ import annotations

import faulthandler
import os
import signal
import sys
import traceback
from pathlib import Path

import torch

from lightrft.strategy.teardown import close_all
from lightrft.testing._resolve import resolve


def main() -> int:
    target, tmp = sys.argv[1], Path(sys.argv[2])
    source_file = sys.argv[3] if len(sys.argv) > 3 else None
    rank = int(os.environ.get("RANK", "0"))
    # On a timeout, run_distributed sends SIGUSR1: every rank writes where each thread is.
    (tmp / f"rank{rank}.pid").write_text(str(os.getpid()))  # torchrun starts ranks in their own sessions
    stacks = open(tmp / f"rank{rank}.stack", "w")  # noqa: SIM115 - open until the process ends
    faulthandler.register(signal.SIGUSR1, file=stacks, all_threads=True)
    try:
        obj = resolve(target, source_file)
        kwargs = torch.load(tmp / "kwargs.pt", weights_only=True)
        result = obj(**kwargs)
        torch.save(result, tmp / f"rank{rank}.pt")
        code = 0
    except BaseException:
        (tmp / f"rank{rank}.err").write_text(traceback.format_exc())
        code = 1
    finally:
        # The same teardown as a strategy's exit hook (lightrft.strategy.teardown): the strategies'
        # engines and backend objects first, while the group still works; then every rank leaves
        # the group, after a barrier when it succeeded, and the communication threads settle;
        # also for a group a rank function made itself.
        close_all(barrier=code == 0)
    return code


if __name__ == "__main__":
    sys.exit(main())
