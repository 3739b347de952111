"""``lightrft-ckpt`` on a native FSDP checkpoint of 2 ranks: inspect lists its DCP tensors, convert
writes a safetensors directory with the full weights and a portable checkpoint that FakeStrategy
(one process, another backend and world size) resumes to the writer's losses."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lightrft.strategy import checkpoint as ck
from lightrft.strategy import integrity
from lightrft.strategy.ckpt_cli import main
from lightrft.testing import run_distributed
from lightrft.testing.portable_resume import read, resume_problems


def test_inspect_and_convert_a_native_fsdp_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "native"
    ranks = run_distributed(
        "lightrft.testing.portable_resume:write_then_read",
        2,
        {"writers": ["fsdp"], "reads": {}, "root": str(root), "layout": "native"},
    )
    written = ranks[0]["written"][0]
    native = root / "fsdp-ws2" / "saved"
    assert integrity.read_manifest(native)["layout"] == "native"

    assert main(["inspect", str(native)]) == 0
    out = capsys.readouterr().out
    assert "  backend: fsdp\n" in out and "  world_size: 2\n" in out and "dcp/__1_0.distcp" in out
    assert "  layers.0.up.weight  [64, 32]  float32\n" in out

    hf = tmp_path / "hf"
    assert main(["convert", str(native), "--to", "hf", str(hf)]) == 0
    capsys.readouterr()
    weights = load_file(str(hf / "model.safetensors"))
    # The weights at the save, bit for bit (not those after the writer trained on).
    assert sorted(weights) == sorted(written["saved_params"])
    assert all(torch.equal(weights[k], written["saved_params"][k]) for k in weights)
    assert not torch.equal(weights["layers.0.up.weight"], written["params"]["layers.0.up.weight"])

    portable_root = tmp_path / "converted" / "fsdp-ws2"
    portable_root.mkdir(parents=True)
    assert main(["convert", str(native), "--to", "portable", str(portable_root / "saved")]) == 0
    ck.write_latest(portable_root, "saved")
    m = integrity.verify_checkpoint(portable_root / "saved")
    assert (
        m["layout"] == "portable"
        and "portable/.metadata" in m["files"]
        and "lightrft_scheduler.pt" in m["files"]
    )
    assert main(["convert", str(native), "--to", "portable", str(portable_root / "saved")]) == 1  # exists
    assert "exists" in capsys.readouterr().err

    got = read("fake", str(tmp_path / "converted"), ["fsdp-ws2"])["results"]["fsdp-ws2"]
    key = "fake-ws1 <- fsdp-ws2"
    matrix = {"written": {"fsdp-ws2": written}, "read": {key: got}, "rank_losses": {}, "expected": [key]}
    assert resume_problems(matrix) == []
    _check_the_old_scheduler_file_name(native, tmp_path, capsys)


def _check_the_old_scheduler_file_name(
    native: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """FSDP checkpoints written before the scheduler took the shared name lightrft_scheduler.pt
    kept it in lr_scheduler.pt: they still convert (the file under the new name) and their
    scheduler still loads (FSDPV2Strategy._load_checkpoint passes the old name on)."""
    from lightrft.fsdp.strategy import LEGACY_SCHEDULER_FILE, FSDPV2Strategy
    from lightrft.strategy import portable

    old = tmp_path / "old-layout"
    shutil.copytree(native, old)
    new_bytes = (old / portable.SCHEDULER_FILE).read_bytes()
    # Rewrite it as the old layout had it: the scheduler under its old name, in the manifest too.
    os.replace(old / portable.SCHEDULER_FILE, old / LEGACY_SCHEDULER_FILE)
    manifest = integrity.read_manifest(old)
    entry = manifest["files"].pop(portable.SCHEDULER_FILE)
    files = {**manifest["files"], LEGACY_SCHEDULER_FILE: entry}
    info = {
        k: v
        for k, v in manifest.items()
        if k not in ("files", "algorithm", "manifest_sha256", "format", "format_version")
    }
    integrity.write_manifest(old, integrity.build_manifest(files, manifest["algorithm"], **info))
    assert integrity.verify_checkpoint(old)["files"].keys() >= {LEGACY_SCHEDULER_FILE}

    assert main(["convert", str(old), "--to", "portable", str(tmp_path / "old-converted")]) == 0
    capsys.readouterr()
    assert (tmp_path / "old-converted" / portable.SCHEDULER_FILE).read_bytes() == new_bytes
    assert not (tmp_path / "old-converted" / LEGACY_SCHEDULER_FILE).exists()

    # The loading side: the one place FSDP reads it, given a scheduler and the old file alone.
    class Scheduler:
        def load_state_dict(self, state: dict) -> None:
            self.loaded = state

    sched = Scheduler()
    assert portable.load_scheduler(sched, old, legacy_names=(LEGACY_SCHEDULER_FILE,))
    want = torch.load(old / LEGACY_SCHEDULER_FILE, weights_only=True)
    assert sched.loaded == want and want["last_epoch"] > 0
    assert not portable.load_scheduler(Scheduler(), old)  # without the old name: nothing to load
    assert FSDPV2Strategy.checkpoint_file_kinds[-1] == (
        "scheduler",
        (portable.SCHEDULER_FILE, LEGACY_SCHEDULER_FILE),
    )
