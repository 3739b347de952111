"""VLLMEngine: one in-process ``vllm.LLM`` per tensor-parallel group, colocated with training.

- Groups of ``engine_tp_size`` consecutive ranks share one engine; with more than one rank the
  engine runs SPMD (``distributed_executor_backend="external_launcher"``): every rank of a group
  calls ``generate`` with the same prompts (the strategy's ``gather_and_generate`` does that).
  ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` keeps the engine core and its worker in this process, so
  weight buckets reach the worker by reference through ``collective_rpc``.
- Built from a Hugging Face model: its config (and tokenizer) go to a temporary directory, vLLM
  loads dummy weights, and the model's real weights are pushed through the same path as every
  later update (a sharded actor's weights come from the strategy's buckets). ``model_path=`` loads
  a checkpoint directory instead.
- ``update_weights`` streams buckets into the workers' ``model.load_weights`` (names as the
  training model has them; PEFT LoRA merged from the actor's own precision; dtype cast once) and
  resets the prefix cache.
- ``sleep(1)`` offloads weights to a host copy and drops the KV cache, ``sleep(2)`` discards both
  (``needs_weight_push`` until a full push). vLLM on CPU has no sleep mode: said once, nothing is
  freed, and level 2 still means "push before the next generation".
- One sleep-mode engine per process (vLLM's CuMemAllocator): ``shutdown()`` parks it asleep at
  level 2 and the next engine of the same settings reuses it with the new model's weights; other
  settings are refused with what works (:mod:`lightrft.engines._vllm_process`).
- In process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``): no engine process can die apart from the
  training process, so there is nothing to watch (SGLang's schedulers are: ``EngineDiedError``).

Version and platform differences live in :mod:`lightrft.engines._vllm_compat`.
"""

from __future__ import annotations

import gc
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lightrft.strategy.engine import GenerationOutput, SamplingParams, WeightBucket
from lightrft.strategy.weights import bucket_named_tensors

from . import _common
from . import _vllm_compat as compat
from . import _vllm_process as _process

_TAGS = ("weights", "kv_cache")
_EXTENSION = "lightrft.engines._vllm_worker.LightRFTWorkerExtension"


