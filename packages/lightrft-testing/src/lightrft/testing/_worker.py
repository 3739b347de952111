"""Entry point of one rank of :func:`lightrft.testing.run_distributed` (``python -m``)."""

from __future__ import annotations

import faulthandler
import os
import signal
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

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
        # A clean teardown: every rank leaves the group before the interpreter exits (ZeRO-3
        # processes otherwise abort in destructors with "terminate called without an active exception").
        if dist.is_initialized():
            try:
                if code == 0:
                    dist.barrier()
                dist.destroy_process_group()
            except Exception:
                pass
    return code


if __name__ == "__main__":
    sys.exit(main())
