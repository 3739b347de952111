"""HFEngine: rollouts with Hugging Face ``generate`` on a private, unsharded copy of the policy.

The embedded default engine: it runs wherever transformers runs (CPU or GPU), needs no server, and
receives trained weights through the same buckets as vLLM and SGLang. ``sleep(1)`` moves the copy
to CPU (a host copy: wake alone restores it), ``sleep(2)`` frees it (no copy anywhere: the next
``update_weights`` rebuilds it), ``wake_up`` returns it to the device.

Engine settings follow the rules every engine shares (``StrategyConfig``): ``engine_dtype``
(``engine_dtype_name``), the maximum prompt + completion length (``engine_max_len``: prompts that
leave no room are refused, generation stops there) and the per-group sampling seed
(``engine_seed``: mixed into requests without a seed, with one draw of the global RNG so a resumed
run samples alike). ``sleep(2)`` keeps the model's buffers (rotary tables, a few KiB) on the host:
they are not weights, so no push would restore them.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from lightrft.strategy.engine import GenerationOutput, SamplingParams, WeightBucket
from lightrft.strategy.weights import copy_bucket_into

from ._common import (
    base_hf_model,
    check_images,
    check_prompt_lengths,
    engine_max_len,
    find_processor,
    image_lists,
    image_placeholder,
    is_multimodal,
    is_sharded,
    require_model,
    text_tokenizer,
)


class HFEngine:
    """An InferenceEngine over ``transformers`` ``generate`` (greedy or sampled)."""

    #: update_weights copies each bucket into the model before asking for the next.
    consumes_buckets_at_once = True

    def __init__(
        self,
        strategy: Any = None,
        model: nn.Module | None = None,
        tokenizer: Any = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        model_path: str | None = None,
        processor: Any = None,
        **_: Any,
    ) -> None:
        try:
            import transformers  # noqa: F401
        except ImportError as e:
            raise ImportError(
                "HFEngine (engine_type='hf') needs transformers: `uv add 'lightrft-engines[hf]'`"
            ) from e
        if model is None and model_path is not None:
            from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

            config = AutoConfig.from_pretrained(model_path)
            auto = AutoModelForImageTextToText if hasattr(config, "vision_config") else AutoModelForCausalLM
            model = auto.from_pretrained(model_path)
        require_model("HFEngine", model, model_path)
        if not hasattr(model, "generate"):
            raise ValueError(
                "HFEngine needs model=: a Hugging Face model with .generate() (e.g. the policy "
                "before strategy.prepare); got " + type(model).__name__
            )
        self.device = (
            torch.device(device)
            if device is not None
            else (strategy.device if strategy else torch.device("cpu"))
        )
        cfg = getattr(strategy, "config", None)
        if dtype is None and cfg is not None:
            dtype = getattr(torch, cfg.engine_dtype_name())
        self.dtype = dtype
        #: Longest prompt + completion (None: no limit known).
        self.max_model_len: int | None = engine_max_len(cfg, model) if cfg is not None else None
        #: Seed of the sampling stream used when a request gives none (per engine group).
        rank = strategy.get_rank() if strategy is not None else 0
        self.seed = cfg.engine_seed(rank) if cfg is not None else 0
        sharded = is_sharded(model)
        if sharded:
            # A prepared (FSDP2 / ZeRO-3) actor: build the same architecture from its config; the
            # weights arrive with the first update_weights (needs_weight_push until then).
            # FSDP2 swaps the class for a generated FSDP<Class>: build the user's class.
            cls = next(c for c in type(model).__mro__ if not c.__name__.startswith("FSDP"))
            with torch.device("meta"):
                self.model = cls(model.config).eval().requires_grad_(False)
            self.model.to_empty(device="cpu")
            # Buffers (rotary inv_freq, ...) are not sharded: the actor's are the model's own.
            _copy_buffers(self.model, model)
        else:
            self.model = copy.deepcopy(model).eval().requires_grad_(False)
        if self.dtype is not None:
            self.model.to(self.dtype)
        #: The strategy sends the pushed weights in this dtype (None: as they are).
        self.weight_dtype: torch.dtype | None = self.dtype
        self.model.to(self.device)
        #: The processor (image processor + tokenizer) of a vision-language model: ``processor=``,
        #: or ``tokenizer=`` when it is one.
        self.processor = find_processor(tokenizer, processor)
        self.tokenizer = text_tokenizer(tokenizer if tokenizer is not None else self.processor)
        self.multimodal = is_multimodal(self.model)
        self.sleeping_level = 0
        self._params: dict[str, torch.Tensor] = dict(self.model.named_parameters())
        self._discarded = sharded
        self._saved_buffers: dict[str, torch.Tensor] = {}
        self.closed = False
        #: HFEngine runs one private copy per rank: no tensor-parallel group.
        self.tp_group: Any = None

    @property
    def is_sleeping(self) -> bool:
        """Whether the copy is offloaded (level 1) or freed (level 2)."""
        return self.sleeping_level > 0

    @property
    def needs_weight_push(self) -> bool:
        """True after ``sleep(2)`` (or when built from a sharded actor) until ``update_weights``."""
        return self._discarded

    @torch.no_grad()
    def update_weights(self, buckets: Iterable[WeightBucket]) -> None:
        if self._discarded:
            self.model.to_empty(device=self.device)
            if self._saved_buffers:  # level 2 kept the (small) buffers: to_empty left garbage there
                _copy_buffers(self.model, self._saved_buffers)
            self._params = dict(self.model.named_parameters())
        for bucket in buckets:
            copy_bucket_into(self._params, bucket)
        self._discarded = False

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[str] | None = None,
        prompt_token_ids: Sequence[Sequence[int]] | None = None,
        sampling_params: SamplingParams | None = None,
        multi_modal_inputs: Sequence[Any] | None = None,
    ) -> list[GenerationOutput]:
        if self.closed:
            raise RuntimeError(
                "HFEngine was shut down: set up a new engine (strategy.setup_inference_engine)"
            )
        if self.sleeping_level:
            raise RuntimeError(
                "HFEngine is asleep: call wake_up() (strategy.wakeup_inference_engine()) first"
            )
        if self._discarded:
            raise RuntimeError("HFEngine's weights were freed by sleep(level=2): update_weights() first")
        sp = sampling_params or SamplingParams(temperature=0.0)
        n = len(prompts) if prompts is not None else len(prompt_token_ids or [])
        images = image_lists(multi_modal_inputs, n)
        check_images(
            images,
            prompts,
            multimodal=self.multimodal,
            placeholder=image_placeholder(self.processor),
            model_name=type(base_hf_model(self.model)).__name__,
        )
        if images is not None and self.processor is None:
            raise ValueError(
                "HFEngine got images but no processor: pass processor= (or the processor as "
                "tokenizer=) to strategy.setup_inference_engine"
            )
        # Per prompt: the model's inputs (the processor's, with pixel values, for a prompt with
        # images; the token ids otherwise).
        inputs: list[dict[str, torch.Tensor]] = []
        if images is not None:
            assert prompts is not None
            for text, imgs in zip(prompts, images):
                if imgs:
                    batch = self.processor(text=[text], images=[imgs], return_tensors="pt")
                    inputs.append(self._to_device(batch))
                else:
                    inputs.append(self._ids_input(self.tokenizer.encode(text)))
        else:
            if prompt_token_ids is None:
                if prompts is None or self.tokenizer is None:
                    raise ValueError("generate() needs prompt_token_ids, or prompts with a tokenizer")
                prompt_token_ids = [self.tokenizer.encode(p) for p in prompts]
            inputs = [self._ids_input(list(ids)) for ids in prompt_token_ids]
        if prompt_token_ids is not None:  # text-only: the engines' one length rule
            check_prompt_lengths(prompt_token_ids, self.max_model_len, sp.max_new_tokens)
        for i, x in enumerate(inputs):
            length = x["input_ids"].shape[1]
            if self.max_model_len is not None and length >= self.max_model_len:
                with_images = f" with its {len(images[i])} image(s)" if images and images[i] else ""
                raise ValueError(
                    f"prompt {i}{with_images} takes {length} tokens, which does not fit max_model_len="
                    f"{self.max_model_len} (StrategyConfig.engine_max_model_len) with room to generate; "
                    "shorten it (fewer or smaller images) or raise engine_max_model_len"
                )
        gen_kwargs: dict[str, Any] = {
            "max_new_tokens": sp.max_new_tokens,
            "do_sample": not sp.greedy,
            "num_return_sequences": sp.n,
            "output_scores": sp.logprobs,
            "return_dict_in_generate": True,
            **sp.extra,
        }
        if not sp.greedy:
            gen_kwargs.update(
                temperature=sp.temperature, top_p=sp.top_p, top_k=sp.top_k if sp.top_k > 0 else 0
            )
        eos = list(sp.stop_token_ids)
        if eos:
            gen_kwargs["eos_token_id"] = eos
        pad = getattr(self.model.generation_config, "pad_token_id", None)
        if pad is None:
            pad = eos[0] if eos else 0
        gen_kwargs["pad_token_id"] = pad
        if sp.seed is not None:
            seed = int(sp.seed)
        else:
            # The engine group's seed mixed with one draw of the global RNG: engine groups sample
            # differently, and a run resumed with its RNG state draws the same samples.
            seed = self.seed * 1_000_003 + int(torch.randint(0, 2**31 - 1, (1,)))
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # generation's own draws stay out of training's RNG
            torch.manual_seed(seed)
            return self._generate_all(inputs, sp, gen_kwargs, eos)

    def _generate_all(
        self,
        inputs: list[dict[str, torch.Tensor]],
        sp: SamplingParams,
        gen_kwargs: dict[str, Any],
        eos: list[int],
    ) -> list[GenerationOutput]:
        outputs: list[GenerationOutput] = []
        for x in inputs:  # one prompt at a time: no padding, exact per-prompt outputs
            ids = x["input_ids"][0].tolist()
            kwargs = gen_kwargs
            if self.max_model_len is not None:  # stop at the engine's length, as vLLM and SGLang do
                room = self.max_model_len - x["input_ids"].shape[1]
                kwargs = {**gen_kwargs, "max_new_tokens": min(sp.max_new_tokens, room)}
            res = self.model.generate(**x, **kwargs)
            new = res.sequences[:, x["input_ids"].shape[1] :]
            for j in range(new.shape[0]):
                toks = new[j].tolist()
                finish = "length"
                for k, t in enumerate(toks):
                    if t in eos:
                        toks, finish = toks[: k + 1], "stop"
                        break
                logprobs = None
                if sp.logprobs:
                    logprobs = [
                        float(torch.log_softmax(s[j].float(), -1)[t]) for s, t in zip(res.scores, toks)
                    ]
                text = self.tokenizer.decode(toks) if self.tokenizer is not None else None
                outputs.append(GenerationOutput(list(ids), toks, text, logprobs, finish))
        return outputs

    def _ids_input(self, ids: list[int]) -> dict[str, torch.Tensor]:
        x = torch.tensor([ids], device=self.device)
        return {"input_ids": x, "attention_mask": torch.ones_like(x)}

    def _to_device(self, batch: Any) -> dict[str, torch.Tensor]:
        """The processor's tensors on the engine's device, pixel values in the model's dtype."""
        dtype = next(self.model.parameters()).dtype
        return {
            k: v.to(self.device, dtype) if v.is_floating_point() else v.to(self.device)
            for k, v in batch.items()
            if torch.is_tensor(v)
        }

    def sleep(self, level: int = 1) -> None:
        if level not in (1, 2):
            raise ValueError(
                f"sleep level={level} is invalid: valid are 1 (offload weights) and 2 (free weights)"
            )
        if level == 1:
            self.model.to("cpu")
        else:
            if not self._discarded:
                # Buffers are no weights: no push brings them back (as vLLM, keep them on the host).
                self._saved_buffers = {n: b.detach().cpu().clone() for n, b in self.model.named_buffers()}
            self.model.to("meta")
            self._discarded = True
        self.sleeping_level = level
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def wake_up(self, tags: Sequence[str] | None = None) -> None:
        """Returns the copy to the device (HFEngine wakes everything at once, whatever ``tags``)."""
        if not self._discarded:
            self.model.to(self.device)
        self._params = dict(self.model.named_parameters())
        self.sleeping_level = 0

    def reset_prefix_cache(self) -> None:
        """HFEngine keeps no cache between calls: nothing to reset."""

    def weight_rows(self, name: str, rows: int) -> torch.Tensor:
        """The first ``rows`` rows of the engine's parameter ``name`` (as the engine names it), on
        the host in the engine's dtype: a check that the engine holds the pushed weights."""
        param = self._params.get(name)
        if param is None:
            raise KeyError(
                f"HFEngine.weight_rows: no parameter {name!r}; the engine has {sorted(self._params)[:5]}..."
            )
        return param.detach()[:rows].to("cpu", copy=True)

    def shutdown(self) -> None:
        """Frees the model copy; the engine cannot be used afterwards."""
        self._saved_buffers = {}
        self.model.to("meta")
        self._params = {}
        self._discarded = True
        self.closed = True


@torch.no_grad()
def _copy_buffers(model: nn.Module, source: nn.Module | dict[str, torch.Tensor]) -> None:
    """Copies ``source``'s buffers (a module's, or a name -> tensor dict) into ``model``'s."""
    src = dict(source.named_buffers()) if isinstance(source, nn.Module) else source
    for name, buf in model.named_buffers():
        if name in src:
            buf.copy_(src[name].to(device=buf.device, dtype=buf.dtype))
