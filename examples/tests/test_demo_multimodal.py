"""lightrft-demo --multimodal, short: a tiny vision-language policy learns to name the colour of
an image (GRPO on FakeStrategy, hf engine, images through gather_and_generate)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("PIL")

from lightrft_demo.cli import main  # noqa: E402


def test_multimodal_reward_rises_from_chance(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    out = tmp_path / "mm"
    argv = ["--multimodal", "--iterations", "14", "--prompts-per-rank", "8", "--group-size", "8"]
    assert main([*argv, "--output-dir", str(out)]) == 0
    records = [json.loads(line) for line in (out / "multimodal_metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 15))
    first, last = records[:2], records[-4:]
    # A policy that ignores the image names the right colour 1 time in 4 (the engine samples among
    # the 4 colour names). Each step averages 64 samples: the standard deviation of a step's mean
    # reward at chance is sqrt(0.25 * 0.75 / 64) = 0.054, of a mean over 4 steps 0.027, so 0.5 is
    # more than 9 of them above chance: the policy reads the image.
    assert sum(r["reward"] for r in first) / 2 < 0.45
    assert sum(r["reward"] for r in last) / 4 > 0.5, records
