"""A vision-language policy on FSDP2 (2 gloo ranks, one torchrun launch): the vision tower's and
the decoder's layers are FSDP units, it trains on image+text batches as FakeStrategy does, and
after update_engine_weights the hf engine's generations with images equal a fresh engine's built
from the saved trained weights (lightrft.testing.multimodal)."""

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
    "strategy": "fsdp",
    "engine_type": "hf",
    "seed": 5,
    "bf16": False,
    "train_batch_size": 4,
    "micro_train_batch_size": 1,
}


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("fsdp-mm")
    return run_distributed(
        "lightrft.testing.multimodal:train_push_generate", 2, {"config": CONFIG, "tmp": str(tmp)}, timeout=600
    )


def test_vision_tower_and_decoder_layers_are_fsdp_units(results: list[dict[str, Any]]) -> None:
    for r in results:
        assert {"FSDPSiglipEncoderLayer", "FSDPGemma3DecoderLayer"} <= set(r["units"]), r["units"]


def test_two_ranks_train_like_fake_and_pushed_generations_equal_a_fresh_engine(
    results: list[dict[str, Any]], tmp_path: Path
) -> None:
    # The reference with the ranks' thread count (rank_threads): its first-step losses and the
    # ranks' are the same arithmetic (check_round compares them exactly).
    with rank_threads():
        fake = train_push_generate({**CONFIG, "strategy": "fake"}, str(tmp_path))
    check_round(results, fake)
