"""A user's training script that never tears down, and a launcher that checks every rank exits 0.

``python -m torch.distributed.run --nproc-per-node=2 -m lightrft.testing.exit_check --backend fsdp
--root DIR`` trains a tiny Llama 2 steps, saves a checkpoint, trains a step more, loads the
checkpoint back, pushes the weights into an inference engine (``hf`` where lightrft-engines is
installed, else lightrft-testing's ``fake``), leaves an all-reduce unwaited (rank 1 joins it late, as
a ZeRO-3 prefetch nobody consumed would be) and returns: no ``shutdown()``, no
``destroy_process_group``. Each rank prints one ``EXIT-CHECK {json}`` line with what it measured.

Without the strategies' exit hook (``lightrft.strategy.teardown``) such a rank dies with
``terminate called without an active exception`` (SIGABRT) or SIGSEGV after its work is done.
:func:`launch_without_teardown` runs the script (optionally with CPU hogs beside it) and returns
exit code, output and the ranks' reports; :func:`exit_problems` says what is wrong with one.
:class:`ExitWithoutTeardownSuite` is the test on top of them, which each training backend's tests
subclass.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, ClassVar

import torch

#: Text a rank or torchrun prints when a process died instead of exiting.
ABORT_TEXT = (
    "terminate called",
    "Signal 6",
    "Signal 11",
    "SIGABRT",
    "SIGSEGV",
    "core dumped",
    "Fatal Python error",
    "Traceback (most recent call last)",
)
REPORT = "EXIT-CHECK "
VOCAB = 128


def default_engine() -> str:
    """``hf`` where lightrft-engines is installed, else lightrft-testing's ``fake``."""
    return "hf" if importlib.util.find_spec("lightrft.engines") is not None else "fake"


def _engine_params(engine: Any) -> dict[str, torch.Tensor]:
    return {n: p.detach().float().cpu() for n, p in engine.model.named_parameters()}


def run(backend: str, root: str, engine_type: str, outstanding: bool = True) -> dict[str, Any]:
    """The script's body on this rank (see the module docstring); returns what it measured."""
    import torch.distributed as dist

    from lightrft.strategy import get_strategy

    from .conformance.spec import BASE_CONFIG
    from .harness import build, full_params, train
    from .models import make_batches, make_tiny_llama
    from .portable_resume import BACKENDS

    if backend not in BACKENDS or backend == "fake":
        raise ValueError(
            f"backend={backend!r} is invalid: valid are {', '.join(b for b in BACKENDS if b != 'fake')}"
        )
    strategy = get_strategy({**BASE_CONFIG, **BACKENDS[backend], "engine_type": engine_type})
    strategy.setup_distributed()
    model, optim, sched = build(strategy, make_tiny_llama(seed=3, vocab_size=VOCAB))
    batches = make_batches(21, 3, strategy.config.train_batch_size, vocab_size=VOCAB)
    losses = train(strategy, model, optim, sched, batches[:2])["losses"]
    saved = full_params(strategy, model)
    strategy.save_ckpt(model, root, tag="exit")
    train(strategy, model, optim, sched, batches[2:])
    moved = max(float((saved[k] - v).abs().max()) for k, v in full_params(strategy, model).items())
    strategy.load_ckpt(model, root)
    loaded = full_params(strategy, model)
    engine = strategy.setup_inference_engine(model=make_tiny_llama(seed=4, vocab_size=VOCAB))
    strategy.update_engine_weights(model)
    pushed = _engine_params(engine)
    if outstanding:
        # Left running at exit; rank 1 joins late, so rank 0 reaches the end with the work in flight.
        if strategy.get_rank() == 1:
            time.sleep(2.0)
        work = dist.all_reduce(torch.ones(1 << 14), async_op=True)
        work.get_future().then(lambda fut: fut.value())
    return {
        "rank": strategy.get_rank(),
        "world_size": strategy.world_size,
        "engine": type(engine).__name__,
        "losses": losses,
        "moved_after_save": moved,
        # Both are copies of the same full fp32 tensors: equal to the bit.
        "load_max_diff": max(float((saved[k] - loaded[k]).abs().max()) for k in saved),
        "names_pushed": sorted(set(loaded) & set(pushed)) == sorted(loaded),
        "push_max_diff": max(float((loaded[k] - pushed[k]).abs().max()) for k in loaded if k in pushed),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", required=True)
    parser.add_argument("--root", required=True)
    parser.add_argument("--engine", default=default_engine())
    parser.add_argument("--no-outstanding", action="store_true")
    a = parser.parse_args(argv)
    out = run(a.backend, a.root, a.engine, outstanding=not a.no_outstanding)
    print(REPORT + json.dumps(out), flush=True)
    return 0  # and nothing torn down: the interpreter exits with the group, engine and work alive


def launch_without_teardown(
    backend: str,
    engine: str | None = None,
    hogs: int = 0,
    world_size: int = 2,
    timeout: float = 600.0,
) -> dict[str, Any]:
    """Runs the script under ``torchrun`` on ``world_size`` ranks (``OMP_NUM_THREADS=1``) with
    ``hogs`` busy-looping processes beside it; returns ``returncode``, ``stdout``, ``stderr``,
    ``reports`` (each rank's measurements, rank order) and ``seconds``."""
    hog_procs = [
        subprocess.Popen([sys.executable, "-c", "while True: pass"], stdout=subprocess.DEVNULL)
        for _ in range(hogs)
    ]
    start = time.monotonic()
    try:
        with tempfile.TemporaryDirectory(prefix="lightrft-exit-") as root:
            cmd = [
                sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world_size}",
                "--max-restarts=0", "-m", "lightrft.testing.exit_check", "--backend", backend,
                "--root", str(Path(root) / "ckpt"), "--engine", engine or default_engine(),
            ]  # fmt: skip
            env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    finally:
        for hog in hog_procs:
            hog.kill()
            with contextlib.suppress(Exception):
                hog.wait(5)
    reports = [
        json.loads(line[len(REPORT) :]) for line in proc.stdout.splitlines() if line.startswith(REPORT)
    ]
    return {
        "returncode": proc.returncode,
        "stdout": proc.stdout,
        "stderr": proc.stderr,
        "reports": sorted(reports, key=lambda r: r["rank"]),
        "seconds": time.monotonic() - start,
        "world_size": world_size,
    }


