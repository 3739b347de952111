"""The README's Usage section, extracted from README.md and run as written, on FSDP2 (2 gloo ranks)."""

from pathlib import Path

import pytest

from lightrft.testing import run_distributed

README = Path(__file__).resolve().parents[3] / "README.md"


@pytest.mark.slow
def test_readme_usage_runs_as_written_on_fsdp(tmp_path):
    results = run_distributed(
        "lightrft.testing.usage:run_usage_snippet",
        2,
        kwargs={"document": str(README), "workdir": str(tmp_path), "strategy": "fsdp"},
    )
    for r in results:
        assert r["backend"] == "FSDPV2Strategy" and r["accumulated_gradient"] == 2
        assert len(r["losses"]) == 16 and r["global_step"] == 8
        assert r["latest"] == "global_step8"
        assert sum(r["losses"][-4:]) < sum(r["losses"][:4])  # it learns
    assert results[0]["losses"] == results[1]["losses"]  # same data on both ranks: same losses
