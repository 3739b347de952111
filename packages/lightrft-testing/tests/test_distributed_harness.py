import os

import pytest
import torch

from lightrft.testing import DistributedRunError, run_distributed

HERE = os.path.dirname(__file__)


def _sum_ranks(scale: float) -> dict:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    t = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(t)
    return {"rank": dist.get_rank(), "sum": t * scale, "world": int(os.environ["WORLD_SIZE"])}


def _fail_on_rank_1() -> int:
    if int(os.environ["RANK"]) == 1:
        raise ValueError("rank one is broken")
    return 0


def test_results_of_every_rank():
    out = run_distributed("test_distributed_harness:_sum_ranks", 3, {"scale": 2.0}, env={"PYTHONPATH": HERE})
    assert [r["rank"] for r in out] == [0, 1, 2]
    assert all(torch.equal(r["sum"], torch.tensor([12.0])) and r["world"] == 3 for r in out)


def test_failure_carries_the_traceback():
    with pytest.raises(DistributedRunError, match=r"(?s)rank 1.*ValueError: rank one is broken"):
        run_distributed("test_distributed_harness:_fail_on_rank_1", 2, env={"PYTHONPATH": HERE})


def test_function_must_be_importable():
    def local():
        return 1

    with pytest.raises(ValueError, match="module-level"):
        run_distributed(local, 2)
    with pytest.raises(ValueError, match="package.module:function"):
        run_distributed("no_colon", 2)
