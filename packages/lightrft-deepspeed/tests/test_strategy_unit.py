"""DeepspeedStrategy pieces that need no process group: registration, optimizer, properties."""

from __future__ import annotations

import contextlib

import pytest
import torch

from lightrft.deepspeed import DeepspeedStrategy
from lightrft.strategy.registry import load_strategy_class
from lightrft.testing import make_tiny_model


def test_registered_under_deepspeed() -> None:
    assert load_strategy_class("deepspeed") is DeepspeedStrategy
    assert DeepspeedStrategy.name == "deepspeed"


@pytest.mark.parametrize(("stage", "boundary_only"), [(0, True), (1, True), (2, False), (3, False)])
def test_syncs_only_at_boundary(stage: int, boundary_only: bool) -> None:
    assert DeepspeedStrategy({"zero_stage": stage}).syncs_only_at_boundary is boundary_only


def test_cpu_optimizer_is_adamw_without_decay_on_biases_and_norms() -> None:
    s = DeepspeedStrategy({"zero_stage": 2, "l2": 0.1, "adam_eps": 1e-6})
    model = make_tiny_model(0)
    opt = s.create_optimizer(model, lr=3e-4, betas=(0.8, 0.9), weight_decay=0.1)
    assert type(opt) is torch.optim.AdamW
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert (decay["lr"], decay["betas"], decay["eps"]) == (3e-4, (0.8, 0.9), 1e-6)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(not names[id(p)].endswith("bias") and "norm" not in names[id(p)] for p in decay["params"])
    assert {names[id(p)] for p in no_decay["params"]} >= {"norm.weight", "norm.bias", "layers.0.up.bias"}
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_init_model_context_is_a_no_op_below_zero3() -> None:
    assert isinstance(DeepspeedStrategy({"zero_stage": 2}).init_model_context(), contextlib.nullcontext)


def test_unwrap_model_of_a_plain_module() -> None:
    model = make_tiny_model(0)
    assert DeepspeedStrategy({}).unwrap_model(model) is model


def test_misuse_is_reported() -> None:
    s = DeepspeedStrategy({"zero_stage": 2})
    model = make_tiny_model(0)
    with pytest.raises(ValueError, match="was not prepared for training"):
        s.backward(torch.zeros(()), model, None)
    with pytest.raises(ValueError, match="not a DeepSpeed engine"):
        s._engine_of(model)


class _NotAllowlisted:
    """Any class outside DeepSpeed's allowlist: a checkpoint holding one must not load."""


def test_deepspeed_files_load_weights_only(tmp_path) -> None:
    import pickle

    import torch
    from deepspeed.runtime.zero.config import ZeroStageEnum

    from lightrft.deepspeed.strategy import _weights_only_load

    torch.save({"zero_stage": ZeroStageEnum(2), "w": torch.ones(2)}, tmp_path / "ok.pt")
    loaded = _weights_only_load(str(tmp_path / "ok.pt"))
    assert loaded["zero_stage"] == ZeroStageEnum(2) and torch.equal(loaded["w"], torch.ones(2))
    torch.save({"obj": _NotAllowlisted()}, tmp_path / "bad.pt")
    with pytest.raises(pickle.UnpicklingError, match="_NotAllowlisted"):
        _weights_only_load(str(tmp_path / "bad.pt"))


def test_cpu_comm_op_build_is_skipped_unless_asked_for(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    from lightrft.deepspeed.strategy import CPU_SHM_OP_ENV, _cpu_comm_op

    # Not `import deepspeed.comm.torch as m`: the package's attribute `torch` is torch itself.
    ds_comm_torch = importlib.import_module("deepspeed.comm.torch")
    original = ds_comm_torch.build_shm_op
    monkeypatch.delenv(CPU_SHM_OP_ENV, raising=False)
    with _cpu_comm_op():
        assert ds_comm_torch.build_shm_op() is None  # nothing built
    assert ds_comm_torch.build_shm_op is original
    with pytest.raises(RuntimeError, match="boom"), _cpu_comm_op():
        raise RuntimeError("boom")
    assert ds_comm_torch.build_shm_op is original  # restored after an error too
    monkeypatch.setenv(CPU_SHM_OP_ENV, "1")
    with _cpu_comm_op():
        assert ds_comm_torch.build_shm_op is original  # the user asked for the op
