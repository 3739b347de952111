"""run_distributed and call: how a rank-side function is found (by name through ``pythonpath``, or
from the file of a callable), results and failures of every rank."""

import os
import textwrap
from pathlib import Path

import pytest
import torch

from lightrft.testing import DistributedRunError, call, run_distributed

HERE = Path(__file__).resolve().parent


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


def test_results_of_every_rank_by_name_through_pythonpath():
    out = run_distributed("test_testing_run_distributed:_sum_ranks", 3, {"scale": 2.0}, pythonpath=HERE)
    assert [r["rank"] for r in out] == [0, 1, 2]
    assert all(torch.equal(r["sum"], torch.tensor([12.0])) and r["world"] == 3 for r in out)


def test_a_callable_is_loaded_from_its_file_without_pythonpath():
    # This test module is not importable by name in the ranks (no PYTHONPATH given): the worker
    # loads it from the file the callable was defined in.
    out = run_distributed(_sum_ranks, 2, {"scale": 1.0})
    assert [float(r["sum"]) for r in out] == [3.0, 3.0]


def test_without_pythonpath_a_name_outside_the_environment_fails_clearly():
    with pytest.raises(DistributedRunError, match="No module named 'test_testing_run_distributed'"):
        run_distributed("test_testing_run_distributed:_fail_on_rank_1", 2)


def test_failure_carries_the_traceback():
    with pytest.raises(DistributedRunError, match=r"(?s)rank 1.*ValueError: rank one is broken"):
        run_distributed(_fail_on_rank_1, 2)


def test_call_resolves_like_the_ranks(tmp_path):
    (tmp_path / "harness_probe_mod.py").write_text(
        textwrap.dedent(
            """
            def double(x):
                return 2 * x
            """
        )
    )
    assert call("harness_probe_mod:double", {"x": 21}, pythonpath=tmp_path) == 42
    assert run_distributed("harness_probe_mod:double", 2, {"x": 4}, pythonpath=[tmp_path]) == [8, 8]
    assert str(tmp_path) not in os.environ.get("PYTHONPATH", "")  # nothing leaked into this process


def test_function_must_be_importable():
    def local():
        return 1

    with pytest.raises(ValueError, match="module-level"):
        run_distributed(local, 2)
    with pytest.raises(ValueError, match="package.module:function"):
        run_distributed("no_colon", 2)
