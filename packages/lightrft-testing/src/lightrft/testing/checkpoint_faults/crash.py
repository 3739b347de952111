"""Ranks killed in the middle of ``save_ckpt``: :func:`run_crash_trials` (one process; ``python -m
lightrft.testing.checkpoint_faults``) runs trials in which every rank is forked from it (imports
paid once): load the newest checkpoint, train, save, train, save again while one rank SIGKILLs
itself at a random point of that save; the others are then killed, as torchrun does. Between
trials it checks every published checkpoint. :func:`crash_problems` and
:func:`sigkill_trial_problems` say what is wrong with the result.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from lightrft.strategy import CheckpointError, StrategyBase, get_strategy, integrity
from lightrft.strategy import checkpoint as ckpt
from lightrft.strategy.registry import load_strategy_class
from lightrft.strategy.utils import free_port

from ..conformance.spec import BASE_CONFIG, tiny_model
from ..distributed import rank_threads
from ..harness import build, full_params, train
from ..models import make_batches


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _write_atomically(path: Path, text: str) -> None:
    # A rank may be SIGKILLed at any moment (the victim by itself, the survivors by the parent):
    # a file is either whole or absent, never half-written.
    tmp = path.with_name(f".{path.name}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _log(logs: Path, trial: int, rank: int, record: dict[str, Any]) -> None:
    # Written as the trial goes: the process may be killed at any moment.
    _write_atomically(logs / f"t{trial}_r{rank}.json", json.dumps(record))


def _expect(strategy: StrategyBase, model: Any, expected: Path, tag: str) -> None:
    params = full_params(strategy, model)
    if strategy.is_rank_0():
        step = strategy.train_state(model).global_step
        torch.save({"params": params, "global_step": step}, expected / f"{tag}.pt")


def _trial_rank(
    config: dict[str, Any], root: Path, trial: int, victim: int, fraction: float, load_only: bool
) -> None:
    logs, expected = root / "logs", root / "expected"
    ckpts = root / "ckpt"
    strategy = get_strategy({**BASE_CONFIG, **config})
    rank = strategy.get_rank()
    model, optim, sched = build(strategy, tiny_model())
    record: dict[str, Any] = {"trial": trial, "rank": rank}
    if trial > 0:
        path, _ = strategy.load_ckpt(model, ckpts)
        tag = Path(path).name
        want = torch.load(expected / f"{tag}.pt", weights_only=True)
        got = full_params(strategy, model)
        record.update(
            loaded=tag,
            max_diff=max(float((got[k] - want["params"][k]).abs().max()) for k in want["params"]),
            same_names=sorted(got) == sorted(want["params"]),
            global_step=strategy.train_state(model).global_step,
            expected_step=int(want["global_step"]),
        )
    _log(logs, trial, rank, record)
    if load_only:
        return
    batches = make_batches(100 + trial, 2, strategy.config.train_batch_size)
    train(strategy, model, optim, sched, batches[:1])
    tag_a, tag_b = f"t{trial:03d}a", f"t{trial:03d}b"
    # A first save in a fresh process is slow (first use of the save path): one into a scratch
    # folder first, so that the timed save below lasts as long as the killed one will.
    strategy.save_ckpt(model, root / "scratch" / f"t{trial}", tag="warm", max_num=1)
    _expect(strategy, model, expected, tag_a)
    start = time.perf_counter()
    strategy.save_ckpt(model, ckpts, tag=tag_a, max_num=3)
    took = float(strategy.all_reduce(time.perf_counter() - start, "max"))
    record.update(saved=tag_a, save_seconds=took)
    _log(logs, trial, rank, record)
    train(strategy, model, optim, sched, batches[1:])
    _expect(strategy, model, expected, tag_b)
    record["in_killed_save"] = True  # from here on, a rank may fail because its peer died
    _log(logs, trial, rank, record)
    if rank == victim:
        record["kill_after"] = fraction * took
        _log(logs, trial, rank, record)
        sys.setswitchinterval(1e-4)  # the timer thread gets the GIL within 0.1 ms, not 5 ms
        timer = threading.Timer(fraction * took, _die)
        timer.daemon = True
        timer.start()
    strategy.save_ckpt(model, ckpts, tag=tag_b, max_num=3)
    record["returned"] = tag_b
    _log(logs, trial, rank, record)
    if rank == victim:
        _die()  # the timer was later than the save: die right after it
    time.sleep(3600)  # the parent kills this rank once the victim is dead, as torchrun would


def _run_world(
    config: dict[str, Any],
    world_size: int,
    root: Path,
    trial: int,
    victim: int,
    fraction: float,
    load_only: bool,
) -> dict[str, Any]:
    port = str(free_port())
    pids: dict[int, int] = {}
    for rank in range(world_size):
        pid = os.fork()
        if pid == 0:  # the rank
            code = 0
            try:
                os.environ.update(
                    RANK=str(rank),
                    LOCAL_RANK=str(rank),
                    WORLD_SIZE=str(world_size),
                    LOCAL_WORLD_SIZE=str(world_size),
                    MASTER_ADDR="127.0.0.1",
                    MASTER_PORT=port,
                )
                _trial_rank(config, root, trial, victim, fraction, load_only)
            except BaseException:
                # The parent SIGKILLs the survivors once the victim is dead, possibly while this
                # is written; a half-written file would read as an empty error.
                _write_atomically(root / "logs" / f"t{trial}_r{rank}.err", traceback.format_exc())
                code = 1
            os._exit(code)
        pids[pid] = rank
    statuses: dict[int, str] = {}
    deadline = time.monotonic() + 300
    while len([r for r in statuses if r >= 0]) < world_size:
        # Only the ranks' own pids: waitpid(-1) would also reap (and lose) other children of this
        # process, e.g. a pytest process's helpers, and then fail on a pid it does not know.
        ended = []
        for pid, rank in pids.items():
            if rank not in statuses and (done := os.waitpid(pid, os.WNOHANG))[0] != 0:
                status = done[1]
                statuses[rank] = (
                    f"signal {os.WTERMSIG(status)}"
                    if os.WIFSIGNALED(status)
                    else f"exit {os.WEXITSTATUS(status)}"
                )
                ended.append(rank)
        if not ended:
            if time.monotonic() > deadline:
                for p in pids:
                    if pids[p] not in statuses:
                        os.kill(p, signal.SIGKILL)
                statuses.setdefault(-1, "timeout")
            time.sleep(0.01)
            continue
        if not load_only:  # one rank is gone: stop the others, as torchrun does
            for p, r in pids.items():
                if r not in statuses:
                    try:
                        os.kill(p, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
    return {str(k): v for k, v in statuses.items()}


def _phase(ckpts: Path, tag_b: str) -> str:
    """How far the killed save got, read from the disk."""
    staging = ckpts / f"{ckpt.TMP_PREFIX}{tag_b}"
    if staging.is_dir():
        return "manifest written, not renamed" if (staging / integrity.MANIFEST).is_file() else "writing"
    if not (ckpts / tag_b).is_dir():
        return "not started"
    if ckpt.read_latest(ckpts) != tag_b:
        return "renamed, latest not updated"
    if any(ckpts.glob(f"{ckpt.DELETING_PREFIX}*")) or len(ckpt.list_checkpoints(ckpts)) > 3:
        return "rotating"
    return "finished"


def _inspect(ckpts: Path) -> dict[str, Any]:
    published = [p.name for p in ckpt.list_checkpoints(ckpts)]
    errors = {}
    for name in published:
        try:
            integrity.verify_checkpoint(ckpts / name)
        except CheckpointError as e:
            errors[name] = str(e)
    return {"published": published, "latest": ckpt.read_latest(ckpts), "verify_errors": errors}


def _warm_up(config: dict[str, Any], scratch: Path) -> None:
    """Imports, in this process, what every forked rank would otherwise import again (the
    backend, torch's optimizer machinery, DeepSpeed's engine): a fake save and load, no group."""
    from lightrft.config import StrategyConfig

    load_strategy_class(StrategyConfig.from_args({**BASE_CONFIG, **config}).backend)
    if StrategyConfig.from_args({**BASE_CONFIG, **config}).backend == "deepspeed":
        import deepspeed.runtime.engine  # noqa: F401
        import deepspeed.runtime.zero.stage3  # noqa: F401
        import deepspeed.runtime.zero.stage_1_and_2  # noqa: F401

        with contextlib.suppress(ImportError):
            # Imported by every engine's first optimizer check (DeepSpeed compiles Muon's kernels
            # on import: ~2.8 s, in each forked rank of each trial otherwise).
            import deepspeed.runtime.zero.muon.muon_optimizer  # noqa: F401
    fake = get_strategy({**BASE_CONFIG, "strategy": "fake"})
    model, optim, sched = build(fake, tiny_model())
    train(fake, model, optim, sched, make_batches(0, 1, fake.config.train_batch_size))
    fake.save_ckpt(model, scratch, tag="warm")
    fake.load_ckpt(model, scratch)
    shutil.rmtree(scratch)


def run_crash_trials(
    config: dict[str, Any], world_size: int, trials: int, root: str | os.PathLike, seed: int = 0
) -> dict[str, Any]:
    """Runs ``trials`` crash trials (then one load-only round) of ``world_size`` forked ranks.
    Kill points are stratified over 0 to 1 x the duration of the trial's complete save (itself
    after a warm-up save), so that every phase of a save (writing, checksums, manifest, rename,
    ``latest``, rotation) is hit.
    """
    # One intra-op thread in this process while it forks the ranks, whatever the caller's shell
    # set: OpenMP's worker threads do not survive fork(), and a rank that enters a parallel region
    # with more than one thread waits for them forever (with OMP_NUM_THREADS unset every trial
    # timed out at the 300 s deadline). The caller's count is restored at the end.
    with rank_threads(1):
        return _run_crash_trials(config, world_size, trials, Path(root), seed)


def _run_crash_trials(
    config: dict[str, Any], world_size: int, trials: int, root: Path, seed: int
) -> dict[str, Any]:
    for sub in ("logs", "expected", "ckpt"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    _warm_up(config, root / "warm")
    rng = random.Random(seed)
    fractions = [(i + rng.random()) / trials for i in range(trials)]
    rng.shuffle(fractions)
    out: list[dict[str, Any]] = []
    for trial in range(trials + 1):
        load_only = trial == trials
        victim = rng.randrange(world_size)
        fraction = fractions[trial] if not load_only else 0.0
        started = time.perf_counter()
        exits = _run_world(config, world_size, root, trial, victim, fraction, load_only)
        shutil.rmtree(root / "scratch", ignore_errors=True)
        logs = {}
        for rank in range(world_size):
            f = root / "logs" / f"t{trial}_r{rank}.json"
            err = root / "logs" / f"t{trial}_r{rank}.err"
            logs[str(rank)] = json.loads(f.read_text()) if f.is_file() else {}
            if err.is_file():
                logs[str(rank)]["error"] = err.read_text()
        entry = {
            "trial": trial,
            "victim": victim,
            "fraction": fraction,
            "exits": exits,
            "ranks": logs,
            "seconds": time.perf_counter() - started,
            **_inspect(root / "ckpt"),
        }
        if not load_only:
            entry["phase"] = _phase(root / "ckpt", f"t{trial:03d}b")
        out.append(entry)
    return {"world_size": world_size, "trials": out}


def main(argv: list[str] | None = None) -> int:
    """``python -m lightrft.testing.checkpoint_faults --config JSON --world-size N --trials T
    --root DIR --out FILE``: runs :func:`run_crash_trials` and writes its result as JSON."""
    parser = argparse.ArgumentParser(prog="python -m lightrft.testing.checkpoint_faults")
    parser.add_argument("--config", default="{}", help="StrategyConfig overrides, as JSON")
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--root", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    config = json.loads(args.config)
    if config.get("strategy", "deepspeed") == "deepspeed":
        import deepspeed  # noqa: F401 - imported once here, not in every forked rank
    result = run_crash_trials(config, args.world_size, args.trials, args.root, args.seed)
    Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


#: How a collective reports a peer that died (gloo; NCCL and torch's store): the last line of the
#: traceback of a survivor of the killed save must say one of these.
PEER_LOST = (
    "Connection closed by peer",
    "Connection reset by peer",
    "Broken pipe",
    "remote worker crashing",
    "NCCL communicator was aborted",
    "Socket Timeout",
    "failed to recv, got 0 bytes",
)


def lost_peer(traceback_text: str) -> bool:
    """Whether a rank's traceback ends in an error of a collective whose peer died."""
    lines = traceback_text.strip().splitlines()
    return bool(lines) and any(words in lines[-1] for words in PEER_LOST)