class VLLMEngine:
    """The ``vllm`` InferenceEngine (``engine_type="vllm"``, extra ``lightrft-engines[vllm]``)."""

    #: Every bucket is copied into the in-process workers before the next is asked for, so the
    #: strategy may hand out its gathered buffers without a copy (``transient`` buckets).
    consumes_buckets_at_once = True
    #: update_weights ends with reset_prefix_cache(): the lifecycle need not call it again.
    resets_prefix_cache_on_update = True
    #: Tensors of any floating dtype are rounded to the engine's in the copy that loads them (the
    #: worker's copy plan): on one training rank the strategy sends its fp32 masters uncast.
    casts_on_copy = True

    def __init__(
        self,
        strategy: Any = None,
        model: nn.Module | None = None,
        tokenizer: Any = None,
        model_path: str | None = None,
        processor: Any = None,
        **llm_kwargs: Any,
    ) -> None:
        vllm = compat.import_vllm()
        self.vllm_version = compat.check_version(vllm)
        from lightrft.config import StrategyConfig

        cfg = strategy.config if strategy is not None else StrategyConfig()
        _common.require_model("VLLMEngine", model, model_path)
        #: A vision-language model's processor (``processor=``, or ``tokenizer=`` when it is one): it
        #: goes into the engine's directory (vLLM builds its own from there) and counts image tokens.
        self.processor = _common.find_processor(tokenizer, processor)
        self.tokenizer = _common.text_tokenizer(tokenizer)
        self.closed = False
        self.tp_group, self.tp_ranks = _common.engine_tp_groups(cfg.engine_tp_size)
        world = dist.get_world_size() if dist.is_initialized() else 1
        rank = dist.get_rank() if dist.is_initialized() else 0
        self._on_cpu = compat.on_cpu()
        self._sleep_ok = compat.sleep_supported() and cfg.enable_engine_sleep
        if self._sleep_ok:
            cfg.check_engine_allocator("vllm")  # the CuMem pool cannot use expandable segments
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the worker must live in this process
        self._dir: str | None = None
        self._peft_scalings = _common.lora_scalings(model) if model is not None else {}
        self._expected_names: set[str] = set()
        #: Training names -> the names vLLM's model class loads (None: unchanged); once per engine.
        self._rename = _common.engine_name_map(model)
        multimodal = _common.is_multimodal(model) if model is not None else _config_has_vision(model_path)
        if model_path is None:
            assert model is not None
            self._dir = str(_common.write_config_dir(model, self.processor or tokenizer))
            # The names as merge_peft_stream yields them (a PEFT actor's LoRA parts merged away),
            # in the engine's layout (a vision-language model's hub names).
            self._expected_names = _common.engine_weight_names(model)
        dtype = cfg.engine_dtype_name()
        kwargs: dict[str, Any] = {
            "model": model_path or self._dir,
            "tokenizer": (model_path or self._dir) if (tokenizer is not None or model_path) else None,
            "skip_tokenizer_init": tokenizer is None and model_path is None,
            "tensor_parallel_size": cfg.engine_tp_size,
            "gpu_memory_utilization": cfg.engine_mem_util,
            "seed": cfg.engine_seed(rank),
            "dtype": dtype,
            "max_model_len": _common.engine_max_len(cfg, model),
            "enforce_eager": cfg.engine_enforce_eager,
            "enable_prefix_caching": cfg.engine_enable_prefix_caching,
            "enable_sleep_mode": self._sleep_ok,
            "worker_extension_cls": _EXTENSION,
            "load_format": "auto" if model_path else "dummy",
            "logprobs_mode": "processed_logprobs",
        }
        if multimodal:
            # vLLM sizes its encoder cache and profiling for this many images in one prompt.
            kwargs["limit_mm_per_prompt"] = {"image": int(cfg.get_extra_arg("limit_mm_per_prompt", 4) or 4)}
        if world > 1 or cfg.engine_tp_size > 1:
            kwargs["distributed_executor_backend"] = "external_launcher"
        kwargs.update(llm_kwargs)
        kwargs = {k: v for k, v in compat.filter_llm_kwargs(kwargs).items() if v is not None}
        self._had_group = dist.is_initialized()  # the training job's group survives shutdown()
        #: Set for a sleep-mode engine: what a later engine must match to reuse this one's vllm.LLM
        #: (one sleep-mode engine per process: see _vllm_process).
        self._process_key: dict[str, Any] | None = None
        reused: _process.Parked | None = None
        try:
            if self._sleep_ok:
                self._process_key = _process.engine_key(kwargs, _read_model_config(kwargs["model"]))
                reused = _process.claim(self, self._process_key, getattr(vllm, "__version__", "?"))
            if reused is not None:
                self.llm = reused.llm
                _common.remove_dir(self._dir)
                self._dir = reused.directory
            else:
                self.llm = vllm.LLM(**kwargs)
        except Exception:
            _process.forget(self)
            _common.remove_dir(self._dir)
            raise
        #: Whether this engine took over the process's parked vllm.LLM (same settings).
        self.reused = reused is not None
        self.max_model_len: int = int(self.llm.llm_engine.model_config.max_model_len)
        #: Whether the engine's model takes images (vLLM's reading of its config).
        self.multimodal = compat.is_multimodal(self.llm)
        if self.processor is None and self.multimodal and model_path is not None:
            from transformers import AutoProcessor

            self.processor = AutoProcessor.from_pretrained(model_path)
        #: The dtype the engine holds its weights in.
        self.dtype: torch.dtype | None = _torch_dtype(self.llm.llm_engine.model_config.dtype)
        #: The strategy casts (and gathers) the pushed weights in this dtype: the engine's own, or
        #: None (the actor's own) for a PEFT actor, whose LoRA merge must see unrounded tensors
        #: (:func:`_common.push_dtype`); the worker casts once when it loads.
        self.weight_dtype: torch.dtype | None = _common.push_dtype(self.dtype, model)
        self._asleep: set[str] = set(_TAGS) if self.reused else set()
        self._level = 2 if self.reused else 0
        self._needs_push = self.reused
        if self.reused:
            self.wake_up()  # memory back; the weights hold garbage until the push below
        if model_path is None:
            assert model is not None
            if _common.is_sharded(model):
                self._needs_push = True  # the lifecycle pushes the actor's buckets next
            else:
                self.update_weights(bucket_named_tensors(_plain_named_parameters(model), 256 << 20, str))
        if not self._sleep_ok and compat.on_cpu():
            _common.say_once("vllm-cpu-sleep", "vLLM on CPU has no sleep mode: sleep()/wake_up() do nothing")

    # -------------------------------------------------------------- protocol state
    @property
    def is_sleeping(self) -> bool:
        return bool(self._asleep)

    @property
    def needs_weight_push(self) -> bool:
        """True after ``sleep(2)`` (or when built from a sharded model) until a full push."""
        return self._needs_push

    def _check_open(self, what: str) -> None:
        if self.closed:
            raise RuntimeError(f"VLLMEngine.{what}() after shutdown(): set up a new engine")

    # ------------------------------------------------------------------- weights
    @torch.no_grad()
    def update_weights(self, buckets: Iterable[WeightBucket]) -> None:
        """Loads every bucket into every worker of this rank's engine, then resets the prefix
        cache. After a weight-discarding sleep, the push must cover every weight of the model."""
        self._check_open("update_weights")
        if "weights" in self._asleep:
            raise RuntimeError("VLLMEngine.update_weights(): wake_up(['weights']) first")
        stream: Iterable[WeightBucket] = buckets
        if self._peft_scalings:
            stream = _common.merge_peft_stream(stream, self._peft_scalings)
        stream = _common.rename_stream(stream, self._rename)
        seen: set[str] = set()
        for bucket in stream:
            if bucket:
                self.llm.collective_rpc("lrft_load_weights", args=(bucket,))
                seen.update(n for n, _ in bucket)
        if self._on_cpu:
            self.llm.collective_rpc("lrft_finish_update")  # the CPU backend reloads and repacks here
        if self._needs_push and self._expected_names:
            missing = self._expected_names - seen
            if missing:
                raise RuntimeError(
                    f"the engine's weights were discarded and this push misses {len(missing)} of them "
                    f"(e.g. {sorted(missing)[:3]}): push every weight (strategy.update_engine_weights)"
                )
        self._needs_push = False
        self.reset_prefix_cache()

    def reset_prefix_cache(self) -> None:
        """Drops cached prefixes (vLLM does not do it on a weight update) and, for a
        vision-language model, the cached vision-encoder outputs of earlier images."""
        self._check_open("reset_prefix_cache")
        if not self._asleep:
            self.llm.reset_prefix_cache()
            if self.multimodal:
                compat.reset_encoder_cache(self.llm)

    def set_copy_plan(self, enabled: bool) -> dict[str, int]:
        """Pushes through the recorded copy plan (default) or through ``load_weights`` every time
        (benchmarks compare them). Returns the plan's counters of this rank's worker."""
        self._check_open("set_copy_plan")
        return dict(self.llm.collective_rpc("lrft_set_copy_plan", args=(enabled,))[0])

    def param_checksum(self) -> float:
        """Sum over this rank's worker parameters (tests)."""
        return float(self.llm.collective_rpc("lrft_param_checksum")[0])

    def weight_rows(self, name: str, rows: int) -> torch.Tensor:
        """The first ``rows`` rows of this rank's shard of the worker's parameter ``name`` (vLLM's
        names: ``qkv_proj`` and ``gate_up_proj`` are fused), on the host in the engine's dtype: a
        check that the engine holds the pushed weights."""
        self._check_open("weight_rows")
        return self.llm.collective_rpc("lrft_param_rows", args=(name, rows))[0]

    # ------------------------------------------------------------------ generate
    def generate(
        self,
        prompts: Sequence[str] | None = None,
        prompt_token_ids: Sequence[Sequence[int]] | None = None,
        sampling_params: SamplingParams | None = None,
        multi_modal_inputs: Sequence[Any] | None = None,
    ) -> list[GenerationOutput]:
        """``n`` completions per prompt, prompt-major. Text prompts are encoded with the tokenizer;
        with ``multi_modal_inputs`` (one ``multi_modal_data`` dict or None per prompt) the text goes
        to vLLM with its data."""
        self._check_open("generate")
        if self.is_sleeping:
            raise RuntimeError(
                "VLLMEngine is asleep: call wake_up() (strategy.wakeup_inference_engine()) first"
            )
        if self._needs_push:
            raise RuntimeError(
                "VLLMEngine's weights were discarded (sleep level 2) or never loaded: call "
                "strategy.update_engine_weights(actor) first"
            )
        from vllm import SamplingParams as VSP

        sp = sampling_params or SamplingParams(temperature=0.0)
        requests: list[Any]
        n = len(prompts) if prompts is not None else len(prompt_token_ids or [])
        images = _common.image_lists(multi_modal_inputs, n)
        ids: list[list[int]] | None
        if images is not None:
            requests = self.multimodal_requests(prompts, images)
            ids = None
        else:
            ids = _common.to_token_id_lists(prompts, prompt_token_ids, self.tokenizer, "VLLMEngine")
            _common.check_prompt_lengths(ids, self.max_model_len, sp.max_new_tokens)
            requests = [{"prompt_token_ids": p} for p in ids]
        if not requests:
            return []
        params = VSP(
            n=sp.n,
            temperature=sp.temperature,
            top_p=sp.top_p,
            top_k=sp.top_k if sp.top_k > 0 else 0,
            max_tokens=sp.max_new_tokens,
            stop_token_ids=list(sp.stop_token_ids),
            seed=sp.seed,
            logprobs=0 if sp.logprobs else None,
            detokenize=self.tokenizer is not None,
            **sp.extra,
        )
        results = self.llm.generate(requests, params, use_tqdm=False)
        outputs: list[GenerationOutput] = []
        for i, req in enumerate(results):
            prompt_ids = list(req.prompt_token_ids) if req.prompt_token_ids is not None else list(ids[i])  # type: ignore[index]
            for o in sorted(req.outputs, key=lambda c: c.index):
                toks = list(o.token_ids)
                lps = None
                if sp.logprobs and o.logprobs is not None:
                    lps = [float(o.logprobs[t][tok].logprob) for t, tok in enumerate(toks)]
                outputs.append(_common.make_output(prompt_ids, toks, self.tokenizer, lps, o.finish_reason))
        return outputs

    def multimodal_requests(
        self, prompts: Sequence[str] | None, images: list[list[Any]]
    ) -> list[dict[str, Any]]:
        """vLLM's requests for text prompts with their images (one ``multi_modal_data`` per prompt
        with images, a plain text prompt otherwise), after the checks that name the bad prompt:
        images for a text-only model, a placeholder count that differs from the image count, a
        prompt that does not fit ``max_model_len`` once its image tokens are inserted."""
        _common.check_images(
            images,
            prompts,
            multimodal=self.multimodal,
            placeholder=_common.image_placeholder(self.processor),
            model_name=str(self.llm.llm_engine.model_config.architectures),
        )
        assert prompts is not None
        _common.check_multimodal_lengths(self.processor, prompts, images, self.max_model_len)
        return [
            {"prompt": p, "multi_modal_data": {"image": imgs}} if imgs else {"prompt": p}
            for p, imgs in zip(prompts, images)
        ]

    # --------------------------------------------------------------- sleep / wake
    def sleep(self, level: int = 1) -> None:
        """Level 1: weights to a host copy (wake restores them), KV cache freed. Level 2: both
        freed, no copy anywhere (push before generating). Without sleep mode (vLLM on CPU,
        ``enable_engine_sleep=False``) nothing is freed, but level 2 keeps its meaning: the weights
        count as discarded until the next push, as on every engine."""
        self._check_open("sleep")
        if level not in (1, 2):
            raise ValueError(
                f"sleep level={level} is invalid: valid are 1 (host copy, wake restores) and 2 (no copy)"
            )
        if not self._sleep_ok:
            reason = "vLLM on CPU has no sleep mode" if compat.on_cpu() else "enable_engine_sleep=False"
            _common.say_once(
                f"vllm-nosleep-{reason}", f"VLLMEngine.sleep(): {reason}; the engine stays awake"
            )
            if level == 2:
                self._needs_push = True
            return
        if self._asleep:
            return
        self.llm.sleep(level=level)
        self._asleep = set(_TAGS)
        self._level = level
        if level == 2:
            self._needs_push = True
        _common.empty_device_cache()

    def wake_up(self, tags: Sequence[str] | None = None) -> None:
        """Wakes ``tags`` among ``"weights"``, ``"kv_cache"`` (None: all). After ``sleep(2)`` the
        woken weights hold garbage until ``update_weights``."""
        self._check_open("wake_up")
        wanted = list(_TAGS) if tags is None else list(tags)
        bad = [t for t in wanted if t not in _TAGS]
        if bad:
            raise ValueError(f"wake_up tags {bad} are invalid for vLLM: valid are {list(_TAGS)} or None")
        todo = [t for t in wanted if t in self._asleep]
        if not todo:
            return
        _common.empty_device_cache()
        self.llm.wake_up(tags=todo)
        self._asleep -= set(todo)

    def shutdown(self) -> None:
        """Frees the engine (its worker, KV cache and temporary directory). Idempotent."""
        if self.closed:
            return
        self.closed = True
        if self._process_key is not None:
            self._park()
        else:
            _map_back_before_free(self.llm, self._asleep)
            self._asleep = set()
            compat.shutdown(self.llm, keep_default_group=self._had_group)
            _common.remove_dir(self._dir)
        del self.llm
        gc.collect()
        _common.empty_device_cache()

    def _park(self) -> None:
        """A sleep-mode engine is not destroyed (vLLM allows one per process): it sleeps at level 2
        (no weights, no KV cache on the device, no host copy) and waits for the next engine of the
        same settings; the process's exit shuts it down for real (_vllm_process)."""
        llm, had_group, directory = self.llm, self._had_group, self._dir
        try:
            if self._asleep and self._level != 2:  # a host copy to drop: wake, then discard
                llm.wake_up(tags=None)
                self._asleep = set()
            if not self._asleep:
                llm.sleep(level=2)
        except Exception:
            _process.forget(self)
            _map_back_before_free(llm, self._asleep)
            compat.shutdown(llm, keep_default_group=had_group)
            _common.remove_dir(directory)
            raise

        def close() -> None:  # parked engines sleep at level 2: every tag is unmapped
            _map_back_before_free(llm, set(_TAGS))
            compat.shutdown(llm, keep_default_group=had_group)
            _common.remove_dir(directory)

        assert self._process_key is not None
        _process.park(self, _process.Parked(llm, self._process_key, directory, close))


