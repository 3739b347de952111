"""``lightrft-ckpt`` on FakeStrategy checkpoints: inspect, verify (one, all, damaged), convert to HF."""

import json
import time

import torch
from safetensors.torch import load_file

from lightrft.strategy import get_fake_strategy
from lightrft.strategy.ckpt_cli import main
from lightrft.testing.checkpoint_faults import damage
from lightrft.testing.conformance.spec import BASE_CONFIG, tiny_model
from lightrft.testing.harness import build, train
from lightrft.testing.models import make_batches


def _save_two(root):
    strategy = get_fake_strategy(BASE_CONFIG)
    model, optim, sched = build(strategy, tiny_model())
    for i, tag in enumerate(["s1", "s2"]):
        train(strategy, model, optim, sched, make_batches(i, 1, strategy.config.train_batch_size))
        strategy.save_ckpt(model, root, tag=tag)
        time.sleep(0.01)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_inspect_lists_step_backend_files_and_tensors(tmp_path, capsys):
    state = _save_two(tmp_path)
    assert main(["inspect", str(tmp_path), "--checksums"]) == 0
    out = capsys.readouterr().out
    assert f"checkpoint: {tmp_path / 's2'}" in out  # the save directory's latest
    assert "  step: 2\n" in out and "  backend: fake\n" in out and "  world_size: 1\n" in out
    assert "manifest check: OK (sizes and checksums)" in out
    assert "fake_state.pt" in out and "lightrft_rank00000.pt" in out
    for name, t in state.items():
        assert f"  {name}  {list(t.shape)}  float32\n" in out
    assert f"total parameters: {sum(t.numel() for t in state.values()):,}" in out


def test_verify_one_all_and_damaged(tmp_path, capsys):
    _save_two(tmp_path)
    assert main(["verify", str(tmp_path / "s1")]) == 0
    assert main(["verify", str(tmp_path), "--all"]) == 0
    assert capsys.readouterr().out.count("OK ") == 3
    damage(tmp_path / "s1" / "fake_state.pt", "corrupt")
    assert main(["verify", str(tmp_path), "--all", "--sizes-only"]) == 0  # same size: sizes can't tell
    assert main(["verify", str(tmp_path), "--all"]) == 1
    out = capsys.readouterr().out
    assert (
        "FAILED checkpoint" in out and "fake_state.pt is corrupted" in out and f"OK {tmp_path / 's2'}" in out
    )


def test_convert_to_hf_safetensors(tmp_path, capsys):
    state = _save_two(tmp_path / "ckpt")
    hf_src = tmp_path / "hf_src"
    hf_src.mkdir()
    (hf_src / "config.json").write_text(json.dumps({"model_type": "tiny"}))
    out = tmp_path / "hf"
    assert main(["convert", str(tmp_path / "ckpt"), "--to", "hf", str(out), "--hf-config", str(hf_src)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["tensors"] == len(state) and report["copied"] == ["config.json"]
    weights = load_file(str(out / "model.safetensors"))
    assert sorted(weights) == sorted(state)
    assert all(torch.equal(weights[k], state[k]) for k in state)


def test_missing_path_is_an_error_not_a_traceback(tmp_path, capsys):
    assert main(["verify", str(tmp_path / "nope")]) == 1
    assert "lightrft-ckpt verify:" in capsys.readouterr().err


def test_convert_to_portable_names_the_backend_and_what_it_reads(tmp_path, capsys):
    _save_two(tmp_path / "ckpt")
    assert main(["convert", str(tmp_path / "ckpt"), "--to", "portable", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    # The backends that convert are the installed ones whose class has the offline hook (in this
    # package's environment none; test_external_backend installs one and finds it listed).
    assert (
        "has backend='fake'" in err and "FakeStrategy has no offline conversion to the portable layout" in err
    )
    assert "the installed backends that convert: " in err
    assert not (tmp_path / "out").exists() and not (tmp_path / ".tmp-out").exists()


def test_convert_a_deepspeed_checkpoint_without_lightrft_deepspeed_names_the_package(
    tmp_path, capsys, monkeypatch
):
    import sys

    from lightrft.strategy import integrity

    _save_two(tmp_path / "ckpt")
    # A DeepSpeed manifest on a Fake checkpoint: the converter is looked up before any file is read.
    # Without lightrft-deepspeed (this package's environment) the registry names the distribution;
    # with it, its converter module failing to import names it too.
    manifest = integrity.read_manifest(tmp_path / "ckpt" / "s2")
    ds = {**manifest, "backend": "deepspeed", "zero_stage": 2}
    monkeypatch.setattr(integrity, "verify_checkpoint", lambda *a, **k: ds)
    monkeypatch.setitem(sys.modules, "lightrft.deepspeed.convert", None)  # import fails
    assert main(["convert", str(tmp_path / "ckpt"), "--to", "portable", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "needs lightrft-deepspeed" in err and "`uv add lightrft-deepspeed`" in err
    assert not (tmp_path / "out").exists()
    # ZeRO-0's refusal is DeepSpeed's own: lightrft-deepspeed's test_ckpt_convert_deepspeed.