def crash_problems(result: dict[str, Any], max_num: int = 3) -> list[str]:
    """What is wrong with the result of :func:`run_crash_trials`: an empty list when no rank
    failed (but a survivor of the killed save, by raising on its dead peer: :func:`lost_peer`),
    every published checkpoint verified after every kill, each trial loaded the checkpoint
    ``latest`` named after the previous one with exactly the parameters and step saved, ``latest``
    named the trial's complete save (or the killed one, when that one got through), and the newest
    ``max_num`` complete checkpoints were all still there."""
    problems: list[str] = []
    complete: list[str] = []
    previous_latest: str | None = None
    for t in result["trials"]:
        k = t["trial"]
        for rank, log in t["ranks"].items():
            # A survivor of the killed save raises on its dead peer (as it should): not a problem.
            # Any other error, or one outside the killed save, is.
            if "error" in log and not (
                log.get("in_killed_save") and int(rank) != t["victim"] and lost_peer(log["error"])
            ):
                problems.append(f"trial {k} rank {rank} failed:\n{log['error']}")
            if k > 0:
                if log.get("loaded") != previous_latest:
                    problems.append(
                        f"trial {k} rank {rank} loaded {log.get('loaded')!r}, latest was {previous_latest!r}"
                    )
                if log.get("max_diff") != 0.0 or not log.get("same_names"):
                    problems.append(
                        f"trial {k} rank {rank}: loaded parameters differ from the saved ones: {log}"
                    )
                if log.get("global_step") != log.get("expected_step"):
                    problems.append(
                        f"trial {k} rank {rank}: step {log.get('global_step')} != {log.get('expected_step')}"
                    )
        if "timeout" in t["exits"].values():
            problems.append(f"trial {k} timed out: {t['exits']}")
        if t["verify_errors"]:
            problems.append(f"trial {k}: published checkpoints fail verification: {t['verify_errors']}")
        if "phase" in t:
            tag_a, tag_b = f"t{k:03d}a", f"t{k:03d}b"
            complete.append(tag_a)
            if tag_b in t["published"]:
                complete.append(tag_b)
            if t["latest"] not in (tag_a, tag_b):
                problems.append(f"trial {k}: latest is {t['latest']!r}, expected {tag_a!r} or {tag_b!r}")
            lost = [c for c in complete[-max_num:] if c not in t["published"]]
            if lost:
                problems.append(f"trial {k}: complete checkpoints lost: {lost} (published: {t['published']})")
        previous_latest = t["latest"]
    return problems


