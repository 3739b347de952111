"""metrics.jsonl across a kill: a torn last line, cutting back to the checkpoint, refusing gaps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lightrft_demo import read_metrics
from lightrft_demo.metrics import MetricsLog


def _write(path: Path, steps: list[int], torn: str = "") -> None:
    path.write_text("".join(json.dumps({"step": s, "reward": s / 10}) + "\n" for s in steps) + torn)


def test_restart_cuts_back_to_the_checkpoint_and_drops_a_torn_line(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    _write(path, [1, 2, 3, 4, 5], torn='{"step": 6, "rew')
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3, 4, 5]
    log = MetricsLog(path)
    assert [r["step"] for r in log.restart_at(4)] == [1, 2, 3, 4]
    log.append({"step": 5, "reward": 0.9})
    assert [(r["step"], r["reward"]) for r in read_metrics(path)][-2:] == [(4, 0.4), (5, 0.9)]
    assert MetricsLog(tmp_path / "new.jsonl").restart_at(0) == []


def test_restart_refuses_a_file_that_does_not_match_the_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    _write(path, [1, 2])
    with pytest.raises(ValueError, match=r"steps 1\.\.2 \(2 records\) but the checkpoint .* step 4"):
        MetricsLog(path).restart_at(4)
    _write(path, [1, 3, 4])
    with pytest.raises(ValueError, match=r"not 1\.\.4 in order"):
        MetricsLog(path).restart_at(4)
    path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl:2 is not a JSON record"):
        read_metrics(path)
