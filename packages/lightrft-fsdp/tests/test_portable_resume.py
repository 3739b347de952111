"""Portable checkpoints move between backends and world sizes: every pair of writer and reader
among (fake, fsdp) x (1, 2 ranks; fake has 1) resumes with the writer's model, Adam moments and
step, scheduler, dataloader position and train state, and trains on to the writer's losses
(``lightrft.testing.portable_resume.resume_problems``). Three torchrun launches. The pairs with
DeepSpeed are in lightrft-deepspeed's test of the same name."""

from __future__ import annotations

from typing import Any

import pytest

from lightrft.testing.portable_resume import resume_problems, run_matrix

NAMES = ["fake-ws1", "fsdp-ws1", "fsdp-ws2"]


@pytest.fixture(scope="module")
def matrix(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = str(tmp_path_factory.mktemp("portable"))
    # 1 rank writes fake and fsdp; 2 ranks write fsdp and read all three; 1 rank reads all three.
    launches = [
        (1, ["fake", "fsdp"], {}),
        (2, ["fsdp"], {"fsdp": NAMES}),
        (1, [], {"fake": NAMES, "fsdp": NAMES}),
    ]
    return run_matrix(root, launches)


def test_every_pair_was_run(matrix: dict[str, Any]) -> None:
    readers = ["fake-ws1", "fsdp-ws1", "fsdp-ws2"]
    assert sorted(matrix["read"]) == sorted(f"{r} <- {w}" for r in readers for w in NAMES)


def test_every_resume_continues_the_uninterrupted_run(matrix: dict[str, Any]) -> None:
    assert resume_problems(matrix) == []
