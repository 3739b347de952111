"""Entry point of one rank of :func:`lightrft.testing.run_distributed` (``python -m``)."""

from __future__ import annotations

import importlib
import os
import sys
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist


def main() -> int:
    target, tmp = sys.argv[1], Path(sys.argv[2])
    rank = int(os.environ.get("RANK", "0"))
    module_name, qualname = target.split(":", 1)
    try:
        obj: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part)
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
