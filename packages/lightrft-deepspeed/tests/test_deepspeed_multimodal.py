"""A vision-language policy on DeepSpeed ZeRO-3 (2 gloo ranks, one torchrun launch): it trains on
image+text batches as FakeStrategy does, update_engine_weights gathers every weight (the vision
tower's too) bucket by bucket, and the hf engine's generations with images then equal a fresh
engine's built from the saved trained weights (lightrft.testing.multimodal)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("transformers")
pytest.importorskip("PIL")
pytest.importorskip("lightrft.engines.hf")

from lightrft.testing import rank_threads, run_distributed  # noqa: E402
from lightrft.testing.multimodal import check_round, train_push_generate  # noqa: E402

CONFIG: dict[str, Any] = {
    "strategy": "deepspeed",
    "zero_stage": 3,
    "engine_type": "hf",
    "seed": 5,
    "bf16": False,
    "train_batch_size": 4,
    "micro_train_batch_size": 1,
}


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("zero3-mm")
    return run_distributed(
        "lightrft.testing.multimodal:train_push_generate", 2, {"config": CONFIG, "tmp": str(tmp)}, timeout=600
    )


def test_two_ranks_train_like_fake_and_pushed_generations_equal_a_fresh_engine(
    results: list[dict[str, Any]], tmp_path: Path
) -> None:
    # The reference with the ranks' thread count (rank_threads): its first-step losses and the
    # ranks' are the same arithmetic (check_round compares them exactly).
    with rank_threads():
        fake = train_push_generate({**CONFIG, "strategy": "fake"}, str(tmp_path))
    check_round(results, fake)
