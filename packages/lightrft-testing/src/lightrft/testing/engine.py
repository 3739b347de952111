"""FakeEngine: an InferenceEngine that generates greedily with a local copy of a small model.

Its weights start as zeros and change only through ``update_weights``, so a test can tell whether
the trained weights really reached the engine.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from lightrft.strategy.engine import GenerationOutput, SamplingParams, WeightBucket
from lightrft.strategy.weights import copy_bucket_into, tensor_nbytes

from .models import logits_of


class FakeEngine:
    """Deterministic generation from the current weights of a small torch model (CPU)."""

    __test__ = False

    def __init__(
        self,
        strategy: Any = None,
        model: nn.Module | None = None,
        tokenizer: Any = None,
        zero_init: bool = True,
        allow_no_model: bool = False,
        **_: Any,
    ) -> None:
        if model is None and not allow_no_model:
            raise ValueError("FakeEngine needs model=: an unsharded module of the trained architecture")
        #: None for a model-less engine (FakeStrategy.setup_inference_engine(args) without a model):
        #: it sleeps, wakes and takes pushes (counted), but cannot generate.
        self.model = None if model is None else copy.deepcopy(model).cpu().eval().requires_grad_(False)
        if zero_init and self.model is not None:
            for p in self.model.parameters():
                p.zero_()
        self.tokenizer = tokenizer
        self.sleeping_level = 0
        self.weights_valid = True
        self.updates = 0
        self.buckets_received = 0
        self.max_bucket_bytes = 0
        self.names_received: set[str] = set()
        self.closed = False
        #: One private copy per rank: no tensor-parallel group.
        self.tp_group: Any = None
        self.prefix_cache_resets = 0

    @property
    def is_sleeping(self) -> bool:
        return self.sleeping_level > 0

    @property
    def needs_weight_push(self) -> bool:
        """True after ``sleep(2)`` until ``update_weights`` ran."""
        return not self.weights_valid

    def reset_prefix_cache(self) -> None:
        """Counts calls (FakeEngine has no cache): tests check the lifecycle resets after a push."""
        self.prefix_cache_resets += 1

    # ------------------------------------------------------------- weights
    @torch.no_grad()
    def update_weights(self, buckets: Iterable[WeightBucket]) -> None:
        self._check_open()
        params = dict(self.model.named_parameters()) if self.model is not None else None
        for bucket in buckets:
            self.buckets_received += 1
            self.max_bucket_bytes = max(self.max_bucket_bytes, sum(tensor_nbytes(t) for _, t in bucket))
            if params is None:
                self.names_received.update(name for name, _ in bucket)
            else:
                self.names_received.update(copy_bucket_into(params, bucket))
        self.updates += 1
        self.weights_valid = True

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.model is None:
            return {}
        return {k: v.clone() for k, v in self.model.state_dict().items()}

    # ------------------------------------------------------------ generate
    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[str] | None = None,
        prompt_token_ids: Sequence[Sequence[int]] | None = None,
        sampling_params: SamplingParams | None = None,
        multi_modal_inputs: Sequence[Any] | None = None,
    ) -> list[GenerationOutput]:
        self._check_open()
        if self.sleeping_level:
            raise RuntimeError(
                "FakeEngine is asleep: call wake_up() (strategy.wakeup_inference_engine()) first"
            )
        if not self.weights_valid:
            raise RuntimeError(
                "FakeEngine's weights were discarded by sleep(level=2): update_weights() first"
            )
        if self.model is None:
            if not prompt_token_ids and not prompts:
                return []  # nothing asked: LightRFT's trainer tests call engine_generate_local(None)
            raise RuntimeError(
                "FakeEngine was set up without a model (setup_inference_engine(args) with no model=, "
                "actor= or args.pretrain): it sleeps, wakes and takes weight pushes, but cannot "
                "generate; pass model= (or actor=) to setup_inference_engine to generate"
            )
        sp = sampling_params or SamplingParams(temperature=0.0)
        if prompt_token_ids is None:
            if prompts is None or self.tokenizer is None:
                raise ValueError("generate() needs prompt_token_ids, or prompts with a tokenizer")
            prompt_token_ids = [self.tokenizer.encode(p) for p in prompts]
        gen = torch.Generator().manual_seed(sp.seed if sp.seed is not None else 0)
        outputs = []
        for ids in prompt_token_ids:
            for _ in range(sp.n):
                outputs.append(self._generate_one(list(ids), sp, gen))
        return outputs

    def _generate_one(self, ids: list[int], sp: SamplingParams, gen: torch.Generator) -> GenerationOutput:
        prompt = list(ids)
        out: list[int] = []
        logprobs: list[float] = []
        finish = "length"
        for _ in range(sp.max_new_tokens):
            logits = logits_of(self.model(torch.tensor([prompt + out])))[0, -1].float()
            if sp.greedy:
                token = int(torch.argmax(logits))
            else:
                probs = torch.softmax(logits / sp.temperature, -1)
                token = int(torch.multinomial(probs, 1, generator=gen))
            logprobs.append(float(torch.log_softmax(logits, -1)[token]))
            out.append(token)
            if token in sp.stop_token_ids:
                finish = "stop"
                break
        text = self.tokenizer.decode(out) if self.tokenizer is not None else None
        return GenerationOutput(prompt, out, text, logprobs if sp.logprobs else None, finish)

    # --------------------------------------------------------- sleep / wake
    def sleep(self, level: int = 1) -> None:
        """Level 1 keeps the weights (a host copy); level 2 discards them (push before generating)."""
        if level not in (1, 2):
            raise ValueError(f"sleep level={level} is invalid: valid are 1 and 2")
        self._check_open()
        self.sleeping_level = level
        if level == 2 and self.model is not None:  # a model-less engine has no weights to lose
            self.weights_valid = False

    def wake_up(self, tags: Sequence[str] | None = None) -> None:
        self._check_open()
        self.sleeping_level = 0

    def shutdown(self) -> None:
        self.closed = True

    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError("FakeEngine was shut down")
