"""The GPU sitting's scripts (scripts/gpu/edges.py and multimodal.py) run end to end on CPU with the
hf engine, so a broken script is found here and not on the GPU machine, whose time is scarce (a
renamed helper broke multimodal.py's last step on 2026-12-03 and only a CPU run showed it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytest.importorskip("transformers")
pytest.importorskip("PIL")


@pytest.mark.slow
def test_edges_and_multimodal_scripts_pass_every_check_with_the_hf_engine(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    runs = {
        "edges": [sys.executable, str(ROOT / "scripts/gpu/edges.py"), "--engine", "hf", "--device", "cpu"],
        "multimodal": [
            sys.executable,
            str(ROOT / "scripts/gpu/multimodal.py"),
            "--engine",
            "hf",
            "--device",
            "cpu",
            "--size",
            "tiny",
        ],
    }
    # Side by side: each is one process of ~20 s on one thread.
    procs = {
        name: subprocess.Popen(
            [*cmd, "--out", str(tmp_path / name), "--budget-s", "240"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for name, cmd in runs.items()
    }
    logs = {name: p.communicate(timeout=400)[0] for name, p in procs.items()}
    for name, p in procs.items():
        assert p.returncode == 0, f"{name} exited {p.returncode}:\n{logs[name][-3000:]}"

    edges = json.loads((tmp_path / "edges" / "edges_hf.json").read_text())
    assert edges["failed"] == 0
    assert len(edges["checks"]) >= 7 and all(c["ok"] for c in edges["checks"]), edges["checks"]
    assert edges["phases"]["levels"].startswith("ran") and edges["phases"]["recreate"].startswith("ran")

    mm = json.loads((tmp_path / "multimodal" / "multimodal_hf.json").read_text())
    assert mm["status"] == "passed"
    assert set(mm["checks"]) == {
        "push_changes_outputs",
        "bad_input_errors",
        "vision_tower_pushed",
        "images_change_outputs",
        "pushed_equals_fresh",
    }
    assert all(c["ok"] for c in mm["checks"].values()), mm["checks"]
