"""Checkpoint manifests, verification and the agreement between ranks, in one process (FakeStrategy
and the pure functions of lightrft.strategy.integrity / checkpoint)."""

import json
import os
import time

import pytest
import torch

from lightrft.strategy import CheckpointError, get_fake_strategy, integrity
from lightrft.strategy import checkpoint as ck
from lightrft.testing import FakeStrategy
from lightrft.testing.checkpoint_faults import check_damaged_loads, damage, damage_problems
from lightrft.testing.conformance.spec import BASE_CONFIG, tiny_model
from lightrft.testing.harness import build, full_params, train
from lightrft.testing.models import make_batches


def _trained(tmp_path, tags=("good",)):
    strategy = get_fake_strategy(BASE_CONFIG)
    model, optim, sched = build(strategy, tiny_model())
    for i, tag in enumerate(tags):
        train(strategy, model, optim, sched, make_batches(i, 1, strategy.config.train_batch_size))
        strategy.save_ckpt(model, tmp_path, tag=tag)
        time.sleep(0.01)  # distinct modification times
    return strategy, model, optim


def test_manifest_records_every_file_step_backend_and_versions(tmp_path):
    _trained(tmp_path, ["s1", "s2"])
    m = integrity.read_manifest(tmp_path / "s2")
    on_disk = {p.name: p.stat().st_size for p in (tmp_path / "s2").iterdir() if p.name != "manifest.json"}
    assert {k: v["size"] for k, v in m["files"].items()} == on_disk
    assert set(on_disk) == {"fake_state.pt", "lightrft_rank00000.pt", "lightrft_client_state.pt"}
    assert (m["step"], m["backend"], m["world_size"], m["tag"], m["layout"]) == (2, "fake", 1, "s2", "native")
    assert m["train_state"] == {"micro_step": 8, "global_step": 2, "skipped_steps": 0}
    assert m["libraries"]["torch"] == torch.__version__ and "lightrft-testing" in m["libraries"]
    assert m["algorithm"] == "xxh3_128"  # xxhash is in the dev group
    digest = integrity.file_digest(tmp_path / "s2" / "fake_state.pt", "xxh3_128")
    assert m["files"]["fake_state.pt"]["hash"] == digest and len(digest) == 32


def test_sha256_without_xxhash_and_both_catch_one_flipped_bit(tmp_path, monkeypatch):
    monkeypatch.setattr(integrity, "default_algorithm", lambda: "sha256")
    _trained(tmp_path, ["a"])
    m = integrity.verify_checkpoint(tmp_path / "a")
    assert m["algorithm"] == "sha256"
    assert m["files"]["fake_state.pt"]["hash"] == integrity.file_digest(
        tmp_path / "a" / "fake_state.pt", "sha256"
    )
    damage(tmp_path / "a" / "fake_state.pt", "corrupt")
    with pytest.raises(CheckpointError, match=r"fake_state.pt is corrupted: its sha256 checksum"):
        integrity.verify_checkpoint(tmp_path / "a")
    # Sizes alone do not see a flipped bit; the checksums do.
    integrity.verify_checkpoint(tmp_path / "a", checksums=False)


def test_every_damaged_file_fails_the_load_and_leaves_the_state_untouched(tmp_path):
    res = check_damaged_loads({"strategy": "fake"}, str(tmp_path))
    assert res["kinds"] == ["manifest", "rank_state", "client_state", "fake_state"]
    assert len(res["cases"]) == 4 * 3
    assert damage_problems([res]) == []
    by = {(c["kind"], c["how"]): c["message"] for c in res["cases"]}
    assert by[("fake_state", "truncate")].startswith(
        f"checkpoint {str(tmp_path / 'bad-fake_state-truncate')!r}"
    )
    assert by[("manifest", "delete")].endswith("load the last good checkpoint instead: tag='good2'")
    # The intact checkpoint still loads afterwards, and moves the state back to the save.
    assert res["clean_load"] == "good2" and res["clean_load_changed_params"]


def test_no_good_checkpoint_left_says_so(tmp_path):
    strategy, model, _ = _trained(tmp_path, ["only"])
    damage(tmp_path / "only" / "fake_state.pt", "truncate")
    with pytest.raises(CheckpointError, match="no other checkpoint in .* passes verification") as info:
        strategy.load_ckpt(model, tmp_path)
    assert info.value.file == "fake_state.pt" and info.value.last_good is None


