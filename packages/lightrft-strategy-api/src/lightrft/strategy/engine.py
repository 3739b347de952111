"""The inference-engine protocol and the weight buckets that strategies hand to engines."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

#: One bucket of weight sync: full (unsharded) tensors with the training model's clean names.
WeightBucket = list[tuple[str, torch.Tensor]]


@dataclass
class SamplingParams:
    """Engine-neutral sampling parameters; each engine translates them to its own type."""

    max_new_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    n: int = 1
    stop_token_ids: list[int] = field(default_factory=list)
    seed: int | None = None
    logprobs: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    """Engine-specific keys passed through unchanged."""

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class GenerationOutput:
    """One completion of one prompt."""

    prompt_token_ids: list[int]
    output_token_ids: list[int]
    text: str | None = None
    logprobs: list[float] | None = None
    finish_reason: str | None = None


@runtime_checkable
class InferenceEngine(Protocol):
    """What a rollout engine offers a strategy. Implementations live in lightrft-engines."""

    def generate(
        self,
        prompts: Sequence[str] | None = None,
        prompt_token_ids: Sequence[Sequence[int]] | None = None,
        sampling_params: SamplingParams | None = None,
        multi_modal_inputs: Sequence[Any] | None = None,
    ) -> list[GenerationOutput]: ...

    def update_weights(self, buckets: Iterable[WeightBucket]) -> None: ...

    def sleep(self, level: int = 1) -> None: ...

    def wake_up(self, tags: Sequence[str] | None = None) -> None: ...

    def shutdown(self) -> None: ...
