"""The building blocks of every multi-rank strategy test: one of each, shared by the conformance
suite and the backends' own tests.

- :func:`build`: the three-step protocol (``prepare_model``, ``create_optimizer`` +
  ``create_scheduler``, ``prepare``) on a model.
- :func:`train`: the one training loop (global batches split per rank, ``backward`` +
  ``optimizer_step`` per micro-batch); returns global mean losses and returned norms.
- :func:`full_params` / :func:`flat` / :func:`max_diff`: full parameters through the weight-sync
  iterator, for comparisons between backends and world sizes.
- :func:`shared_tmpdir`: one directory seen by every rank, removed when every rank is done.
- :func:`count_reductions`: counts the gradient-reduction collectives (:data:`REDUCTION_COLLECTIVES`).
- :func:`run_isolated`: runs named checks on every rank, each isolated; ranks stay in step after a
  failure, and a rank stuck in a collective that a failed peer never joined is freed.
- :func:`plain`: results made safe for ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .models import causal_lm_loss

#: Every name under which torch.distributed has offered a gradient-reducing collective (FSDP2 uses
#: ``reduce_scatter_tensor``, newer torch ``reduce_scatter_single``, DeepSpeed ``all_reduce`` /
#: ``reduce`` / ``reduce_scatter``); absent names are skipped.
REDUCTION_COLLECTIVES: tuple[str, ...] = (
    "all_reduce",
    "all_reduce_coalesced",
    "reduce",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "reduce_scatter_single",
    "_reduce_scatter_base",
)


# ------------------------------------------------------------------------------ training
def build(
    strategy: Any, model: nn.Module, max_steps: int = 10, **optimizer_kwargs: Any
) -> tuple[Any, Any, Any]:
    """``prepare_model`` -> ``create_optimizer`` (lr and weight decay from the strategy's config
    unless given) -> ``create_scheduler(max_steps)`` -> ``prepare``; returns (model, optim, sched)."""
    model = strategy.prepare_model(model, is_training=True)
    optimizer_kwargs.setdefault("lr", strategy.config.actor_learning_rate)
    optimizer_kwargs.setdefault("weight_decay", strategy.config.l2)
    optim = strategy.create_optimizer(model, **optimizer_kwargs)
    sched = strategy.create_scheduler(optim, max_steps)
    return strategy.prepare((model, optim, sched))


def rank_share(strategy: Any, global_batch: torch.Tensor) -> list[torch.Tensor]:
    """This rank's micro-batches of a global batch: a contiguous slice of ``len / world_size``
    rows, cut into ``micro_train_batch_size`` rows each."""
    per = global_batch.shape[0] // strategy.world_size
    mine = global_batch[strategy.get_rank() * per : (strategy.get_rank() + 1) * per]
    micro = strategy.config.micro_train_batch_size
    return [mine[i : i + micro] for i in range(0, per, micro)]


def train(
    strategy: Any,
    model: Any,
    optim: Any,
    sched: Any,
    global_batches: Iterable[torch.Tensor] = (),
    *,
    micro_batches: Iterable[Iterable[torch.Tensor]] | None = None,
    loss_fn: Callable[[Any, torch.Tensor], torch.Tensor] = causal_lm_loss,
    loss_hook: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, list[Any]]:
    """One optimizer step per global batch (split with :func:`rank_share`), or per item of
    ``micro_batches`` (this rank's micro-batches of each step, consumed lazily, e.g. from a
    dataloader). ``loss_hook`` transforms each loss before ``backward`` (scale it, make it NaN).

    Returns ``losses`` (the global mean loss of each step, the same on every rank), ``norms``
    (what ``optimizer_step`` returned at each step's last micro-batch) and ``returned`` (what it
    returned on every micro-batch)."""
    steps = (
        micro_batches if micro_batches is not None else (rank_share(strategy, gb) for gb in global_batches)
    )
    losses: list[float] = []
    norms: list[float | None] = []
    returned: list[float | None] = []
    for step in steps:
        local = []
        for mb in step:
            loss = loss_fn(model, mb.to(strategy.device))
            if loss_hook is not None:
                loss = loss_hook(loss)
            strategy.backward(loss, model, optim)
            returned.append(strategy.optimizer_step(optim, model, sched))
            local.append(loss.detach().float().cpu())
        losses.append(float(strategy.all_reduce(torch.stack(local).mean(), "mean")))
        norms.append(returned[-1])
    return {"losses": losses, "norms": norms, "returned": returned}


def full_params(strategy: Any, model: Any) -> dict[str, torch.Tensor]:
    """Every full parameter (fp32, CPU, a copy) through ``iter_weight_buckets``, keyed by clean name."""
    return {
        name: t.detach().float().cpu().clone()
        for bucket in strategy.iter_weight_buckets(model)
        for name, t in bucket
    }


def flat(params: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The parameters of ``params`` concatenated in name order."""
    return torch.cat([params[k].reshape(-1) for k in sorted(params)])


