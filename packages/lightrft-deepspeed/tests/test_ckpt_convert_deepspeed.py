"""``lightrft-ckpt convert --to portable`` on native DeepSpeed checkpoints, offline: a ZeRO-2 and a
ZeRO-3 checkpoint written by 2 ranks are converted in a separate process with no process group and
no GPU, then resumed by FSDP (2 ranks) and Fake (1 rank, in the test process) with the writer's
losses, parameters, Adam moments and step, scheduler, dataloader position and train state. The
refusals (convert again, convert a portable checkpoint) call the CLI's ``main`` in the test process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lightrft.strategy import checkpoint as ck
from lightrft.strategy import integrity
from lightrft.testing.portable_resume import resume_problems, run_matrix

NAMES = ["ds2-ws2", "ds3-ws2"]


def _convert(src: Path, out: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)  # offline: nothing to join
    cmd = [sys.executable, "-m", "lightrft.strategy.ckpt_cli", "convert", str(src), "--to", "portable", str(out)]  # fmt: skip
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def _convert_here(src: Path, out: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """The CLI's ``main`` in this process (a refusal needs no separate process): exit code, stderr."""
    from lightrft.strategy.ckpt_cli import main

    capsys.readouterr()
    code = main(["convert", str(src), "--to", "portable", str(out)])
    return code, capsys.readouterr().err


def test_native_zero2_and_zero3_checkpoints_convert_offline_and_resume_on_fsdp_and_fake(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    native = run_matrix(str(tmp_path / "native"), [(2, ["ds2", "ds3"], {})], layout="native")
    converted = tmp_path / "converted"
    for name in NAMES:
        src = tmp_path / "native" / name / "saved"
        manifest = integrity.read_manifest(src)
        assert (manifest["layout"], manifest["world_size"]) == ("native", 2)
        assert any(f.endswith("optim_states.pt") for f in manifest["files"])
        proc = _convert(src, converted / name / "saved")
        assert proc.returncode == 0, proc.stderr[-4000:]
        report = json.loads(proc.stdout)
        assert report["layout"] == "portable" and report["to"] == str(converted / name / "saved")
        ck.write_latest(converted / name, "saved")
        m = integrity.verify_checkpoint(converted / name / "saved")
        assert (m["layout"], m["backend"], m["world_size"], m["converted_from"]) == (
            "portable",
            "deepspeed",
            2,
            str(src),
        )
        files = set(m["files"])
        wanted = (
            "portable/.metadata",
            "lightrft_scheduler.pt",
            "lightrft_rank00000.pt",
            "lightrft_rank00001.pt",
        )
        assert set(wanted) <= files
        # Nothing native is left.
        assert not any(f.endswith(("model_states.pt", "optim_states.pt")) for f in files)
        if name != NAMES[0]:
            continue  # the refusals below do not depend on the stage (each is a DeepSpeed import)
        # Converting again refuses to overwrite; a portable checkpoint is not converted twice.
        code, err = _convert_here(src, converted / name / "saved", capsys)
        assert code == 1 and "exists" in err
        code, err = _convert_here(converted / name / "saved", tmp_path / "twice", capsys)
        assert code == 1 and "has the portable layout already" in err

    resumed = run_matrix(str(converted), [(2, [], {"fsdp": NAMES}), (1, [], {"fake": NAMES})])
    assert sorted(resumed["read"]) == [f"{r} <- {w}" for r in ("fake-ws1", "fsdp-ws2") for w in NAMES]
    resumed["written"] = native["written"]  # the uninterrupted runs of the native writers
    assert resume_problems(resumed) == []


def test_convert_refuses_a_zero0_checkpoint_naming_the_field_and_what_is_valid(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from lightrft.strategy import get_fake_strategy
    from lightrft.strategy.ckpt_cli import main
    from lightrft.testing.conformance.spec import BASE_CONFIG, tiny_model
    from lightrft.testing.harness import build

    strategy = get_fake_strategy(BASE_CONFIG)
    model, _, _ = build(strategy, tiny_model())
    strategy.save_ckpt(model, tmp_path / "ckpt", tag="s1")
    # A ZeRO-0 DeepSpeed manifest: the refusal comes before any file is read (no DeepSpeed run).
    ds = {**integrity.read_manifest(tmp_path / "ckpt" / "s1"), "backend": "deepspeed", "zero_stage": 0}
    monkeypatch.setattr(integrity, "verify_checkpoint", lambda *a, **k: ds)
    assert main(["convert", str(tmp_path / "ckpt"), "--to", "portable", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "has zero_stage=0" in err and "reads ZeRO stages 1, 2 and 3" in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "ckpt" / ".tmp-out").exists()
