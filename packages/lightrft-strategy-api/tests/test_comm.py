"""Collectives on 2 gloo ranks under torchrun (and identity without a process group)."""

import torch

from lightrft.strategy import comm
from lightrft.testing import run_distributed


def _collectives() -> dict:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    r = dist.get_rank()
    return {
        "mean_int": comm.all_reduce(torch.tensor([r + 1, 3]), "mean"),
        "max": comm.all_reduce(float(r), "max"),
        "min": comm.all_reduce(torch.tensor(float(r)), "min"),
        "gather_ragged": comm.all_gather(torch.arange(r + 2)),
        "objects": comm.all_gather_object({"rank": r}),
        "bcast": comm.broadcast_object(f"from {r}", src=1),
    }


def test_two_ranks():
    ranks = run_distributed(
        "test_comm:_collectives", world_size=2, env={"PYTHONPATH": __file__.rsplit("/", 1)[0]}
    )
    for res in ranks:
        assert torch.equal(res["mean_int"], torch.tensor([1.5, 3.0], dtype=torch.float64))
        assert res["max"] == 1.0 and float(res["min"]) == 0.0
        assert torch.equal(res["gather_ragged"], torch.tensor([0, 1, 0, 1, 2]))
        assert res["objects"] == [{"rank": 0}, {"rank": 1}]
        assert res["bcast"] == "from 1"


def test_identity_without_process_group():
    t = torch.tensor([1.0, 2.0])
    assert torch.equal(comm.all_reduce(t, "sum"), t)
    assert comm.all_reduce(3, "mean") == 3.0
    assert torch.equal(comm.all_gather(torch.tensor(5.0)), torch.tensor([5.0]))
    assert comm.all_gather("x") == ["x"]
