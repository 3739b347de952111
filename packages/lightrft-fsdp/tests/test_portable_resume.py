"""Portable checkpoints move between backends and world sizes: every pair of writer and reader
among (fake, fsdp) x (1, 2 ranks; fake has 1) resumes with the writer's model, Adam moments and
step, scheduler, dataloader position and train state, and trains on to the writer's losses."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from lightrft.testing import run_distributed

ATOL = 1e-5


@pytest.fixture(scope="module")
def matrix(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = str(tmp_path_factory.mktemp("portable"))
    fns = "lightrft.testing.portable_resume:write_then_read"
    # Three launches: 1 rank writes (fake, fsdp); 2 ranks write fsdp and read all three; 1 rank reads fsdp-ws2.
    one = run_distributed(
        fns, 1, {"writers": ["fake", "fsdp"], "readers": [], "root": root, "read_names": []}
    )
    names = [w["name"] for w in one[0]["written"]]
    two = run_distributed(
        fns, 2, {"writers": ["fsdp"], "readers": ["fsdp"], "root": root, "read_names": names}
    )
    back = run_distributed(
        fns, 1, {"writers": [], "readers": ["fake", "fsdp"], "root": root, "read_names": [*names, "fsdp-ws2"]}
    )
    written = {w["name"]: w for w in [*one[0]["written"], *two[0]["written"]]}
    read = {r["reader"]: r["results"] for r in [*two[0]["read"], *back[0]["read"]]}
    return {"written": written, "read": read, "two_ranks": two}


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert sorted(a) == sorted(b)
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def test_every_pair_was_run(matrix: dict[str, Any]) -> None:
    assert sorted(matrix["written"]) == ["fake-ws1", "fsdp-ws1", "fsdp-ws2"]
    assert sorted(matrix["read"]) == ["fake-ws1", "fsdp-ws1", "fsdp-ws2"]
    for reader, results in matrix["read"].items():
        assert sorted(results) == ["fake-ws1", "fsdp-ws1", "fsdp-ws2"], reader


def test_resumed_losses_and_parameters_equal_the_uninterrupted_run(matrix: dict[str, Any]) -> None:
    for reader, results in matrix["read"].items():
        for writer, got in results.items():
            want = matrix["written"][writer]
            assert got["losses"] == pytest.approx(want["losses"], abs=ATOL), (writer, reader)
            assert _max_diff(got["params"], want["params"]) < ATOL, (writer, reader)


def test_adam_moments_step_scheduler_and_dataloader_are_restored(matrix: dict[str, Any]) -> None:
    for reader, results in matrix["read"].items():
        for writer, got in results.items():
            want = matrix["written"][writer]
            assert got["optimizer"]["steps"] == want["optimizer"]["steps"] == [2.0], (writer, reader)
            assert _max_diff(got["optimizer"]["moments"], want["optimizer"]["moments"]) < 1e-7, (
                writer,
                reader,
            )
            assert got["lr"] == pytest.approx(want["lr"]), (writer, reader)
            assert got["loader"] == want["loader"] and want["loader"]["consumed_samples"] > 0, (
                writer,
                reader,
            )
            assert got["global_step"] == 2, (writer, reader)


def test_both_ranks_agree(matrix: dict[str, Any]) -> None:
    r0, r1 = (r["read"][0]["results"] for r in matrix["two_ranks"])
    for writer in r0:
        assert r0[writer]["losses"] == r1[writer]["losses"]
