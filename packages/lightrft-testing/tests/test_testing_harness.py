"""lightrft.testing.harness: the check runner keeps ranks in step after failures and never hangs;
reduction counting, shared temp dirs and the training loop."""

from __future__ import annotations

import os
import time
from typing import Any

import torch

from lightrft.strategy import get_fake_strategy
from lightrft.testing import make_batches, make_tiny_model, run_distributed
from lightrft.testing.harness import (
    REDUCTION_COLLECTIVES,
    build,
    count_reductions,
    flat,
    full_params,
    max_diff,
    rank_share,
    run_isolated,
    train,
)


class _Strategy:
    """Just enough of a strategy for shared_tmpdir on real ranks."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self.dist = dist

    def is_rank_0(self) -> bool:
        return self.dist.get_rank() == 0

    def broadcast_object(self, obj: Any) -> Any:
        box = [obj]
        self.dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        self.dist.barrier()


def _ranks_in_step() -> dict[str, Any]:
    """Five checks on 2 ranks: a failure after the collectives, then one before a collective that
    rank 0 waits in (only an abort frees it)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from lightrft.testing.harness import shared_tmpdir

    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (2,))  # holds references to the group, as a strategy's mesh does
    rank = dist.get_rank()

    def reduce() -> float:
        t = torch.tensor([float(rank + 1)])
        dist.all_reduce(t, group=mesh.get_group())
        return float(t)

    def fails_after_collectives() -> float:
        total = reduce()
        if rank == 1:
            raise ValueError("rank 1 fails after the collectives")
        return total

    def fails_before_a_collective() -> float:
        if rank == 1:
            raise ValueError("rank 1 fails before the all_reduce")
        return reduce()

    def tmpdir_and_counts() -> dict[str, Any]:
        with shared_tmpdir(_Strategy(), "probe") as d:
            (d / f"rank{rank}").write_text("x")
            dist.barrier()
            seen = sorted(p.name for p in d.iterdir())
            with count_reductions() as counter:
                reduce()
                reduce()
                dist.all_gather_object([None, None], rank)  # not a reduction
        dist.barrier()  # rank 0 removed it on leaving the block
        return {
            "seen": seen,
            "exists_after": d.exists(),
            "n": counter.n,
            "by_name": counter.by_name,
        }

    start = time.monotonic()
    out = run_isolated(
        [
            ("first", reduce),
            ("tmpdir_and_counts", tmpdir_and_counts),
            ("fails_after", fails_after_collectives),
            ("in_step", reduce),
            ("fails_before", fails_before_a_collective),
            ("after_abort", reduce),
        ],
        sync_timeout=10.0,
    )
    return {"results": out, "seconds": time.monotonic() - start, "rank": rank}


def test_failures_keep_ranks_in_step_and_a_stuck_rank_is_freed() -> None:
    r0, r1 = (r["results"] for r in run_distributed(_ranks_in_step, 2, timeout=300))
    for r in (r0, r1):
        assert r["first"] == {"ok": True, "result": 3.0}
        t = r["tmpdir_and_counts"]["result"]
        assert t["seen"] == ["rank0", "rank1"] and t["exists_after"] is False
        assert t["n"] == 2 and t["by_name"] == {"all_reduce": 2}
        # After a failure on rank 1 only, both ranks still run the next check together.
        assert r["fails_after"]["peers_failed"] == [1]
        assert r["in_step"] == {"ok": True, "result": 3.0}
        # Nothing runs after the group had to be aborted, and every rank says so.
        assert r["after_abort"]["ok"] is False and "aborted after 'fails_before'" in r["after_abort"]["error"]
    assert r0["fails_after"]["ok"] is True and r1["fails_after"]["ok"] is False
    assert "rank 1 fails after the collectives" in r1["fails_after"]["error"]
    assert "rank 1 fails before the all_reduce" in r1["fails_before"]["error"]
    assert r0["fails_before"]["ok"] is False  # freed from its all_reduce by the abort, not hung


def test_the_reduction_list_covers_every_name_torch_has() -> None:
    import torch.distributed as dist

    names = set(REDUCTION_COLLECTIVES)
    assert {"all_reduce", "reduce_scatter_tensor", "reduce", "reduce_scatter"} <= names
    assert all(hasattr(dist, n) for n in ("all_reduce", "reduce", "reduce_scatter", "reduce_scatter_tensor"))


def test_train_splits_global_batches_and_matches_a_manual_loop() -> None:
    cfg = {"train_batch_size": 4, "micro_train_batch_size": 2, "bf16": False, "max_norm": 0.5, "seed": 1}
    strategy = get_fake_strategy(cfg)
    model, optim, sched = build(strategy, make_tiny_model(3))
    batches = make_batches(4, 2, 4)
    assert [mb.shape[0] for mb in rank_share(strategy, batches[0])] == [2, 2]
    run = train(strategy, model, optim, sched, batches)
    assert run["returned"][0] is None and run["returned"][2] is None  # None between boundaries
    assert run["norms"] == [run["returned"][1], run["returned"][3]] and run["norms"][0] > 0.5

    manual = get_fake_strategy(cfg)
    m2, o2, s2 = build(manual, make_tiny_model(3))
    from lightrft.testing import causal_lm_loss

    losses = []
    for gb in batches:
        step = []
        for mb in (gb[:2], gb[2:]):
            loss = causal_lm_loss(m2, mb)
            manual.backward(loss, m2, o2)
            manual.optimizer_step(o2, m2, s2)
            step.append(loss.detach())
        losses.append(float(torch.stack(step).mean()))
    assert run["losses"] == losses
    assert max_diff(full_params(strategy, model), full_params(manual, m2)) == 0.0
    assert flat(full_params(strategy, model)).numel() == sum(p.numel() for p in model.parameters())


def test_run_isolated_in_one_process_isolates_each_check() -> None:
    assert "WORLD_SIZE" not in os.environ or os.environ["WORLD_SIZE"] == "1"
    out = run_isolated({"boom": lambda: 1 / 0, "fine": lambda: {"x": torch.ones(2)}})
    assert out["boom"]["ok"] is False and "ZeroDivisionError" in out["boom"]["error"]
    assert out["fine"]["ok"] is True and torch.equal(out["fine"]["result"]["x"], torch.ones(2))
