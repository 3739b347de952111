"""lightrft-demo --strategy fsdp --nproc 2 (the demo starts torchrun itself), SIGKILLed and resumed."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from demo_testing import FAST, SCRIPT, assert_improves, demo_env, kill_when, run_ok, steps_of

from lightrft_demo import read_metrics


# ------------------------------------------------------------------------ 2 gloo ranks
@pytest.mark.slow
def test_fsdp_two_ranks_killed_and_resumed(tmp_path: Path) -> None:
    out = tmp_path / "fsdp"
    argv = [
        SCRIPT,
        "--strategy",
        "fsdp",
        "--nproc",
        "2",
        "--iterations",
        "8",
        *FAST,
        "--output-dir",
        str(out),
    ]
    proc = subprocess.Popen(argv, env=demo_env(), start_new_session=True, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    kill_when(proc, out / "metrics.jsonl", steps=3)
    resumed = run_ok([*argv, "--resume"])
    records = read_metrics(out / "metrics.jsonl")
    assert steps_of(records) == list(range(1, 9)), "a step is missing or written twice"
    assert [r["session"] for r in records].count(1) in (6, 5, 4), records  # resumed at step 2, 3 or 4
    assert "resumed from" in resumed.stdout and "world_size=2" in resumed.stdout
    assert all(r["tokens"] == 384 for r in records)  # 2 ranks x 4 prompts x 8 samples x 6 tokens
    assert_improves(records)
