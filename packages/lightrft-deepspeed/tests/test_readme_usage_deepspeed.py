"""The README's Usage section, extracted from README.md and run as written, on DeepSpeed ZeRO-2
and ZeRO-3 (2 gloo ranks)."""

from pathlib import Path

import pytest

from lightrft.testing import run_distributed

README = Path(__file__).resolve().parents[3] / "README.md"


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_readme_usage_runs_as_written_on_deepspeed(tmp_path, stage):
    results = run_distributed(
        "lightrft.testing.usage:run_usage_snippet",
        2,
        kwargs={"document": str(README), "workdir": str(tmp_path), "strategy": "deepspeed", "zero_stage": stage},
    )
    for r in results:
        assert r["backend"] == "DeepspeedStrategy" and r["accumulated_gradient"] == 2
        assert len(r["losses"]) == 16 and r["global_step"] == 8
        assert r["latest"] == "global_step8"
        assert sum(r["losses"][-4:]) < sum(r["losses"][:4])  # it learns
    assert results[0]["losses"] == results[1]["losses"]
