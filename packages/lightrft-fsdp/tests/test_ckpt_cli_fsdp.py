"""``lightrft-ckpt`` on a native FSDP checkpoint of 2 ranks: inspect lists its DCP tensors, convert
writes a safetensors directory with the full weights and a portable checkpoint that FakeStrategy
(one process, another backend and world size) resumes to the writer's losses."""

from __future__ import annotations

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
