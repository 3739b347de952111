"""The inference-engine protocol, and :class:`EngineLifecycle`, the one object that owns a
strategy's rollout engine: setup, weight push, gather-and-generate and sleep / wake.

``StrategyBase``'s engine methods (``setup_inference_engine``, ``update_engine_weights``,
``gather_and_generate``, ``engine_generate_local``, ``maybe_sleep_inference_engine``,
``wakeup_inference_engine``) delegate here. Whether the engine sleeps is read from the engine
(``is_sleeping``); no copy of that state is kept on the strategy side.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

from . import comm
from .utils import empty_device_cache

logger = logging.getLogger("lightrft.strategy")

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

    @property
    def is_sleeping(self) -> bool:
        """Whether any part of the engine (weights, KV cache) is asleep."""
        ...

    @property
    def needs_weight_push(self) -> bool:
        """True after a sleep that discarded the weights (vLLM level 2, SGLang release, HF level 2),
        until a full ``update_weights`` ran."""
        ...

    #: The torch.distributed group of the ranks that share this engine (None: this rank's own).
    tp_group: Any

    # Optional (read with getattr by EngineLifecycle):
    # - ``weight_dtype: torch.dtype | None``: the dtype the engine holds its weights in; the
    #   strategy casts (sharded backends: before gathering) and sends that dtype.
    # - ``consumes_buckets_at_once: bool``: update_weights copies each bucket before asking for the
    #   next (in this process, in stream order), so buckets may be ``transient``.
    # - ``casts_on_copy: bool``: update_weights takes floating-point tensors of any dtype and
    #   rounds them to ``weight_dtype`` in the copy that loads them (round-to-nearest-even, as
    #   ``Tensor.to``): on one rank the strategy then sends its own dtype (``push_dtype``).
    # - ``resets_prefix_cache_on_update: bool``: update_weights resets the prefix cache itself.
    # - ``maps_live_weights: bool``: update_weights takes ``live_storages=``, the storage addresses
    #   of the training rank's own parameters (``weights.live_storages``): a pushed tensor over one
    #   of them stays valid and in place between pushes, so the engine may keep a mapping of it.


_PROTOCOL_MEMBERS = (
    "generate",
    "update_weights",
    "sleep",
    "wake_up",
    "shutdown",
    "is_sleeping",
    "needs_weight_push",
    "tp_group",
)


class EngineDiedError(RuntimeError):
    """The rollout engine is gone (its process died, or it failed in a way it cannot recover from).

    Raised by the call that found out and by every later engine call, on every rank of the
    engine's group; the message names the engine, quotes its last log lines and says how to
    recover. The training state is untouched: ``save_ckpt`` still works."""

    def __init__(self, engine: str, what: str, log_tail: str = "") -> None:
        self.engine = engine
        self.what = what
        self.log_tail = log_tail
        super().__init__(
            f"the {engine!r} inference engine died: {what}. The training state is intact. To recover: "
            "save a checkpoint (strategy.save_ckpt), then call strategy.engine_lifecycle.shutdown() and "
            "strategy.setup_inference_engine(...) again, or restart the job from the checkpoint."
            + (f"\n{log_tail}" if log_tail else "")
        )


class EngineNotSetUpWarning(UserWarning):
    """``update_engine_weights`` was called before ``setup_inference_engine``: nothing was pushed."""


def as_sampling_params(sp: Any) -> SamplingParams:
    """Engine-neutral :class:`SamplingParams` from ours, a dict of our field names, or an object
    with vLLM's field names (``vllm.SamplingParams``, as LightRFT call sites pass):
    ``max_tokens``, ``temperature``, ``top_p``, ``top_k``, ``n``, ``stop_token_ids``, ``seed``,
    ``logprobs`` (not None means "return the sampled tokens' log-probs")."""
    if sp is None:
        return SamplingParams(temperature=0.0)
    if isinstance(sp, SamplingParams):
        return sp
    if isinstance(sp, dict):
        known = set(SamplingParams.__dataclass_fields__)
        unknown = sorted(set(sp) - known)
        if unknown:
            raise ValueError(f"sampling_params keys {unknown} are unknown; valid: {sorted(known)}")
        return SamplingParams(**sp)
    if hasattr(sp, "max_tokens") and hasattr(sp, "temperature"):
        top_k = getattr(sp, "top_k", -1)
        return SamplingParams(
            max_new_tokens=int(sp.max_tokens if sp.max_tokens is not None else 16),
            temperature=float(sp.temperature),
            top_p=float(getattr(sp, "top_p", 1.0)),
            top_k=-1 if top_k in (None, 0) else int(top_k),
            n=int(getattr(sp, "n", 1)),
            stop_token_ids=list(getattr(sp, "stop_token_ids", None) or []),
            seed=getattr(sp, "seed", None),
            logprobs=getattr(sp, "logprobs", None) is not None,
        )
    raise TypeError(
        f"sampling_params must be lightrft.strategy.SamplingParams, a dict of its fields or a "
        f"vllm.SamplingParams-like object; got {type(sp).__name__}"
    )


class EngineLifecycle:
    """Owns one strategy's rollout engine.

    The order after training is fixed here: wake the weights, push every weight bucket, empty
    the device cache, wake the rest (KV cache, engine extras), reset the prefix cache. An engine
    whose weights were discarded by sleep (``needs_weight_push``) cannot be woken or used to
    generate until ``update_weights`` pushed them; the error names ``update_engine_weights``.
    """

    def __init__(self, strategy: Any) -> None:
        self.strategy = strategy
        self.engine: InferenceEngine | None = None
        self.engine_type: str | None = None

    # ------------------------------------------------------------------ setup
    def setup(
        self,
        engine_type: str | None = None,
        model: Any = None,
        tokenizer: Any = None,
        actor: Any = None,
        **kwargs: Any,
    ) -> InferenceEngine:
        """Builds the engine named ``engine_type`` (``config.engine_type`` by default) with
        ``cls(strategy=, model=, tokenizer=, **kwargs)``. With ``actor`` (a prepared, possibly
        sharded training model) and no ``model``, the engine is built from the actor's module (its
        config) and the actor's weights are pushed at once, as LightRFT does. A previous engine is
        shut down first."""
        from .registry import load_engine_class

        name = engine_type or self.strategy.config.engine_type
        cls = load_engine_class(name)
        if self.engine is not None:
            self.shutdown()
        if model is None and actor is not None:
            model = self.strategy.unwrap_model(actor)
        engine = cls(strategy=self.strategy, model=model, tokenizer=tokenizer, **kwargs)
        missing = [m for m in _PROTOCOL_MEMBERS if not hasattr(engine, m)]
        if missing:
            engine.shutdown() if hasattr(engine, "shutdown") else None
            raise TypeError(
                f"engine {name!r} ({cls.__module__}.{cls.__qualname__}) lacks {missing} of the "
                "InferenceEngine protocol (lightrft.strategy.engine.InferenceEngine)"
            )
        self.engine, self.engine_type = engine, name
        if actor is not None:
            self.update_weights(actor)
        return engine

    def require(self) -> InferenceEngine:
        """The engine, or a RuntimeError naming ``setup_inference_engine``."""
        if self.engine is None:
            raise RuntimeError("no inference engine: call strategy.setup_inference_engine(model=...) first")
        return self.engine

    @property
    def is_sleeping(self) -> bool:
        """Whether the engine sleeps (read from the engine; False without one)."""
        return self.engine is not None and bool(self.engine.is_sleeping)

    # ---------------------------------------------------------------- weights
    def update_weights(self, model: Any, bucket_bytes: int | None = None) -> bool:
        """Pushes ``model``'s full weights into the engine. Without an engine it pushes nothing and
        warns (:class:`EngineNotSetUpWarning`, every strategy alike); returns whether it pushed.

        Order: wake ``weights`` -> push -> empty the device cache -> wake the rest -> reset the
        prefix cache. The engine is awake afterwards."""
        if self.engine is None:
            msg = (
                "update_engine_weights() called before setup_inference_engine(): there is no "
                "engine, so no weights were pushed"
            )
            warnings.warn(msg, EngineNotSetUpWarning, stacklevel=3)
            return False
        engine = self.engine
        was_sleeping = engine.is_sleeping
        if was_sleeping:
            engine.wake_up(tags=["weights"])
        buckets = self.strategy.iter_weight_buckets(
            model,
            bucket_bytes,
            dtype=self.push_dtype(),
            transient=bool(getattr(engine, "consumes_buckets_at_once", False)),
        )
        if getattr(engine, "maps_live_weights", False):
            from .weights import live_storages

            engine.update_weights(buckets, live_storages=live_storages(model))
        else:
            engine.update_weights(buckets)
        if was_sleeping:
            empty_device_cache()  # what the push used goes back before the KV cache is woken
        if engine.is_sleeping:
            engine.wake_up(tags=None)
        reset = getattr(engine, "reset_prefix_cache", None)
        if callable(reset) and not getattr(engine, "resets_prefix_cache_on_update", False):
            reset()
        self.strategy.barrier()
        return True

    def push_dtype(self) -> torch.dtype | None:
        """The dtype the strategy hands the engine's push in: the engine's ``weight_dtype``, or
        None (each tensor in its own dtype) when the engine ``casts_on_copy`` and this is the only
        rank. Casting first pays off only where the cast tensors are then gathered (fewer bytes
        over the collective); on one rank it writes and reads a whole extra copy of the weights,
        while an engine that rounds in the copy that loads them reads the fp32 master once and
        writes its own dtype once: the push's floor."""
        dtype = getattr(self.engine, "weight_dtype", None)
        if (
            dtype is not None
            and getattr(self.engine, "casts_on_copy", False)
            and self.strategy.world_size == 1
        ):
            return None
        return dtype

    # ------------------------------------------------------------ sleep / wake
    def sleep(self, level: int | None = None) -> bool:
        """Puts the engine to sleep when ``config.enable_engine_sleep`` (level
        ``config.engine_sleep_level`` by default); returns whether it sleeps now."""
        if self.engine is None:
            return False
        level = self.strategy.config.engine_sleep_level if level is None else level
        if level not in (1, 2):
            raise ValueError(
                f"sleep level={level!r} is invalid: valid are 1 (a host copy of the weights is kept: "
                "wake restores them) and 2 (no copy is kept: update_engine_weights must push them "
                "before the next generate)"
            )
        if self.strategy.config.enable_engine_sleep and not self.engine.is_sleeping:
            self.engine.sleep(level=level)
            empty_device_cache()
        return self.is_sleeping

    def wake_up(self, tags: Sequence[str] | None = None) -> None:
        """Wakes the engine (all of it by default). Refuses when the engine's weights were
        discarded: ``update_engine_weights`` wakes it and pushes them in the right order."""
        if self.engine is None:
            return
        self._check_weights("wakeup_inference_engine()")
        if self.engine.is_sleeping:
            self.engine.wake_up(tags=tags)

    def _check_weights(self, what: str) -> None:
        if self.engine is not None and self.engine.needs_weight_push:
            raise RuntimeError(
                f"{what}: the {self.engine_type!r} engine discarded its weights (sleep level 2): call "
                "strategy.update_engine_weights(actor) first; it wakes the engine and pushes the weights"
            )

    # --------------------------------------------------------------- generate
    def generate_local(
        self,
        sampling_params: Any = None,
        prompts: Sequence[str] | None = None,
        prompt_token_ids: Sequence[Sequence[int]] | None = None,
        multi_modal_inputs: Sequence[Any] | None = None,
    ) -> list[GenerationOutput]:
        """Generates this rank's prompts with the engine directly (no gathering)."""
        engine = self.require()
        self._check_weights("generate")
        if engine.is_sleeping:
            self.wake_up()
        return engine.generate(
            prompts=prompts,
            prompt_token_ids=prompt_token_ids,
            sampling_params=as_sampling_params(sampling_params),
            multi_modal_inputs=multi_modal_inputs,
        )

    def gather_and_generate(
        self,
        sampling_params: Any = None,
        prompts: Sequence[str] | None = None,
        prompt_token_ids: Sequence[Sequence[int]] | None = None,
        multi_modal_inputs: Sequence[Any] | None = None,
        sleep_engine: bool = False,
    ) -> list[GenerationOutput]:
        """Generates this rank's prompts. With a tensor-parallel engine (``engine.tp_group``) the
        group's prompts are gathered to every rank of the group, generated once, and each rank gets
        its own outputs (``n`` per prompt, prompt-major) in order. No prompts on any rank of the
        group: returns ``[]``. ``sleep_engine``: sleep afterwards (``maybe_sleep``)."""
        engine = self.require()
        sp = as_sampling_params(sampling_params)
        if prompts is not None and prompt_token_ids is not None:
            raise ValueError("gather_and_generate: pass prompts= (text) or prompt_token_ids=, not both")
        mine = list(prompt_token_ids if prompt_token_ids is not None else (prompts or []))
        if multi_modal_inputs is not None and len(multi_modal_inputs) != len(mine):
            raise ValueError(
                f"multi_modal_inputs has {len(multi_modal_inputs)} entries for {len(mine)} prompts: "
                "give one per prompt (None where a prompt has none)"
            )
        group = getattr(engine, "tp_group", None)
        if group is None or comm.world_size(group) == 1:
            parts = [(prompts is not None, mine, multi_modal_inputs)]
        else:
            parts = comm.all_gather_object((prompts is not None, mine, multi_modal_inputs), group=group)
        counts = [len(p[1]) for p in parts]
        if sum(counts) == 0:
            return []
        is_text = {p[0] for p, c in zip(parts, counts) if c}
        if len(is_text) > 1:
            raise ValueError(
                "ranks of one engine group passed different prompt kinds (text on some, token ids on "
                "others): pass the same kind on every rank"
            )
        joined = [x for p in parts for x in p[1]]
        mm = None
        if any(p[2] is not None for p in parts):
            mm = [x for p, c in zip(parts, counts) for x in (p[2] if p[2] is not None else [None] * c)]
        text = is_text.pop()
        outputs = self.generate_local(
            sp,
            prompts=joined if text else None,
            prompt_token_ids=None if text else joined,
            multi_modal_inputs=mm,
        )
        if len(outputs) != len(joined) * sp.n:
            raise RuntimeError(
                f"engine {self.engine_type!r} returned {len(outputs)} outputs for {len(joined)} prompts "
                f"with n={sp.n}; expected {len(joined) * sp.n}"
            )
        r = 0 if len(parts) == 1 else comm.rank(group)
        start = sum(counts[:r]) * sp.n
        local = outputs[start : start + counts[r] * sp.n]
        if sleep_engine:
            self.sleep()
        return local

    def shutdown(self) -> None:
        if self.engine is not None:
            engine, self.engine = self.engine, None
            engine.shutdown()


