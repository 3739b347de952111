"""lightrft-demo --strategy deepspeed --nproc 2: the reward rises and --resume continues the run."""

from __future__ import annotations

from pathlib import Path

import pytest
from demo_testing import DEMO, FAST, assert_improves, run_ok, steps_of

from lightrft_demo import read_metrics


@pytest.mark.slow
def test_deepspeed_two_ranks_resumes_and_continues(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    base = [
        *DEMO,
        "--strategy",
        "deepspeed",
        "--zero_stage",
        "2",
        "--nproc",
        "2",
        *FAST,
        "--output-dir",
        str(out),
    ]
    first = run_ok([*base, "--iterations", "4"])
    assert "lightrft-demo summary" in first.stdout and "deepspeed ZeRO-2" in first.stdout
    run_ok([*base, "--iterations", "8", "--resume"])
    records = read_metrics(out / "metrics.jsonl")
    assert steps_of(records) == list(range(1, 9))
    assert [r["session"] for r in records] == [0] * 4 + [1] * 4
    assert all(r["tokens"] == 384 for r in records)
    assert_improves(records)