def max_diff(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    """Largest absolute difference between two name -> tensor maps with the same names."""
    if sorted(a) != sorted(b):
        raise ValueError(f"the maps have different names: {sorted(set(a) ^ set(b))}")
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def param_groups(optim: Any) -> list[dict[str, Any]]:
    """The param groups of an optimizer or of a wrapper holding one in ``.optimizer``."""
    inner = getattr(optim, "optimizer", optim)
    return list(getattr(inner, "param_groups", getattr(optim, "param_groups", [])))


# ------------------------------------------------------------------------ shared files
@contextlib.contextmanager
def shared_tmpdir(strategy: Any, name: str, root: str | os.PathLike[str] | None = None) -> Iterator[Path]:
    """A fresh directory every rank sees (rank 0 makes it under ``root``, ``$LIGHTRFT_TEST_TMP``
    or the system temp dir, and broadcasts its path). On a normal exit every rank waits for the
    others and rank 0 removes it; after an exception it stays (for inspection, and because a
    barrier there could pair with a peer's unrelated collective)."""
    path = None
    if strategy.is_rank_0():
        base = Path(root or os.environ.get("LIGHTRFT_TEST_TMP") or tempfile.gettempdir())
        base.mkdir(parents=True, exist_ok=True)
        path = tempfile.mkdtemp(prefix=f"lightrft-{name}-", dir=base)
    shared = Path(strategy.broadcast_object(path))
    yield shared
    strategy.barrier()
    if strategy.is_rank_0():
        shutil.rmtree(shared, ignore_errors=True)


# ------------------------------------------------------------------------- collectives
class ReductionCounter:
    """Counts calls of :data:`REDUCTION_COLLECTIVES` while active (``n`` in total, ``by_name``)."""

    def __init__(self) -> None:
        self.n = 0
        self.by_name: dict[str, int] = {}
        self._originals = {n: getattr(dist, n) for n in REDUCTION_COLLECTIVES if hasattr(dist, n)}

    def __enter__(self) -> ReductionCounter:
        for name, fn in self._originals.items():
            setattr(dist, name, self._counting(name, fn))
        return self

    def _counting(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            self.n += 1
            self.by_name[name] = self.by_name.get(name, 0) + 1
            return fn(*args, **kwargs)

        return wrapper

    def __exit__(self, *exc: object) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        for name, fn in self._originals.items():
            setattr(dist, name, fn)


def count_reductions() -> ReductionCounter:
    """``with count_reductions() as c: strategy.backward(...)``; then ``c.n`` reductions were issued."""
    return ReductionCounter()


# ------------------------------------------------------------------------ check runner
def plain(x: Any) -> Any:
    """Results travel through ``torch.save`` / ``torch.load(weights_only=True)``: tensors (detached,
    on CPU), numbers, strings and plain containers of them."""
    if isinstance(x, Mapping):
        return {str(k): plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [plain(v) for v in x]
    if torch.is_tensor(x):
        return x.detach().cpu()
    if isinstance(x, float) and math.isnan(x):
        return float("nan")
    return x


_runs = 0


def run_isolated(
    checks: Mapping[str, Callable[[], Any]] | Sequence[tuple[str, Callable[[], Any]]],
    *,
    sync_timeout: float = 180.0,
) -> dict[str, dict[str, Any]]:
    """Runs each check on this rank (all ranks call this with the same checks, in the same order)
    and returns ``{name: {"ok": True, "result": plain(result)} | {"ok": False, "error": traceback}}``.

    After each check the ranks meet through the launcher's key-value store (not the process
    group, whose collectives a failed check may have left unpaired): every rank posts whether its
    check passed, so a failure on one rank is reported with the check's name on every rank
    (``"peers_failed"``). A rank whose peers do not arrive within ``sync_timeout`` seconds (they are
    blocked in a collective it never joined) aborts the process group, which frees them with an
    error; the checks after that are reported as not run, on every rank. Nothing waits forever.
    """
    global _runs
    _runs += 1
    items = list(checks.items()) if isinstance(checks, Mapping) else list(checks)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    store = _launcher_store(sync_timeout) if world > 1 else None
    results: dict[str, dict[str, Any]] = {}
    aborted_at: str | None = None
    for index, (name, check) in enumerate(items):
        if aborted_at is not None:
            results[name] = {
                "ok": False,
                "error": f"not run: the process group was aborted after {aborted_at!r}",
            }
            continue
        try:
            results[name] = {"ok": True, "result": plain(check())}
        except Exception:
            results[name] = {"ok": False, "error": traceback.format_exc()}
        if store is None:
            continue
        prefix = f"lightrft-harness/{_runs}/{index}"
        store.set(f"{prefix}/{rank}", "ok" if results[name]["ok"] else "failed")
        keys = [f"{prefix}/{r}" for r in range(world)]
        try:
            store.wait(keys, timedelta(seconds=sync_timeout))
        except Exception:
            # A peer is stuck in a collective of this check: break the group so that it errors out.
            store.set(f"{prefix}/aborted", str(rank))
            _abort_process_group()
            aborted_at = name
            results[name].setdefault("peers_failed", [])
            continue
        failed = [r for r in range(world) if store.get(f"{prefix}/{r}") != b"ok"]
        if failed:
            results[name]["peers_failed"] = failed
        if store.check([f"{prefix}/aborted"]):
            _abort_process_group()
            aborted_at = name
    return results


def _launcher_store(timeout: float) -> Any:
    """A client of the key-value store the launcher (torchrun) serves at MASTER_ADDR:MASTER_PORT."""
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not addr or not port:
        raise RuntimeError(
            "run_isolated on several ranks needs the launcher's store: MASTER_ADDR and MASTER_PORT are "
            "unset (launch with torchrun or lightrft.testing.run_distributed)"
        )
    world = int(os.environ["WORLD_SIZE"])
    return dist.TCPStore(
        addr, int(port), world, is_master=False, timeout=timedelta(seconds=max(timeout, 60.0))
    )


def _abort_process_group() -> None:
    if not dist.is_initialized():
        return
    group = dist.group.WORLD
    with contextlib.suppress(Exception):
        if group is not None and hasattr(group, "abort"):
            group.abort()
    with contextlib.suppress(Exception):
        dist.destroy_process_group()
    time.sleep(0.1)
