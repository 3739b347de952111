"""Helpers of the lightrft-demo tests (here, not in the demo's runtime package, which must not import pytest): run the program as a user does, kill it, read its metrics."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lightrft_demo import read_metrics

FAST = ["--actor_learning_rate", "2e-2", "--save-steps", "2"]
DEMO = [sys.executable, "-m", "lightrft_demo"]
SCRIPT = str(Path(sys.executable).parent / "lightrft-demo")


def demo_env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    # A DeepSpeed JIT op (none on CPU by default: lightrft-deepspeed skips the shm comm op) would be
    # built into a folder private to this test environment (scripts/test-packages sets one per
    # environment; otherwise one inside the venv), never one that other environments share: their
    # builds (other include paths) rebuild it, and a build in progress elsewhere holds its lock.
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LIGHTRFT_DEMO_ARGV"):
        env.pop(name, None)  # the demo must decide to launch torchrun itself
    return env


def run_ok(cmd: list[str], timeout: float = 900) -> subprocess.CompletedProcess[str]:
    """Runs the demo to the end and asserts it succeeded; on timeout kills torchrun's ranks too."""
    proc = subprocess.Popen(cmd, env=demo_env(), text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        out, err = proc.communicate()
        pytest.fail(f"{cmd} did not finish within {timeout} s:\n{out[-2000:]}\n{err[-4000:]}")
    assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{out[-3000:]}\n{err[-5000:]}"
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def assert_improves(records: list[dict], margin: float = 0.15) -> None:
    rewards = [r["reward"] for r in records]
    first, last = sum(rewards[:2]) / 2, sum(rewards[-2:]) / 2
    assert last > first + margin, f"reward did not rise by {margin}: {[round(x, 3) for x in rewards]}"


def steps_of(records: list[dict]) -> list[int]:
    return [r["step"] for r in records]


def kill_tree(pid: int) -> None:
    """SIGKILLs ``pid`` and every descendant at once, as a node failure would: torchrun starts its
    ranks in sessions of their own, so killing its process group alone would leave them running."""
    table = subprocess.run(["ps", "-eo", "pid=,ppid="], capture_output=True, text=True, check=True).stdout
    children: dict[int, list[int]] = {}
    for line in table.splitlines():
        child, parent = (int(x) for x in line.split())
        children.setdefault(parent, []).append(child)
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += children.get(p, [])
    for p in tree:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def kill_when(proc: subprocess.Popen, metrics: Path, steps: int, timeout: float = 900) -> None:
    """SIGKILLs the run (torchrun and its ranks) once ``steps`` records exist."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(
                f"the run ended (rc={proc.returncode}) before step {steps}:\n{out[-2000:]}\n{err[-4000:]}"
            )
        if len(read_metrics(metrics)) >= steps:
            kill_tree(proc.pid)
            proc.wait()
            return
        time.sleep(0.2)
    kill_tree(proc.pid)
    pytest.fail(f"no step {steps} within {timeout} s")
