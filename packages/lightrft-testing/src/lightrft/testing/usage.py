"""Runs a documented usage snippet, as written, against any backend.

The README's Usage section (and DESIGN.md's) is the first code a user copies. Tests execute it
verbatim, extracted from the document at run time, so the documentation and the code cannot
drift apart: only the names the snippet expects to exist (``args``, the models, ``dataloader``,
``compute_loss``, ``max_steps``) are provided around it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
from pathlib import Path
from typing import Any

from .models import causal_lm_loss, make_batches, make_tiny_model

_BLOCK = re.compile(r"```python\n(.*?)```", re.DOTALL)


def usage_snippet(document: str | os.PathLike[str], heading: str = "## Usage") -> str:
    """The first Python code block after ``heading`` in a Markdown ``document``."""
    text = Path(document).read_text()
    start = text.find(f"\n{heading}\n")
    if start < 0:
        raise ValueError(f"{document}: no {heading!r} section")
    match = _BLOCK.search(text, start)
    if match is None:
        raise ValueError(f"{document}: no ```python block after {heading!r}")
    return match.group(1)


def run_usage_snippet(
    document: str, workdir: str, strategy: str = "fake", heading: str = "## Usage", **config: Any
) -> dict[str, Any]:
    """Executes the snippet of ``document`` in ``workdir`` with ``args.strategy=strategy`` (and
    ``config`` on top of small defaults) on this rank; returns the losses it computed, the
    actor's optimizer steps, the checkpoint marker and the strategy's accumulation steps."""
    values = {
        "strategy": strategy, "train_batch_size": 4, "micro_train_batch_size": 1, "bf16": False,
        "seed": 0, "actor_learning_rate": 5e-3, "critic_learning_rate": 5e-3, "max_norm": 1.0,
        "lr_warmup_ratio": 0.0, **config,
    }  # fmt: skip
    args = argparse.Namespace(**values)
    batches = make_batches(seed=11, num=16, batch_size=1)
    losses: list[float] = []
    namespace: dict[str, Any] = {
        "args": args,
        "actor": make_tiny_model(1),
        "critic": make_tiny_model(2),
        "reward_models": [make_tiny_model(3)],
        "initial_model": make_tiny_model(1),
        "dataloader": batches,
        "max_steps": 8,
    }

    def compute_loss(batch: Any) -> Any:
        loss = causal_lm_loss(namespace["actor"], batch)  # the actor the snippet prepared
        losses.append(float(loss.detach()))
        return loss

    namespace["compute_loss"] = compute_loss
    with _chdir(workdir):
        exec(compile(usage_snippet(document, heading), f"{document} {heading}", "exec"), namespace)
    strategy_obj = namespace["strategy"]
    marker = Path(workdir) / "checkpoints" / "latest"
    return {
        "losses": losses,
        "global_step": strategy_obj.train_state(namespace["actor"]).global_step,
        "latest": marker.read_text() if marker.exists() else None,
        "accumulated_gradient": strategy_obj.accumulated_gradient,
        "backend": type(strategy_obj).__name__,
    }


def run_usage_snippets(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """:func:`run_usage_snippet` once per item of ``runs`` (its keyword arguments: ``document``,
    ``workdir`` and the rest), in turn, in this process: one launch for several configurations
    (each run's ``get_strategy(args)`` joins the process group the first one set up)."""
    return [run_usage_snippet(**run) for run in runs]


@contextlib.contextmanager
def _chdir(path: str) -> Any:
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)
