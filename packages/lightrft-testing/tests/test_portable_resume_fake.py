"""``resume_problems`` on a real one-process matrix (Fake writes and reads), and on copies of it
with one thing broken each: every kind of damage is reported, naming the pair."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch

from lightrft.testing.portable_resume import read, resume_problems, write


@pytest.fixture(scope="module")
def matrix(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = str(tmp_path_factory.mktemp("portable"))
    w = write("fake", root)
    r = read("fake", root, [w["name"]])
    key = "fake-ws1 <- fake-ws1"
    return {
        "written": {w["name"]: w},
        "read": {key: r["results"][w["name"]]},
        "rank_losses": {key: [r["results"][w["name"]]["losses"]]},
        "expected": [key],
    }


def test_a_faithful_resume_has_no_problems(matrix: dict[str, Any]) -> None:
    assert resume_problems(matrix) == []
    assert Path(matrix["written"]["fake-ws1"]["name"]).name == "fake-ws1"


def _broken(matrix: dict[str, Any], what: str) -> dict[str, Any]:
    m = copy.deepcopy(matrix)
    got = m["read"]["fake-ws1 <- fake-ws1"]
    if what == "losses":
        got["losses"][1] += 1e-3
    elif what == "params":
        next(iter(got["params"].values())).view(-1)[0] += 1e-3
    elif what == "loaded":
        next(iter(got["loaded_params"].values())).view(-1)[0] += 1e-6
    elif what == "moments":
        next(iter(got["optimizer"]["moments"].values())).view(-1)[0] += 1e-6
    elif what == "steps":
        got["optimizer"]["steps"] = [0.0]
    elif what == "lr":
        got["lr"] = [x * 2 for x in got["lr"]]
    elif what == "loader":
        got["loader"] = {**got["loader"], "consumed_samples": 0}
    elif what == "global_step":
        got["global_step"] = 0
    elif what == "ranks":
        m["rank_losses"]["fake-ws1 <- fake-ws1"].append([0.0, 0.0])
    elif what == "missing":
        m["expected"].append("fsdp-ws2 <- fake-ws1")
    return m


@pytest.mark.parametrize(
    ("what", "words"),
    [
        ("losses", "resumed losses"),
        ("params", "final parameters differ"),
        ("loaded", "loaded parameters differ from the saved ones"),
        ("moments", "Adam moments differ"),
        ("steps", "Adam steps"),
        ("lr", "learning rates"),
        ("loader", "dataloader state"),
        ("global_step", "global_step 0"),
        ("ranks", "ranks got different losses"),
        ("missing", "pairs not run: ['fsdp-ws2 <- fake-ws1']"),
    ],
)
def test_each_kind_of_damage_is_reported(matrix: dict[str, Any], what: str, words: str) -> None:
    problems = resume_problems(_broken(matrix, what))
    assert len(problems) == 1 and words in problems[0], problems
    assert what == "missing" or problems[0].startswith("fake-ws1 <- fake-ws1: ")


def test_moments_are_compared_as_numbers(matrix: dict[str, Any]) -> None:
    moments = matrix["read"]["fake-ws1 <- fake-ws1"]["optimizer"]["moments"]
    assert moments and all(torch.is_tensor(v) and v.abs().sum() > 0 for v in moments.values())