def lightrft_multi_modal_inputs(
    n_prompts: int,
    all_images: Sequence[Any] | None,
    images_num: Sequence[int] | None = None,
    all_videos: Sequence[Any] | None = None,
    videos_num: Sequence[int] | None = None,
) -> list[dict[str, Any] | None] | None:
    """LightRFT's image / video arguments as one ``multi_modal_data`` dict per prompt (None where a
    prompt has none). Accepts per-prompt lists (``all_images[i]`` is prompt i's list) or a flat list
    cut by ``images_num``; None when no prompt has images or videos."""

    def per_prompt(items: Sequence[Any] | None, nums: Sequence[int] | None) -> list[list[Any]]:
        if items is None or not any(x is not None for x in items):
            return [[] for _ in range(n_prompts)]
        if nums is None:
            if len(items) != n_prompts:
                raise ValueError(
                    f"{len(items)} image/video entries for {n_prompts} prompts: give one per prompt "
                    "or the per-prompt counts (images_num / videos_num)"
                )
            return [x if isinstance(x, list) else ([] if x is None else [x]) for x in items]
        if len(nums) != n_prompts:
            raise ValueError(f"images_num/videos_num has {len(nums)} entries for {n_prompts} prompts")
        out, i = [], 0
        for k, num in enumerate(nums):
            if k < len(items) and isinstance(items[k], list) and len(items[k]) == num:
                out.append(list(items[k]))
            else:
                out.append(list(items[i : i + num]))
            i += num
        return out

    images = per_prompt(all_images, images_num)
    videos = per_prompt(all_videos, videos_num)
    result: list[dict[str, Any] | None] = []
    for img, vid in zip(images, videos):
        d: dict[str, Any] = {}
        if img and img[0] is not None:
            d["image"] = img
        if vid and vid[0] is not None:
            d["video"] = vid
        result.append(d or None)
    return result if any(r is not None for r in result) else None


__all__ = [
    "EngineDiedError",
    "EngineLifecycle",
    "EngineNotSetUpWarning",
    "GenerationOutput",
    "InferenceEngine",
    "SamplingParams",
    "WeightBucket",
    "as_sampling_params",
    "lightrft_multi_modal_inputs",
]