def test_unfinished_or_legacy_directory_without_manifest(tmp_path):
    strategy, model, _ = _trained(tmp_path, ["good"])
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "fake_state.pt").write_bytes(b"x" * 10)
    with pytest.raises(CheckpointError, match=r"has no manifest.json: its save did not finish.*tag='good'"):
        strategy.load_ckpt(model, tmp_path, tag="half")


def test_edited_manifest_is_caught_by_its_own_checksum(tmp_path):
    strategy, model, _ = _trained(tmp_path, ["a", "b"])
    m = json.loads((tmp_path / "b" / "manifest.json").read_text())
    m["world_size"] = 2  # still valid JSON
    (tmp_path / "b" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match=r"manifest.json is corrupted \(its own checksum.*tag='a'"):
        strategy.load_ckpt(model, tmp_path)


def test_another_backend_cannot_load_a_native_checkpoint(tmp_path):
    _trained(tmp_path, ["a"])

    class Other(FakeStrategy):
        name = "other"

    other = Other(BASE_CONFIG)
    other.setup_distributed()
    model, optim, sched = build(other, tiny_model())
    before = full_params(other, model)
    with pytest.raises(CheckpointError, match="written by backend 'fake' in its native layout.*'other'"):
        other.load_ckpt(model, tmp_path)
    assert all(torch.equal(before[k], v) for k, v in full_params(other, model).items())


def test_ranks_agree_on_the_lowest_failing_rank():
    err = CheckpointError("ckpt 'x': a.pt is truncated", path="/r/x", file="a.pt", last_good="y")
    gathered = [None, ("CheckpointError", str(err), err.path, err.file, err.last_good)]
    # Rank 0 found nothing wrong, rank 1 did: both raise rank 1's error.
    for mine in (None, err):
        with pytest.raises(CheckpointError, match=r"a.pt is truncated \(reported by rank 1 of 2\)") as info:
            integrity.agree(mine, lambda obj: gathered)
        assert (info.value.file, info.value.last_good) == ("a.pt", "y")
    missing = [("FileNotFoundError", "no such tag", None, None, None), None]
    with pytest.raises(FileNotFoundError, match="no such tag"):
        integrity.agree(None, lambda obj: missing)
    integrity.agree(None, lambda obj: [None, None])  # nobody failed: no error


def test_writer_ranks_and_the_load_split():
    assert integrity.writer_rank("dcp/__3_0.distcp") == 3
    assert integrity.writer_rank("zero_pp_rank_5_mp_rank_00_optim_states.pt") == 5
    assert integrity.writer_rank("bf16_zero_pp_rank_2_mp_rank_00_optim_states.pt") == 2
    assert integrity.writer_rank("lightrft_rank00007.pt") == 7
    assert integrity.writer_rank("dcp/.metadata") == integrity.writer_rank("mp_rank_00_model_states.pt") == 0
    files = {f"f{i}": {"size": s, "hash": ""} for i, s in enumerate([90, 50, 40, 30, 10, 5])}
    shares = [integrity.share_of_files(files, r, 3) for r in range(3)]
    assert sorted(f for s in shares for f in s) == sorted(files)
    assert [sum(files[f]["size"] for f in s) for s in shares] == [90, 65, 70]


def test_rotation_and_resave_leave_no_half_checkpoint(tmp_path):
    for i in range(3):
        ck.staged_save(tmp_path, f"s{i}", lambda p: (p / "w").write_bytes(b"x"), is_rank_0=True,
                       barrier=lambda: None, max_num=2, max_mem_gb=1.0)  # fmt: skip
        time.sleep(0.01)
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["s1", "s2"]
    # A re-save of s2 killed between its two renames: s2 is out of place, its old copy whole.
    os.replace(tmp_path / "s2", tmp_path / f"{ck.OLD_PREFIX}s2")
    assert ck.resolve_checkpoint(tmp_path, None) == tmp_path / f"{ck.OLD_PREFIX}s2"
    integrity.verify_checkpoint(ck.resolve_checkpoint(tmp_path, None))
    ck.prepare_staging(tmp_path, "s3")  # the next save puts it back
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["s1", "s2"]
    integrity.verify_checkpoint(tmp_path / "s2")
