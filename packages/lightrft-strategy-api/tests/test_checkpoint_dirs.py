import os
import time

import pytest

from lightrft.strategy import checkpoint as ck


def _save(root, tag, payload=b"x", **kw):
    return ck.staged_save(
        root, tag, lambda p: (p / "w.bin").write_bytes(payload), is_rank_0=True, barrier=lambda: None,
        max_num=kw.get("max_num", 3), max_mem_gb=kw.get("max_mem_gb", 1000.0),
    )  # fmt: skip


def test_publish_latest_and_rotation(tmp_path):
    for i in range(5):
        _save(tmp_path, f"step{i}")
        time.sleep(0.01)  # distinct modification times
    assert ck.read_latest(tmp_path) == "step4"
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["step2", "step3", "step4"]
    assert ck.resolve_checkpoint(tmp_path, None).name == "step4"


def test_rotation_by_memory(tmp_path):
    for i in range(3):
        _save(tmp_path, f"s{i}", payload=b"x" * 100_000, max_num=10, max_mem_gb=250_000 / (1 << 30))
        time.sleep(0.01)
    # 100 kB each (plus a small manifest), 250 kB allowed: the two newest stay.
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["s1", "s2"]


def test_crash_mid_save_keeps_previous_checkpoint(tmp_path):
    _save(tmp_path, "good")

    def crash(path):
        (path / "partial").write_bytes(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        ck.staged_save(tmp_path, "bad", crash, is_rank_0=True, barrier=lambda: None, max_num=3, max_mem_gb=10)
    assert ck.read_latest(tmp_path) == "good"
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["good"]
    # The next save removes the stale staging directory.
    _save(tmp_path, "next")
    assert not any(n.startswith(ck.TMP_PREFIX) for n in os.listdir(tmp_path))


def test_resave_same_tag_replaces_atomically(tmp_path):
    _save(tmp_path, "t", payload=b"old")
    _save(tmp_path, "t", payload=b"new")
    assert (tmp_path / "t" / "w.bin").read_bytes() == b"new"


@pytest.mark.parametrize("tag", ["../x", "a/b", ".hidden", "latest", "", "-x"])
def test_bad_tags(tag):
    with pytest.raises(ValueError, match="tag="):
        ck.validate_tag(tag)


def test_resolve_errors_list_what_exists(tmp_path):
    with pytest.raises(FileNotFoundError, match="no 'latest' marker"):
        ck.resolve_checkpoint(tmp_path, None)
    _save(tmp_path, "only")
    with pytest.raises(FileNotFoundError, match=r"tag='other' not found.*'only'"):
        ck.resolve_checkpoint(tmp_path, "other")


def test_missing_load_dir_says_no_such_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"load_dir='.*does-not-exist': no such directory"):
        ck.resolve_checkpoint(tmp_path / "does-not-exist", None)
    with pytest.raises(FileNotFoundError, match="no such directory"):
        ck.resolve_checkpoint(tmp_path / "does-not-exist", "global_step1")
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(FileNotFoundError, match="is a file, not a directory"):
        ck.resolve_checkpoint(tmp_path / "a-file", None)
    # An existing directory without checkpoints still says what is missing there.
    with pytest.raises(FileNotFoundError, match="has no 'latest' marker"):
        ck.resolve_checkpoint(tmp_path, None)


def test_load_ckpt_from_missing_directory_through_the_strategy(tmp_path):
    import torch

    from lightrft.strategy import get_fake_strategy

    strategy = get_fake_strategy({"train_batch_size": 2, "micro_train_batch_size": 2})
    (model, _, _), *_ = strategy.prepare_models_and_optimizers(
        torch.nn.Linear(2, 1), None, None, None, None, 1
    )
    with pytest.raises(FileNotFoundError, match=r"load_dir='.*no-checkpoints-here': no such directory"):
        strategy.load_ckpt(model, str(tmp_path / "no-checkpoints-here"))
