"""Run a function on N ranks under ``torchrun`` (gloo on CPU, NCCL on GPUs) and collect results.

The function is named by import path (``"package.module:function"``, or a module-level callable);
it receives ``**kwargs`` on every rank and returns tensors, numbers, strings, lists, tuples and
dicts of them. Results travel back through ``torch.save`` / ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


class DistributedRunError(RuntimeError):
    """A rank failed (its traceback is in the message) or the launch itself failed."""


def _fn_path(fn: str | Callable[..., Any]) -> str:
    if isinstance(fn, str):
        if ":" not in fn:
            raise ValueError(f"fn={fn!r} is invalid: use 'package.module:function'")
        return fn
    module, qualname = fn.__module__, fn.__qualname__
    if module == "__main__" or "<locals>" in qualname:
        raise ValueError(f"fn={qualname!r} must be a module-level function of an importable module")
    return f"{module}:{qualname}"


def run_distributed(
    fn: str | Callable[..., Any],
    world_size: int = 2,
    kwargs: dict[str, Any] | None = None,
    timeout: float = 600.0,
    env: dict[str, str] | None = None,
) -> list[Any]:
    """Runs ``fn(**kwargs)`` on ``world_size`` processes launched by ``torchrun --standalone``
    and returns the per-rank results, rank 0 first. Raises DistributedRunError on failure."""
    target = _fn_path(fn)
    with tempfile.TemporaryDirectory(prefix="lightrft-dist-") as tmp:
        tmpdir = Path(tmp)
        torch.save(kwargs or {}, tmpdir / "kwargs.pt")
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world_size}",
            "--max-restarts=0", "-m", "lightrft.testing._worker", target, str(tmpdir),
        ]  # fmt: skip
        child_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
        child_env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions"))
        try:
            proc = subprocess.run(cmd, env=child_env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise DistributedRunError(
                f"{target} on {world_size} ranks timed out after {timeout}s\n{_tail(e.stderr)}"
            ) from e
        results: list[Any] = []
        errors: list[str] = []
        for rank in range(world_size):
            out = tmpdir / f"rank{rank}.pt"
            err = tmpdir / f"rank{rank}.err"
            if err.exists():
                errors.append(f"--- rank {rank} ---\n{err.read_text()}")
            elif out.exists():
                results.append(torch.load(out, weights_only=True))
            else:
                errors.append(f"--- rank {rank} --- wrote no result")
        if errors or proc.returncode != 0:
            raise DistributedRunError(
                f"{target} on {world_size} ranks failed (exit code {proc.returncode}):\n"
                + "\n".join(errors)
                + f"\n--- stderr tail ---\n{_tail(proc.stderr)}"
            )
        return results


def _tail(text: str | bytes | None, n: int = 6000) -> str:
    if text is None:
        return ""
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return text[-n:]
