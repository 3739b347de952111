"""A vision-language policy on FSDP2 (2 gloo ranks, one torchrun launch; lightrft-testing's
MultimodalRoundSuite): the vision tower's and the decoder's layers are FSDP units, it trains on
image+text batches as FakeStrategy does, and after update_engine_weights the hf engine's
generations with images equal a fresh engine's built from the saved trained weights."""

from __future__ import annotations

from typing import Any

from lightrft.testing.multimodal import MultimodalRoundSuite


class TestFSDPMultimodal(MultimodalRoundSuite):
    config = {
        "strategy": "fsdp",
        "engine_type": "hf",
        "seed": 5,
        "bf16": False,
        "train_batch_size": 4,
        "micro_train_batch_size": 1,
    }

    def test_vision_tower_and_decoder_layers_are_fsdp_units(self, results: list[dict[str, Any]]) -> None:
        for r in results:
            assert {"FSDPSiglipEncoderLayer", "FSDPGemma3DecoderLayer"} <= set(r["units"]), r["units"]
