"""lightrft-demo on FakeStrategy: the reward rises, the files are written, a SIGKILLed run resumes."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from demo_testing import DEMO, FAST, assert_improves, demo_env, kill_when, run_ok, steps_of

from lightrft.testing import rank_threads
from lightrft_demo import read_metrics
from lightrft_demo.cli import parse_options
from lightrft_demo.train import SetupError, run


# ---------------------------------------------------------------------------------- fake
def test_fake_run_rises_and_writes_its_files(tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = run(parse_options(["--iterations", "8", *FAST, "--output-dir", str(out)]))
    records = read_metrics(out / "metrics.jsonl")
    assert steps_of(records) == list(range(1, 9)) and records == result.records
    assert_improves(records)
    # 4 prompts x 8 samples x 6 new tokens on one rank
    assert all(r["tokens"] == 192 and r["tokens_per_s"] > 0 and r["sync_s"] > 0 for r in records)
    assert (out / "reward_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "model" / "config.json").is_file()
    saved = sorted(p.name for p in (out / "checkpoints").glob("global_step*") if p.is_dir())
    assert saved == ["global_step6", "global_step8"]  # every 2 steps; max_ckpt_num=2 keeps the last two
    # The saved configuration reruns the same setup.
    again = parse_options(["--config", str(out / "config.yaml")])
    assert (again.iterations, again.actor_learning_rate, again.save_steps) == (8, 2e-2, 2)
    # A second run into the same directory must be told what to do.
    with pytest.raises(SetupError, match=r"holds a previous run .*--resume.*--overwrite"):
        run(parse_options(["--iterations", "8", "--output-dir", str(out)]))


def test_fake_killed_mid_run_resumes_with_the_same_curve(tmp_path: Path) -> None:
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    argv = ["--iterations", "10", *FAST]
    # In-process (one startup less), with the thread count demo_env() gives the killed and the
    # resumed subprocess (OMP_NUM_THREADS=1), whatever the shell's: the same kernels' splits.
    with rank_threads(int(demo_env()["OMP_NUM_THREADS"])):
        run(parse_options([*argv, "--output-dir", str(straight)]))
    proc = subprocess.Popen(
        [*DEMO, *argv, "--output-dir", str(killed)], env=demo_env(), start_new_session=True, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    kill_when(proc, killed / "metrics.jsonl", steps=5)
    before = read_metrics(killed / "metrics.jsonl")
    assert 5 <= len(before) < 10
    resumed = run_ok([*DEMO, *argv, "--output-dir", str(killed), "--resume"])
    records = read_metrics(killed / "metrics.jsonl")
    assert steps_of(records) == list(range(1, 11)), "a step is missing or written twice"
    sessions = [r["session"] for r in records]
    resumed_at = sessions.index(1) if 1 in sessions else None
    assert resumed_at is not None and resumed_at % 2 == 0 and 4 <= resumed_at <= len(before), sessions
    assert "resumed from" in resumed.stdout and f"steps {resumed_at + 1}..10" in resumed.stdout
    assert (killed / "checkpoints" / "global_step10").is_dir()
    # FakeStrategy checkpoints resume bit for bit, prompts / sampling depend only on the step, and
    # all three runs have one thread: the interrupted run's curve is the uninterrupted one, exactly.
    reference = read_metrics(straight / "metrics.jsonl")
    assert len(reference) == len(records) == 10
    for ours, theirs in zip(records, reference):
        assert ours["reward"] == theirs["reward"], (ours["step"], ours, theirs)
        assert ours["loss"] == theirs["loss"], (ours["step"], ours, theirs)