def _map_back_before_free(llm: Any, asleep: set[str]) -> None:
    """Wakes the sleeping ``asleep`` tags of an engine about to be destroyed. vLLM (0.26 to 0.32 on
    CUDA) frees a sleeping allocation with ``cuMemUnmap`` on an address its sleep already unmapped:
    ``CUDA Error: invalid argument at cumem_allocator.cpp`` is printed at exit, and the allocator's
    error code stays set, which fails its next allocation in the process. Mapped back (contents do
    not matter), every free is valid. It needs the memory the engine held while awake; a failure
    is not raised: the engine is going away either way."""
    if not asleep:
        return
    try:
        llm.wake_up(tags=sorted(asleep))
    except Exception as exc:  # noqa: BLE001 - destroying anyway; say why the free may complain
        _common.say_once(
            "vllm-map-back", f"VLLMEngine.shutdown(): could not map the sleeping engine back ({exc})"
        )


def _read_model_config(directory: Any) -> dict[str, Any] | None:
    """The Hugging Face ``config.json`` of the engine's model directory (None without one)."""
    path = Path(str(directory)) / "config.json"
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        return None


def _torch_dtype(value: Any) -> torch.dtype | None:
    if isinstance(value, torch.dtype):
        return value
    return getattr(torch, str(value), None) if isinstance(value, str) else None


def _config_has_vision(model_path: str | None) -> bool:
    """Whether the Hugging Face directory's ``config.json`` describes a vision-language model."""
    import json
    from pathlib import Path

    cfg = Path(model_path or "") / "config.json"
    return cfg.is_file() and "vision_config" in json.loads(cfg.read_text())


def _plain_named_parameters(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    from lightrft.strategy.weights import clean_param_name

    for name, p in model.named_parameters():
        yield clean_param_name(name), p.detach()
