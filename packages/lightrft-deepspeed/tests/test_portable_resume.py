"""Portable checkpoints between DeepSpeed ZeRO-1/2/3, FSDP and Fake, and between world sizes: a
reader resumes a writer's checkpoint with its model, Adam moments and step, scheduler, dataloader
position and train state, and trains on to the losses of the writer's uninterrupted run
(``lightrft.testing.portable_resume.resume_problems`` says what is wrong, if anything).

By default (CI, 2 CPU cores) a covering subset runs in three torchrun launches: every backend
saves and every backend loads, DeepSpeed ZeRO-1, 2 and 3 each load on 1 and on 2 ranks, and every
world-size change (1 -> 1, 1 -> 2, 2 -> 2, 2 -> 1) is crossed. With ``LIGHTRFT_PORTABLE_FULL_MATRIX=1``
the full matrix runs instead: every writer of (fake, fsdp, ds1, ds2, ds3) x (1, 2 ranks; fake on
1) resumed by every reader of the same set (81 pairs; 346 s on 2 shared CPU cores, run before each
release or change to a checkpoint path)."""

from __future__ import annotations

import os
from typing import Any

import pytest

from lightrft.testing.portable_resume import Launch, resume_problems, run_matrix

FULL = os.environ.get("LIGHTRFT_PORTABLE_FULL_MATRIX") == "1"
ALL_WS1 = ["fake", "fsdp", "ds1", "ds2", "ds3"]
ALL_WS2 = ["fsdp", "ds1", "ds2", "ds3"]
NAMES = [f"{b}-ws1" for b in ALL_WS1] + [f"{b}-ws2" for b in ALL_WS2]

SUBSET: list[Launch] = [
    # 1 rank writes fake, ZeRO-1 and ZeRO-3; 1 -> 1: ZeRO-2 reads ZeRO-1, Fake reads ZeRO-3.
    (1, ["fake", "ds1", "ds3"], {"ds2": ["ds1-ws1"], "fake": ["ds3-ws1"]}),
    # 2 ranks write ZeRO-2 and FSDP; 1 -> 2 and 2 -> 2.
    (
        2,
        ["ds2", "fsdp"],
        {"ds3": ["fake-ws1"], "ds1": ["ds3-ws1"], "fsdp": ["ds2-ws2"], "ds2": ["fsdp-ws2"]},
    ),
    # 2 -> 1.
    (1, [], {"fake": ["ds2-ws2"], "ds3": ["fsdp-ws2"], "ds1": ["ds2-ws2"]}),
]
FULL_MATRIX: list[Launch] = [
    (1, ALL_WS1, {}),
    (2, ALL_WS2, {b: NAMES for b in ALL_WS2}),
    (1, [], {b: NAMES for b in ALL_WS1}),
]


@pytest.fixture(scope="module")
def matrix(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return run_matrix(str(tmp_path_factory.mktemp("portable")), FULL_MATRIX if FULL else SUBSET)


def test_the_pairs_cover_every_backend_and_world_size_change(matrix: dict[str, Any]) -> None:
    pairs = [k.split(" <- ") for k in matrix["read"]]
    assert sorted(matrix["read"]) == sorted(matrix["expected"])
    backends = {"fake", "fsdp", "ds1", "ds2", "ds3"}
    assert {w.rsplit("-", 1)[0] for _, w in pairs} == backends  # every backend saved ...
    assert {r.rsplit("-", 1)[0] for r, _ in pairs} == backends  # ... and loaded
    changes = {(w.rsplit("-ws", 1)[1], r.rsplit("-ws", 1)[1]) for r, w in pairs}
    assert changes == {("1", "1"), ("1", "2"), ("2", "2"), ("2", "1")}
    for stage in ("ds1", "ds2", "ds3"):  # each ZeRO stage loads on 1 and on 2 ranks
        assert {f"{stage}-ws1", f"{stage}-ws2"} <= {r for r, _ in pairs}
    if FULL:
        assert len(pairs) == len(NAMES) ** 2


def test_every_resume_continues_the_uninterrupted_run(matrix: dict[str, Any]) -> None:
    assert resume_problems(matrix) == []