def sigkill_trial_problems(
    config: dict[str, Any], root: str | os.PathLike, trials: int = 20, world_size: int = 2, seed: int = 1
) -> list[str]:
    """Runs :func:`run_crash_trials` in a fresh process (``python -m``, as CI does) and returns
    everything wrong with it: :func:`crash_problems`, kills that missed the save (at least half of
    them must land inside it, or the trials test nothing) and ranks that ended otherwise than by
    SIGKILL (the victim) or by raising on their dead peer (a survivor)."""
    import subprocess

    out = Path(root) / "result.json"
    cmd = [
        sys.executable, "-m", "lightrft.testing.checkpoint_faults", "--config", json.dumps(config),
        "--world-size", str(world_size), "--trials", str(trials), "--seed", str(seed),
        "--root", str(Path(root) / "run"), "--out", str(out),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        return [f"crash trials exited with {proc.returncode}:\n{proc.stderr[-4000:]}"]
    result = json.loads(out.read_text())
    problems = crash_problems(result)
    if len(result["trials"]) != trials + 1:
        problems.append(f"{len(result['trials'])} trials recorded, expected {trials + 1}")
    killed = [t for t in result["trials"] if "phase" in t]
    inside = sum(t["phase"] != "finished" for t in killed)
    if inside < trials // 2:
        problems.append(
            f"only {inside} of {len(killed)} kills landed inside the save: {[t['phase'] for t in killed]}"
        )
    for t in killed:
        if t["exits"][str(t["victim"])] != "signal 9" or not set(t["exits"].values()) <= {
            "signal 9",
            "exit 1",
        }:
            problems.append(f"trial {t['trial']}: unexpected exits {t['exits']}")
    return problems
