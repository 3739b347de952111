"""Two torchrun agents on this machine as two nodes (--nnodes 2, a localhost c10d rendezvous)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from demo_testing import DEMO, FAST, assert_improves, demo_env, kill_tree, steps_of

from lightrft.strategy.utils import free_port
from lightrft_demo import read_metrics


@pytest.mark.slow
def test_two_torchrun_agents_as_two_nodes(tmp_path: Path) -> None:
    out = tmp_path / "nodes"
    port = free_port()
    argv = [*DEMO, "--strategy", "fsdp", "--nnodes", "2", "--nproc", "1", "--rdzv-endpoint", f"127.0.0.1:{port}",
            "--rdzv-id", f"demo-{port}", "--iterations", "6", *FAST, "--output-dir", str(out)]  # fmt: skip
    nodes = [
        subprocess.Popen(argv, env=demo_env(), text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(2)
    ]
    outputs = []
    for node in nodes:
        try:
            stdout, stderr = node.communicate(timeout=900)
        except subprocess.TimeoutExpired:
            for n in nodes:
                kill_tree(n.pid)
            pytest.fail("two-node run did not finish within 900 s")
        assert node.returncode == 0, f"a node failed:\n{stdout[-2000:]}\n{stderr[-4000:]}"
        outputs.append(stdout)
    # Rank 0 lives on one of the two agents; only it prints the summary.
    assert sum("lightrft-demo summary" in o for o in outputs) == 1, outputs
    assert any("world_size=2" in o for o in outputs)
    records = read_metrics(out / "metrics.jsonl")
    assert steps_of(records) == list(range(1, 7))
    assert all(r["tokens"] == 384 for r in records)  # both nodes' rollouts are counted
    assert_improves(records, margin=0.1)
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 6
