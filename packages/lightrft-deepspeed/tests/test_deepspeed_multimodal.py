"""A vision-language policy on DeepSpeed ZeRO-3 (2 gloo ranks, one torchrun launch; lightrft-testing's
MultimodalRoundSuite): it trains on image+text batches as FakeStrategy does, update_engine_weights
gathers every weight (the vision tower's too) bucket by bucket, and the hf engine's generations
with images then equal a fresh engine's built from the saved trained weights."""

from __future__ import annotations

from lightrft.testing.multimodal import MultimodalRoundSuite


class TestDeepspeedZero3Multimodal(MultimodalRoundSuite):
    config = {
        "strategy": "deepspeed",
        "zero_stage": 3,
        "engine_type": "hf",
        "seed": 5,
        "bf16": False,
        "train_batch_size": 4,
        "micro_train_batch_size": 1,
    }
