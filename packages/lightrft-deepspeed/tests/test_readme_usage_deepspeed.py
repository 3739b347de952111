"""The README's Usage section, extracted from README.md and run as written, on DeepSpeed ZeRO-2
and ZeRO-3 (2 gloo ranks; one torchrun launch runs it at both stages, one after the other)."""

from pathlib import Path
from typing import Any

import pytest

from lightrft.testing import run_distributed

README = Path(__file__).resolve().parents[3] / "README.md"
STAGES = [2, 3]


@pytest.fixture(scope="module")
def per_stage(tmp_path_factory: pytest.TempPathFactory) -> dict[int, list[dict[str, Any]]]:
    runs = [
        {
            "document": str(README),
            "workdir": str(tmp_path_factory.mktemp(f"zero{stage}")),
            "strategy": "deepspeed",
            "zero_stage": stage,
        }
        for stage in STAGES
    ]
    ranks = run_distributed("lightrft.testing.usage:run_usage_snippets", 2, kwargs={"runs": runs})
    return {stage: [rank[i] for rank in ranks] for i, stage in enumerate(STAGES)}


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
def test_readme_usage_runs_as_written_on_deepspeed(per_stage, stage):
    results = per_stage[stage]
    for r in results:
        assert r["backend"] == "DeepspeedStrategy" and r["accumulated_gradient"] == 2
        assert len(r["losses"]) == 16 and r["global_step"] == 8
        assert r["latest"] == "global_step8"
        assert sum(r["losses"][-4:]) < sum(r["losses"][:4])  # it learns
    assert results[0]["losses"] == results[1]["losses"]
