"""Run a function on N ranks under ``torchrun`` (gloo on CPU, NCCL on GPUs) and collect results.

The function is named by import path (``"package.module:function"``, found through ``pythonpath``),
or given as a module-level callable;
it receives ``**kwargs`` on every rank and returns tensors, numbers, strings, lists, tuples and
dicts of them. Results travel back through ``torch.save`` / ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from ._resolve import resolve

#: torch's intra-op threads on every rank run_distributed starts (``OMP_NUM_THREADS``), and in
#: :func:`rank_threads`. CPU kernels split their reductions by thread count, so a reference computed
#: in the test process matches the ranks' arithmetic only with the same count: set it on both sides.
RANK_THREADS = 1


@contextlib.contextmanager
def rank_threads(n: int = RANK_THREADS) -> Iterator[None]:
    """Runs the block with torch's intra-op thread count of the ranks (``torch.set_num_threads``),
    restoring the caller's count afterwards: for a reference computed in the test process."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class DistributedRunError(RuntimeError):
    """A rank failed (its traceback is in the message) or the launch itself failed."""


PythonPath = str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None


def _target(fn: str | Callable[..., Any]) -> tuple[str, str | None]:
    """``("module:qualname", source file or None)``; the file lets a rank load a function whose
    module pytest imported by path (``--import-mode=importlib``), which no name would import."""
    if isinstance(fn, str):
        if ":" not in fn:
            raise ValueError(f"fn={fn!r} is invalid: use 'package.module:function'")
        return fn, None
    module, qualname = fn.__module__, fn.__qualname__
    if module == "__main__" or "<locals>" in qualname:
        raise ValueError(f"fn={qualname!r} must be a module-level function of an importable module")
    source = getattr(sys.modules.get(module), "__file__", None)
    return f"{module}:{qualname}", source


def _paths(pythonpath: PythonPath) -> list[str]:
    if pythonpath is None:
        return []
    items = [pythonpath] if isinstance(pythonpath, (str, os.PathLike)) else list(pythonpath)
    return [str(Path(p).resolve()) for p in items]


def call(fn: str, kwargs: dict[str, Any] | None = None, pythonpath: PythonPath = None) -> Any:
    """Calls ``fn(**kwargs)`` in this process, ``fn`` named as for :func:`run_distributed`: its
    module is looked up in ``pythonpath`` first, without changing ``sys.path``. For a test that runs
    a rank-side function both here (one rank) and under torchrun (several), so it runs with the
    ranks' thread count (:func:`rank_threads`): its numbers are the ranks' arithmetic."""
    target, _ = _target(fn)
    module_name = target.split(":", 1)[0]
    obj = None
    for directory in _paths(pythonpath):
        top = Path(directory, *module_name.split("."))
        source = top.with_suffix(".py") if top.with_suffix(".py").exists() else top / "__init__.py"
        if source.exists():
            obj = resolve(target, str(source))
            break
    with rank_threads():
        return (obj or resolve(target))(**(kwargs or {}))


def run_distributed(
    fn: str | Callable[..., Any],
    world_size: int = 2,
    kwargs: dict[str, Any] | None = None,
    timeout: float = 600.0,
    env: dict[str, str] | None = None,
    pythonpath: PythonPath = None,
) -> list[Any]:
    """Runs ``fn(**kwargs)`` on ``world_size`` processes launched by ``torchrun --standalone``
    and returns the per-rank results, rank 0 first. Raises DistributedRunError on failure.

    ``fn``: a module-level function, or ``"package.module:function"``. ``pythonpath``: directories
    put first on the ranks' ``PYTHONPATH`` (e.g. a test directory holding the rank-side module),
    so that no ``conftest.py`` has to patch ``sys.path``."""
    target, source = _target(fn)
    with tempfile.TemporaryDirectory(prefix="lightrft-dist-") as tmp:
        tmpdir = Path(tmp)
        torch.save(kwargs or {}, tmpdir / "kwargs.pt")
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world_size}",
            "--max-restarts=0", "-m", "lightrft.testing._worker", target, str(tmpdir), *([source] if source else []),
        ]  # fmt: skip
        child_env = {
            **os.environ,
            "OMP_NUM_THREADS": str(RANK_THREADS),
            "PYTHONUNBUFFERED": "1",
            **(env or {}),
        }
        child_env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions"))
        extra = _paths(pythonpath)
        if extra:
            inherited = [p for p in child_env.get("PYTHONPATH", "").split(os.pathsep) if p]
            child_env["PYTHONPATH"] = os.pathsep.join([*extra, *inherited])
        proc = subprocess.Popen(
            cmd,
            env=child_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            _, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise DistributedRunError(
                f"{target} on {world_size} ranks timed out after {timeout}s; where each rank was:\n"
                + _stop_hung_launch(proc, tmpdir, world_size)
            ) from None
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
                + f"\n--- stderr tail ---\n{_tail(stderr)}"
            )
        return results


def _stop_hung_launch(proc: subprocess.Popen[str], tmpdir: Path, world_size: int) -> str:
    """Asks every rank for its Python stacks (SIGUSR1, see ``_worker``), then kills the whole launch
    (torchrun starts each rank in a session of its own: they are found by their pid files), so
    that no rank outlives the test."""
    ranks = [int(p.read_text()) for p in sorted(tmpdir.glob("rank*.pid")) if p.read_text().strip().isdigit()]
    for pid in ranks:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGUSR1)
    time.sleep(2.0)
    for pid in ranks:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    _, stderr = proc.communicate()
    out = []
    for rank in range(world_size):
        stack = tmpdir / f"rank{rank}.stack"
        text = stack.read_text() if stack.exists() else ""
        out.append(f"--- rank {rank} ---\n{_tail(text, 3000) or '(no stack written)'}")
    return "\n".join(out) + f"\n--- stderr tail ---\n{_tail(stderr)}"


def _tail(text: str | bytes | None, n: int = 6000) -> str:
    if text is None:
        return ""
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return text[-n:]
