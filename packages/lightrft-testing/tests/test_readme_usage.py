"""The README's Usage section, extracted from README.md and executed as written, on FakeStrategy
(lightrft-fsdp and lightrft-deepspeed run the same snippet on two ranks)."""

from pathlib import Path

import pytest

from lightrft.testing.usage import run_usage_snippet, usage_snippet

README = Path(__file__).resolve().parents[3] / "README.md"


def test_readme_usage_runs_as_written_on_fake(tmp_path):
    result = run_usage_snippet(str(README), str(tmp_path), "fake")
    assert result["backend"] == "FakeStrategy" and result["accumulated_gradient"] == 4
    losses = result["losses"]
    assert len(losses) == 16 and result["global_step"] == 4
    assert result["latest"] == "global_step4"
    assert sum(losses[-4:]) < sum(losses[:4])  # it learns


def test_usage_snippet_names_a_missing_section(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("# Title\n\n## Other\n")
    with pytest.raises(ValueError, match="no '## Usage' section"):
        usage_snippet(doc)
