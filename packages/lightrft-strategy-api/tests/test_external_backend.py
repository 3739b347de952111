"""A backend from outside the workspace: a distribution made here, in tmp_path, whose entry point
(``lightrft.strategies``) registers a strategy with its own native checkpoint file. Neither
``lightrft-ckpt`` nor the fault kit knows its name or its files: they find the class through the
registry from the manifest, and inspect, convert and damage its checkpoints."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch

from lightrft.strategy import get_strategy, integrity
from lightrft.strategy.ckpt_cli import main
from lightrft.testing.checkpoint_faults import check_damaged_loads, damage_problems
from lightrft.testing.conformance.spec import BASE_CONFIG, tiny_model
from lightrft.testing.harness import build, full_params, train
from lightrft.testing.models import make_batches

# The backend: FakeStrategy's mechanism, but a native checkpoint of its own (one file, keyed by
# parameter name) and the offline hooks that read and convert it.
BACKEND = """
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from lightrft.strategy import portable
from lightrft.strategy.checkpointer import LIGHTRFT_FILE_KINDS
from lightrft.testing import FakeStrategy

STATE = "ext_state.pt"


class ExtStrategy(FakeStrategy):
    name = "ext"
    checkpoint_file_kinds = (*LIGHTRFT_FILE_KINDS, ("ext_state", (STATE,)))

    def _save_checkpoint(self, model: Any, path: Path) -> None:
        st = self._train_states[id(model)]
        model_sd, optim_sd = get_state_dict(model, st.optimizer)
        sched = st.scheduler.state_dict() if st.scheduler is not None else None
        torch.save({"model": model_sd, "optimizer": optim_sd, "scheduler": sched}, path / STATE)

    def _load_checkpoint(self, model, path, *, load_module_strict, load_optimizer_states,
                         load_lr_scheduler_states) -> None:
        state = torch.load(path / STATE, weights_only=True)
        st = self._train_states[id(model)]
        set_state_dict(model, st.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"] if load_optimizer_states else {})
        if load_lr_scheduler_states and state["scheduler"] is not None:
            st.scheduler.load_state_dict(state["scheduler"])

    @classmethod
    def read_checkpoint_tensors(cls, path, manifest, load):
        return torch.load(path / STATE, weights_only=True, mmap=True)["model"]

    @classmethod
    def convert_checkpoint_to_portable(cls, path, manifest, staging) -> None:
        from torch.distributed.checkpoint.state_dict_saver import save

        state = torch.load(path / STATE, weights_only=True)
        save({"model": state["model"], "optimizer": state["optimizer"]},
             checkpoint_id=str(staging / portable.PORTABLE_DIR), no_dist=True)
        torch.save(state["scheduler"], staging / portable.SCHEDULER_FILE)
"""


@pytest.fixture
def ext_backend(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """Installs the distribution ``lightrft-ext-backend`` for this test: its package and its
    dist-info (metadata and entry point) on sys.path, as an installer would leave them."""
    site = tmp_path / "site"
    (site / "lightrft_ext_backend").mkdir(parents=True)
    (site / "lightrft_ext_backend" / "__init__.py").write_text(textwrap.dedent(BACKEND))
    info = site / "lightrft_ext_backend-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: lightrft-ext-backend\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text("[lightrft.strategies]\next = lightrft_ext_backend:ExtStrategy\n")
    monkeypatch.syspath_prepend(str(site))
    return "ext"


def _save(root: Path) -> dict[str, torch.Tensor]:
    strategy = get_strategy({**BASE_CONFIG, "strategy": "ext"})
    model, optim, sched = build(strategy, tiny_model())
    train(strategy, model, optim, sched, make_batches(3, 2, strategy.config.train_batch_size))
    strategy.save_ckpt(model, root, tag="s1")
    return full_params(strategy, model)


def test_lightrft_ckpt_inspects_and_converts_a_checkpoint_of_an_external_backend(
    ext_backend: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    saved = _save(tmp_path / "ckpt")
    assert main(["inspect", str(tmp_path / "ckpt"), "--checksums"]) == 0
    out = capsys.readouterr().out
    assert "  backend: ext\n" in out and "ext_state.pt" in out and "manifest check: OK" in out
    for name, t in saved.items():
        assert f"  {name}  {list(t.shape)}  float32\n" in out

    assert (
        main(["convert", str(tmp_path / "ckpt"), "--to", "portable", str(tmp_path / "portable" / "s1")]) == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert report["layout"] == "portable"
    m = integrity.verify_checkpoint(tmp_path / "portable" / "s1")
    assert (m["backend"], m["layout"]) == ("ext", "portable")
    assert {"portable/.metadata", "lightrft_scheduler.pt", "lightrft_rank00000.pt"} <= set(m["files"])
    assert "ext_state.pt" not in m["files"]

    # FakeStrategy resumes the converted checkpoint with the saved weights, bit for bit.
    fake = get_strategy({**BASE_CONFIG, "strategy": "fake"})
    model, _, _ = build(fake, tiny_model(seed=99))
    fake.load_ckpt(model, tmp_path / "portable", tag="s1")
    got = full_params(fake, model)
    assert sorted(got) == sorted(saved) and all(torch.equal(got[k], saved[k]) for k in saved)
    # inspect reads the portable layout without the backend's hooks.
    assert main(["inspect", str(tmp_path / "portable" / "s1")]) == 0
    out = capsys.readouterr().out
    assert all(f"  {name}  {list(t.shape)}  float32\n" in out for name, t in saved.items())


def test_a_backend_without_a_converter_is_refused_naming_those_that_convert(
    ext_backend: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    strategy = get_strategy({**BASE_CONFIG, "strategy": "fake"})
    model, optim, sched = build(strategy, tiny_model())
    strategy.save_ckpt(model, tmp_path / "ckpt", tag="s1")
    assert main(["convert", str(tmp_path / "ckpt"), "--to", "portable", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "has backend='fake', whose strategy FakeStrategy has no offline conversion" in err
    installed = err.split("the installed backends that convert: ")[1].strip()
    assert "'ext'" in installed.split(", ") and "'fake'" not in installed
    assert not (tmp_path / "out").exists() and not (tmp_path / ".tmp-out").exists()


def test_a_checkpoint_of_an_unregistered_backend_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    strategy = get_strategy({**BASE_CONFIG, "strategy": "fake"})
    model, _, _ = build(strategy, tiny_model())
    strategy.save_ckpt(model, tmp_path, tag="s1")
    manifest = {**integrity.read_manifest(tmp_path / "s1"), "backend": "nowhere"}
    monkeypatch.setattr(integrity, "verify_checkpoint", lambda *a, **k: manifest)
    assert main(["convert", str(tmp_path), "--to", "hf", str(tmp_path / "hf")]) == 1
    err = capsys.readouterr().err
    assert "has backend='nowhere', which no installed distribution registers as a strategy" in err


def test_the_fault_kit_damages_the_files_the_external_backend_names(ext_backend: str, tmp_path: Path) -> None:
    res = check_damaged_loads({"strategy": "ext"}, str(tmp_path))
    assert res["kinds"] == ["manifest", "rank_state", "client_state", "ext_state"]
    assert dict((c["kind"], c["file"]) for c in res["cases"])["ext_state"] == "ext_state.pt"
    assert damage_problems([res]) == []
    assert res["clean_load"] == "good2" and res["clean_load_changed_params"]
