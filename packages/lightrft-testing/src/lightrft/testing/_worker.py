"""Entry point of one rank of :func:`lightrft.testing.run_distributed` (``python -m``)."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist


def resolve(target: str, source_file: str | None = None) -> Any:
    """The object named by ``"package.module:qualname"``: imported by name; where the name does not
    import (a test module that pytest imported by path), loaded from ``source_file``."""
    module_name, qualname = target.split(":", 1)
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        missing = e.name or ""
        if not source_file or not (module_name == missing or module_name.startswith(missing + ".")):
            raise
        spec = importlib.util.spec_from_file_location(module_name, source_file)
        if spec is None or spec.loader is None:
            raise
        obj = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = obj
        spec.loader.exec_module(obj)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def main() -> int:
    target, tmp = sys.argv[1], Path(sys.argv[2])
    source_file = sys.argv[3] if len(sys.argv) > 3 else None
    rank = int(os.environ.get("RANK", "0"))
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