def exit_problems(launch: dict[str, Any]) -> list[str]:
    """Everything wrong with a :func:`launch_without_teardown` result (empty when nothing is)."""
    problems = []
    if launch["returncode"] != 0:
        problems.append(f"torchrun exited {launch['returncode']}")
    text = launch["stdout"] + launch["stderr"]
    for marker in ABORT_TEXT:
        if marker in text:
            problems.append(f"{marker!r} in the output")
    ranks = [r["rank"] for r in launch["reports"]]
    if ranks != list(range(launch["world_size"])):
        problems.append(f"reports from ranks {ranks}, expected every rank of {launch['world_size']}")
    for r in launch["reports"]:
        if r["moved_after_save"] <= 0.0:
            problems.append(
                f"rank {r['rank']}: training after the save moved nothing: the load check is vacuous"
            )
        if r["load_max_diff"] != 0.0:
            problems.append(
                f"rank {r['rank']}: loaded parameters differ from the saved ones by {r['load_max_diff']}"
            )
        if not r["names_pushed"] or r["push_max_diff"] != 0.0:
            problems.append(
                f"rank {r['rank']}: the engine's weights are not the model's "
                f"(all names pushed: {r['names_pushed']}, max diff {r['push_max_diff']})"
            )
    if problems:
        problems.append("stderr tail:\n" + launch["stderr"][-3000:])
    return problems


class ExitWithoutTeardownSuite:
    """The exit test of a backend: set ``backend`` (a name :func:`run` takes: ``fsdp``, ``ds1``,
    ``ds2``, ``ds3``) in a subclass named ``Test...``. One launch of the script on ``world_size``
    ranks with ``hogs`` CPU hogs beside it; every rank exits 0 with no abort text, and the ranks
    pushed into the same engine type and trained to the same losses. Without the strategies' exit
    hook the ranks abort at exit every time (the unwaited collective makes the failure
    deterministic); ``scripts/stress-tests`` repeats the backends' tests."""

    backend: ClassVar[str] = ""
    world_size: ClassVar[int] = 2
    hogs: ClassVar[int] = 1

    def test_ranks_exit_zero_without_teardown(self) -> None:
        import pytest

        pytest.importorskip("transformers")
        launch = launch_without_teardown(self.backend, hogs=self.hogs, world_size=self.world_size)
        assert exit_problems(launch) == []
        engine = {"hf": "HFEngine", "fake": "FakeEngine"}[default_engine()]
        assert [r["engine"] for r in launch["reports"]] == [engine] * self.world_size
        assert [r["losses"] for r in launch["reports"]] == [launch["reports"][0]["losses"]] * self.world_size


if __name__ == "__main__":
    sys.exit(main())
