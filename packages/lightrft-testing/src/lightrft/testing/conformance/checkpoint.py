"""Checkpoints: bit-for-bit resume, client state, rotation and the ``latest`` marker."""

from __future__ import annotations

from itertools import islice
from pathlib import Path
from typing import Any

import torch

from lightrft.strategy import StrategyBase
from lightrft.strategy.checkpoint import LATEST, TMP_PREFIX

from ..harness import build, flat, full_params, param_groups, shared_tmpdir, train
from ..models import make_batches
from .spec import DATA_SEED, MODEL_SEED, Capability, tiny_model


def loader_steps(
    strategy: StrategyBase, model: Any, optim: Any, sched: Any, loader: Any, steps: int
) -> list[float]:
    """``steps`` optimizer steps from a dataloader; each loss is scaled by a random factor so that
    the RNG state matters for a bit-for-bit resume."""
    it = iter(loader)
    micro = (islice(it, strategy.accumulated_gradient) for _ in range(steps))
    scale = lambda loss: loss * (1 + 0.1 * torch.rand(()).item())  # noqa: E731
    return train(strategy, model, optim, sched, micro_batches=micro, loss_hook=scale)["losses"]


def measure(strategy: StrategyBase) -> dict[str, Any]:
    """Train, save, train more (the reference); then a fresh model and strategy load the
    checkpoint and train the same steps: losses and parameters must match bit for bit."""
    rows = make_batches(DATA_SEED + 1, 1, 64)[0]
    data = [rows[i] for i in range(64)]
    micro = strategy.config.micro_train_batch_size
    with shared_tmpdir(strategy, "ckpt") as root:
        model, optim, sched = build(strategy, tiny_model())
        loader = strategy.setup_dataloader(data, micro, shuffle=True)
        loader_steps(strategy, model, optim, sched, loader, 2)
        client = {"epoch": 3, "note": "hello", "tensor": torch.arange(4)}
        strategy.save_ckpt(model, root, tag="step2", client_state=client)
        ref_losses = loader_steps(strategy, model, optim, sched, loader, 2)
        ref_params = flat(full_params(strategy, model))
        ref_lr = [g["lr"] for g in param_groups(optim)]
        ref_step = strategy.train_state(model).global_step

        fresh = type(strategy)(strategy.config)
        fresh.setup_distributed()
        model2, optim2, sched2 = build(fresh, tiny_model(MODEL_SEED + 1))
        loader2 = fresh.setup_dataloader(data, micro, shuffle=True)
        torch.manual_seed(12345)  # a different RNG state: load_ckpt must restore the saved one
        path, loaded_client = fresh.load_ckpt(model2, root)
        restored_step = fresh.train_state(model2).global_step
        res_losses = loader_steps(fresh, model2, optim2, sched2, loader2, 2)
        res_params = flat(full_params(fresh, model2))

        # Rotation and the latest marker: two more saves with max_num=2 keep the newest two.
        fresh.save_ckpt(model2, root, tag="step4", max_num=2)
        fresh.save_ckpt(model2, root, tag="step5", max_num=2)
        fresh.barrier()
        listing = sorted(p.name for p in root.iterdir())
        latest = (root / LATEST).read_text().strip()
    return {
        "path_name": Path(path).name,
        "client": loaded_client,
        "ref_losses": ref_losses,
        "res_losses": res_losses,
        "params_equal": bool(torch.equal(ref_params, res_params)),
        "max_param_diff": float((ref_params - res_params).abs().max()),
        "ref_lr": ref_lr,
        "res_lr": [g["lr"] for g in param_groups(optim2)],
        "ref_step": ref_step,
        "restored_step": restored_step,
        "listing": listing,
        "latest": latest,
        "tmp_left": [n for n in listing if n.startswith(TMP_PREFIX)],
    }


def test_checkpoint_resume_bit_for_bit(suite: Any) -> None:
    for r in suite.results("checkpoint"):
        assert r["path_name"] == "step2"
        assert r["res_losses"] == r["ref_losses"], (r["res_losses"], r["ref_losses"])
        assert r["params_equal"], f"resumed parameters differ by {r['max_param_diff']}"
        assert r["res_lr"] == r["ref_lr"]
        assert r["restored_step"] == 2 and r["ref_step"] == 4


def test_checkpoint_client_state(suite: Any) -> None:
    for r in suite.results("checkpoint"):
        c = r["client"]
        assert c["epoch"] == 3 and c["note"] == "hello" and torch.equal(c["tensor"], torch.arange(4))


def test_checkpoint_rotation_and_latest(suite: Any) -> None:
    for r in suite.results("checkpoint"):
        assert r["latest"] == "step5"
        assert [n for n in r["listing"] if not n.startswith(".")] == ["latest", "step4", "step5"]
        assert r["tmp_left"] == []


CAPABILITY = Capability(
    "checkpoint",
    measure,
    (test_checkpoint_resume_bit_for_bit, test_checkpoint_client_state, test_checkpoint_rotation_and_latest),
)
