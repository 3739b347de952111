"""SGLangEngine: colocated SGLang (0.5.12 to 0.5.23) behind the LightRFT engine protocol.

One ``sglang.Engine`` serves each tensor-parallel group of ``engine_tp_size`` consecutive ranks. It
is created on the group's first rank with the group's GPUs (``base_gpu_id`` = that rank's GPU,
``tp_size``); its schedulers are subprocesses, one per GPU. Every method is called on every rank
of the group:

- ``generate``: the first rank generates and broadcasts the outputs within the group (errors too,
  so no rank waits forever).
- ``update_weights``: every rank flattens the bucket onto its own GPU (cast to the engine's dtype
  once), serializes it (a CUDA IPC handle, no copy) and the payloads are gathered to the first
  rank, which calls ``update_weights_from_tensor(load_format="flattened_bucket")``: each scheduler
  reads its own GPU's payload. The success flag is checked per bucket and a failure raised on every
  rank; 0.5.21+ sessions (``begin_weight_update`` / ``end_weight_update``) bracket the push;
  the prefix cache is flushed once at the end: by the live call's ``flush_cache=True`` when the
  push has one, else by a ``flush_cache`` call; not at all when the KV cache is released (its
  release flushed it, and nothing ran since).
- ``sleep`` / ``wake_up``: ``release_memory_occupation`` / ``resume_memory_occupation`` with tags.
  One meaning per level, as on every engine: level 2 (the default ``engine_sleep_level``) keeps no
  copy of the weights (the engine starts without ``enable_weights_cpu_backup``): ``needs_weight_push``
  stays True until every weight was pushed again, and ``generate`` refuses to run. Level 1 keeps a
  host copy (the engine starts with ``enable_weights_cpu_backup`` when ``engine_sleep_level`` is 1;
  level 1 on an engine started without it is refused).

Starting (``sglang.Engine``) on the first rank:

- under ``torchrun``, torchrun's environment variables are removed while ``Engine()`` spawns its
  schedulers (``TORCHELASTIC_USE_AGENT_STORE`` makes their ``init_process_group`` wait for a store
  nobody hosts; see ``_sglang_compat``);
- SGLang's log goes to a file (``log_dir``, env ``LIGHTRFT_SGLANG_LOG_DIR``, default
  ``$TMPDIR/lightrft-sglang``; ``self.log_path``) at INFO and to stderr at ``log_level`` (env
  ``LIGHTRFT_SGLANG_LOG_LEVEL``, default ``warning``);
- the engine must be ready within ``start_timeout_s`` (env ``LIGHTRFT_SGLANG_START_TIMEOUT``,
  default 1200; 0 waits forever): otherwise its scheduler processes are stopped with SIGABRT
  (their Python stacks land in ``<log_path>.stacks``) and every rank of the group raises a
  ``TimeoutError`` quoting the last lines of both files.

Version differences live in :mod:`lightrft.engines._sglang_compat`; the engine's processes (start
deadline, death watch, shutdown) are :mod:`lightrft.engines._sglang_procs`'s; the flattened
buckets :mod:`lightrft.engines._sglang_buckets`'s.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.distributed as dist

from lightrft.strategy.engine import EngineDiedError, GenerationOutput, SamplingParams, WeightBucket
from lightrft.strategy.hf_io import original_class_name
from lightrft.strategy.utils import child_pids
from lightrft.strategy.weights import bucket_named_tensors

from . import _sglang_compat as compat
from . import _sglang_live as live_push
from ._common import (
    base_hf_model,
    check_images,
    check_multimodal_lengths,
    check_prompt_lengths,
    empty_device_cache,
    engine_max_len,
    engine_name_map,
    engine_tp_groups,
    engine_weight_names,
    find_processor,
    image_lists,
    image_placeholder,
    is_multimodal,
    is_sharded,
    lora_scalings,
    make_output,
    merge_peft_stream,
    push_dtype,
    remove_dir,
    rename_stream,
    require_model,
    say_once,
    text_tokenizer,
    to_token_id_lists,
    write_config_dir,
)
from ._sglang_buckets import flatten_bucket, unflatten_bucket
from ._sglang_procs import EngineProcesses, _on_sigquit, start_with_deadline

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
#: Seconds ``sglang.Engine()`` may take before its schedulers are stopped (0: no limit).
DEFAULT_START_TIMEOUT_S = 1200.0


class SGLangEngine:
    """An InferenceEngine over ``sglang.Engine``, one per tensor-parallel group (see the module
    docstring). Built by ``strategy.setup_inference_engine(model=hf_model)`` with
    ``engine_type="sglang"``; extra keyword arguments go to ``sglang.Engine`` unchanged (they win
    over what the engine derives from StrategyConfig), except ``start_timeout_s`` and ``log_dir``,
    which are this class's (see the module docstring)."""

    #: Returns the SGLang runtime (``_sglang_compat.load_runtime``). The seam tests use to put a
    #: recording double of ``sglang.Engine`` behind the engine.
    runtime_factory: ClassVar[Any] = staticmethod(compat.load_runtime)
    #: Every bucket is copied (and cast) into its flattened buffer before the next is asked for,
    #: so the strategy may hand out tensors valid only until then (``transient`` buckets), and
    #: tensors of any floating dtype are rounded in that copy: on one training rank the strategy
    #: sends its fp32 masters uncast.
    consumes_buckets_at_once = True
    casts_on_copy = True
    #: ``update_weights`` takes ``live_storages`` (``EngineLifecycle`` passes the storages of the
    #: training rank's own parameters): tensors over them are mapped into the scheduler once and
    #: replayed after (:mod:`lightrft.engines._sglang_live`), with one engine per training rank.
    maps_live_weights = True

    def __init__(
        self,
        strategy: Any = None,
        model: Any = None,
        tokenizer: Any = None,
        *,
        model_path: str | None = None,
        start_timeout_s: float | None = None,
        log_dir: str | os.PathLike | None = None,
        **engine_kwargs: Any,
    ) -> None:
        self.runtime = type(self).runtime_factory()  # raises the install hint first
        if start_timeout_s is None:
            start_timeout_s = float(os.environ.get("LIGHTRFT_SGLANG_START_TIMEOUT", DEFAULT_START_TIMEOUT_S))
        self.start_timeout_s = float(start_timeout_s)
        self.log_dir = Path(
            log_dir
            or os.environ.get("LIGHTRFT_SGLANG_LOG_DIR")
            or Path(tempfile.gettempdir()) / "lightrft-sglang"
        )
        self.log_level = str(
            engine_kwargs.get("log_level") or os.environ.get("LIGHTRFT_SGLANG_LOG_LEVEL", "warning")
        )
        #: The engine's processes (first rank of the group): found at the start, watched during
        #: every call, stopped at shutdown.
        self.procs = EngineProcesses()
        self.closed = False
        if strategy is not None:
            self.config = strategy.config
        else:
            from lightrft.strategy.config import StrategyConfig

            self.config = StrategyConfig()
        cfg = self.config
        # Gloo: the group carries only Python objects (prompts, outputs, IPC handles, status), and a
        # rank waiting for the engine to start must not spin a kernel on a GPU SGLang is using.
        self.tp_group, self.group_ranks = engine_tp_groups(cfg.engine_tp_size, backend="gloo")
        self.tp_size = cfg.engine_tp_size
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.leader = self.group_ranks[0]
        self.is_leader = self.rank == self.leader
        self.device = _device(strategy)
        #: A vision-language model's processor (``processor=``, or ``tokenizer=`` when it is one):
        #: written into the engine's directory, where SGLang builds its own.
        self.processor = find_processor(tokenizer, engine_kwargs.pop("processor", None))
        self.tokenizer = text_tokenizer(tokenizer)
        require_model("SGLangEngine", model, model_path)
        self.model_name = original_class_name(base_hf_model(model)) if model is not None else str(model_path)
        #: Whether the model takes images (its config has a vision_config).
        self.multimodal = is_multimodal(model) if model is not None else _config_has_vision(model_path)
        self.dtype_name = cfg.engine_dtype_name()
        self.dtype = _DTYPES[self.dtype_name]
        #: The strategy casts (sharded backends: before gathering) the pushed weights to this: the
        #: engine's dtype, or None (the actor's own) for a PEFT actor, whose LoRA merge must see
        #: unrounded tensors (:func:`push_dtype`); flatten_bucket casts once after the merge.
        self.weight_dtype = push_dtype(self.dtype, model)
        self.context_length = _context_length(cfg, model, engine_kwargs)
        concurrency = _concurrency(cfg, strategy)
        #: The decode CUDA-graph cap the engine asks for (None: SGLang's own range).
        self.decode_graph_max_bs = None if concurrency is None else compat.rl_decode_graph_max_bs(concurrency)
        #: The largest decode batch SGLang captured a graph for (0: none; None: unknown), read back
        #: after the start; a larger generation is said once, as a warning (it runs eagerly).
        self.decode_graph_captured: int | None = None
        self._lora = lora_scalings(model) if model is not None else {}
        #: Training names -> the names SGLang's model class loads (None: unchanged); once per engine.
        self._rename = engine_name_map(model)
        self.expected_names = engine_weight_names(model) if model is not None else None
        self._released: set[str] = set()
        self._pushed: set[str] = set()
        self._needs_push = False
        self._sender_ready = False
        #: The live push's sender state (:mod:`lightrft.engines._sglang_live`).
        self._live = live_push.LiveSender()
        #: Whether the scheduler loads live pushes: a CUDA engine of one rank whose SGLang takes a
        #: ``custom_weight_loader`` (env ``LIGHTRFT_SGLANG_LIVE_PUSH=0`` turns it off).
        self.live_loader = False
        self.memory_saver = bool(engine_kwargs.get("enable_memory_saver", cfg.enable_engine_sleep))
        self.cpu_backup = bool(
            engine_kwargs.get(
                "enable_weights_cpu_backup", cfg.enable_engine_sleep and cfg.engine_sleep_level == 1
            )
        )
        if self.memory_saver:
            # torch_memory_saver refuses expandable segments: the schedulers would fail to start.
            cfg.model_copy(update={"enable_engine_sleep": True}).check_engine_allocator("sglang")
        # SGLang expands image placeholders with its own processor: a multimodal engine needs it.
        self.skip_tokenizer_init = bool(engine_kwargs.get("skip_tokenizer_init", not self.multimodal))
        self.tags = compat.memory_tags(self.runtime.version)
        self.engine: Any = None
        self._config_dir = None
        sharded = model is not None and is_sharded(model)
        self._leader_step("Engine start", lambda: self._start(model, model_path, engine_kwargs))
        if self.is_leader:
            resolved = getattr(self.engine, "server_args", None)
            self.decode_graph_captured = compat.captured_decode_max_bs(resolved, self.server_args)
        if model_path is None:
            # Dummy weights until the first push: from the model itself when it is whole, from the
            # strategy's buckets (update_engine_weights) when it is a shard.
            self._needs_push = True
            if not sharded:
                params = base_hf_model(model).named_parameters()
                try:
                    self.update_weights(bucket_named_tensors(params, cfg.weight_sync_bucket_mb << 20, str))
                except BaseException:
                    self.shutdown()  # no engine processes left behind a failed first push
                    raise

    # ------------------------------------------------------------------ state
    @property
    def is_sleeping(self) -> bool:
        """Whether any of the engine's memory (weights, KV cache, CUDA graphs) is released."""
        return bool(self._released)

    @property
    def needs_weight_push(self) -> bool:
        """True while the engine's weights are dummy or were freed by a release, until every weight
        of the model was pushed (``update_weights``)."""
        return self._needs_push

    @property
    def log_path(self) -> Path | None:
        """SGLang's log (all its processes; set on the group's first rank when the engine starts)."""
        return self.procs.log_path

    @property
    def engine_pids(self) -> list[int]:
        """Processes the engine started (schedulers, detokenizer): watched during every call."""
        return self.procs.pids

    @property
    def version(self) -> tuple[int, int, int]:
        """The SGLang version in use."""
        return tuple(self.runtime.version)  # type: ignore[return-value]

    # --------------------------------------------------------------- generate
    def generate(
        self,
        prompts: Sequence[str] | None = None,
        prompt_token_ids: Sequence[Sequence[int]] | None = None,
        sampling_params: SamplingParams | None = None,
        multi_modal_inputs: Sequence[Any] | None = None,
    ) -> list[GenerationOutput]:
        """Generates ``n`` completions per prompt (prompt-major order) from token ids, or from text
        with the tokenizer. Called on every rank of the group with the same prompts; the first
        rank generates and the others receive its outputs."""
        self._check_open()
        self._check_generate_ready()
        sp = sampling_params or SamplingParams(temperature=0.0)
        n = len(prompts) if prompts is not None else len(prompt_token_ids or [])
        images = image_lists(multi_modal_inputs, n)
        expanded: list[Any] | None = None
        if images is not None:
            check_images(
                images,
                prompts,
                multimodal=self.multimodal,
                placeholder=image_placeholder(self.processor),
                model_name=self.model_name,
            )
            if self.skip_tokenizer_init:
                raise ValueError(
                    "multi_modal_inputs with images need SGLang's processor: set up the engine with "
                    "skip_tokenizer_init=False (and tokenizer= / a model_path with the processor files)"
                )
            assert prompts is not None
            # The processor's expansion: the length check, and the prompt ids of the outputs
            # (SGLang does not return the ids of a prompt it tokenized).
            expanded = check_multimodal_lengths(self.processor, prompts, images, self.context_length)
            ids = None
        else:
            ids = to_token_id_lists(prompts, prompt_token_ids, self.tokenizer, "SGLangEngine")
            check_prompt_lengths(ids, self.context_length, sp.max_new_tokens)
            if not ids:
                return []
        status: tuple[bool, Any, Any] = (True, None, None)
        if self.is_leader:
            try:
                status = (
                    True,
                    self.procs.watched(
                        "generate",
                        lambda: self._generate_here(ids, prompts, images, sp, expanded),
                        self.device,
                    ),
                    None,
                )
            except EngineDiedError as e:
                status = (False, str(e), (e.what, e.log_tail))
            except Exception as e:  # every rank must learn of it: nobody waits for a broadcast
                status = (False, f"{type(e).__name__}: {e}", None)
        ok, value, died = self._from_leader(status)
        if died is not None:
            raise self.procs.mark_dead(*died)
        if not ok:
            raise RuntimeError(f"SGLang generation failed on rank {self.leader}: {value}")
        return value

    def _generate_here(
        self,
        ids: list[list[int]] | None,
        prompts: Sequence[str] | None,
        images: list[list[Any]] | None,
        sp: SamplingParams,
        expanded: list[Any] | None = None,
    ) -> list[GenerationOutput]:
        n_prompts = len(ids) if ids is not None else len(prompts or [])
        self._warn_if_eager(n_prompts * sp.n)
        if images is not None:
            compat.check_multimodal_ready(self.engine)
        # ``n`` samples of a prompt are n requests of it, in one batch (see _repeat).
        params = request_sampling_params(sp, n_prompts)
        if ids is not None:
            raw = self.engine.generate(
                input_ids=_repeat(ids, sp.n), sampling_params=params, return_logprob=sp.logprobs
            )
        else:
            # A list per prompt (an empty one for a text-only prompt): SGLang reads the batch's
            # layout from the first entry.
            raw = self.engine.generate(
                prompt=_repeat(list(prompts or []), sp.n),
                image_data=_repeat([list(imgs) for imgs in images or []], sp.n),
                sampling_params=params,
                return_logprob=sp.logprobs,
            )
        if isinstance(raw, dict):
            raw = [raw]
        if len(raw) != n_prompts * sp.n:
            raise RuntimeError(f"SGLang returned {len(raw)} outputs for {n_prompts} prompts with n={sp.n}")

        # Text prompts are tokenized by SGLang (it expands the image tokens): their prompt ids are
        # the processor's expansion where it ran, the tokenizer's for a text-only prompt.
        def prompt_ids(i: int) -> list[int]:
            if ids is not None:
                return ids[i]
            if expanded is not None and expanded[i] is not None:
                return list(expanded[i])
            text = (prompts or [])[i]
            return list(self.tokenizer.encode(text)) if self.tokenizer is not None else []

        return [
            convert_output(item, prompt_ids(k // sp.n), self.tokenizer, sp.logprobs)
            for k, item in enumerate(raw)
        ]

    # ---------------------------------------------------------------- weights
    def update_weights(
        self, buckets: Iterable[WeightBucket], live_storages: Collection[int] | None = None
    ) -> None:
        """Pushes full-tensor buckets (the training model's names) into the engine; collective
        within the tensor-parallel group. Raises on every rank when SGLang reports a failure.

        ``live_storages``: storage addresses (``untyped_storage().data_ptr()``) of tensors that
        stay valid and in place between pushes (the training rank's own parameters). With a live
        loader (:attr:`live_loader`), tensors over them are not flattened: they go in one call at
        the end, mapped into the scheduler once and replayed by later pushes; the rest are
        flattened per bucket as always."""
        self._check_open()
        if "weights" in self._released:
            raise RuntimeError(
                "SGLangEngine.update_weights: the engine's weights are released; wake_up(tags=['weights']) "
                "first (strategy.update_engine_weights does it in the right order)"
            )
        if self.device.type == "cuda" and not self._sender_ready:
            self.runtime.prepare_sender()
            self._sender_ready = True
        stream: Iterable[WeightBucket] = buckets
        if self._lora:
            stream = merge_peft_stream(buckets, self._lora)
        stream = rename_stream(stream, self._rename)
        pushed: set[str] = set()
        session = self.is_leader and compat.has_update_session(self.engine)
        self._leader_step(
            "begin_weight_update", lambda: self.engine.begin_weight_update() if session else None
        )
        live = live_storages if live_storages is not None and self.live_loader else ()
        mapped: list[tuple[str, torch.Tensor]] = []
        # The prefix cache holds KV computed with the old weights: it must not outlive the push.
        # With the KV cache released (a push between sleep and wake, as in the RL loop), the
        # release flushed it (SGLang's ``release_memory_occupation`` does) and nothing can have
        # run since: no call. Otherwise the push's last call flushes it in the scheduler: the
        # live call when there is one (one round trip less), else a ``flush_cache`` of its own.
        flush = "kv_cache" not in self._released
        try:
            for bucket in stream:
                if live:
                    rest = []
                    for name, t in bucket:
                        on_live = t.device == self.device and t.untyped_storage().data_ptr() in live
                        (mapped if on_live else rest).append((name, t))
                    bucket = rest
                if not bucket:
                    continue
                flat, entries = flatten_bucket(bucket, self.device, self.dtype)
                payload = self.runtime.serialize_bucket(flat, entries)
                payloads = self._gather_to_leader(payload)
                self._leader_step(
                    "update_weights_from_tensor",
                    lambda p=payloads: self.engine.update_weights_from_tensor(
                        named_tensors=p, load_format="flattened_bucket", flush_cache=False
                    ),
                )
                del flat, payload, payloads  # every rank knows the leader's call returned
                pushed.update(name for name, _ in bucket)
            if mapped:
                self._push_live(mapped, flush=flush)
                pushed.update(name for name, _ in mapped)
        except BaseException:
            if session:  # leave no session open behind a failure
                try:
                    self.engine.end_weight_update()
                except Exception:
                    pass
            raise
        self._leader_step("end_weight_update", lambda: self.engine.end_weight_update() if session else None)
        if flush and not mapped:
            self._leader_step("flush_cache", lambda: self.engine.flush_cache())
        if self.device.type == "cuda":
            torch.cuda.ipc_collect()
        self._pushed |= pushed
        if self.expected_names is None or self.expected_names <= self._pushed:
            self._needs_push = False
            self._pushed = set()

    def _push_live(self, named: list[tuple[str, torch.Tensor]], flush: bool) -> None:
        """One call for every live tensor: a map (their IPC handles) the first time and whenever
        they moved, else a replay of the last map (see :mod:`lightrft.engines._sglang_live`).
        ``flush``: the scheduler flushes its caches after loading (SGLang's ``flush_cache`` of the
        update; a failed flush fails the call)."""
        message = self._live.message(named)
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()  # a replay reads with no IPC event
        self._leader_step(
            "update_weights_from_tensor (live)",
            lambda: self.engine.update_weights_from_tensor(
                named_tensors=message, load_format=live_push.LOADER, flush_cache=flush
            ),
        )
        self._live.sent(message)

    # ------------------------------------------------------------ sleep / wake
    def sleep(self, level: int = 1) -> None:
        """Releases the engine's weights, KV cache and CUDA graphs, with the meaning every engine
        gives the level. Level 2: no copy of the weights is kept (the engine starts without
        ``enable_weights_cpu_backup`` when ``engine_sleep_level`` is 2), so they must be pushed
        again (``needs_weight_push``). Level 1: SGLang keeps a host copy and resume restores it;
        that copy exists only when the engine was started for it (``engine_sleep_level=1``), so
        level 1 on an engine started without it is refused."""
        self._check_open()
        if level not in (1, 2):
            raise ValueError(
                f"sleep level={level!r} is invalid: valid are 1 (host copy kept, wake restores) and 2 "
                "(no copy kept, push before the next generate)"
            )
        if not self.memory_saver:
            raise RuntimeError(
                "SGLangEngine.sleep needs the memory saver: set StrategyConfig.enable_engine_sleep=True "
                "(or enable_memory_saver=True) when setting up the engine"
            )
        if level == 1 and not self.cpu_backup:
            raise RuntimeError(
                "SGLangEngine.sleep(level=1) keeps a host copy of the weights, which this engine was "
                "started without (StrategyConfig.engine_sleep_level=2: no enable_weights_cpu_backup). "
                "Sleep at level 2 and push the weights (strategy.update_engine_weights) before the next "
                "generation, or set engine_sleep_level=1 before setup_inference_engine"
            )
        if level == 2 and self.cpu_backup:
            say_once(
                "sglang-level2-backup",
                "SGLang engine started with enable_weights_cpu_backup (engine_sleep_level=1): at sleep "
                "level 2 SGLang still copies the weights to the host; they are treated as discarded "
                "(push before the next generation). engine_sleep_level=2 starts the engine without the copy",
            )
        todo = [t for t in self.tags if t not in self._released]
        if todo:
            self._leader_step(
                "release_memory_occupation", lambda: self.engine.release_memory_occupation(tags=todo)
            )
            self._released |= set(todo)
        if level == 2 or ("weights" in todo and not self.cpu_backup):
            self._needs_push = True
            self._pushed = set()

    def wake_up(self, tags: Sequence[str] | None = None) -> None:
        """Resumes the released memory named by ``tags`` (None: everything released). ``weights``
        are resumed before the rest, and the device cache is emptied before the KV cache comes
        back."""
        self._check_open()
        wanted = list(self.tags if tags is None else tags)
        unknown = [t for t in wanted if t not in self.tags]
        if unknown:
            raise ValueError(
                f"wake_up tags {unknown} are invalid for SGLang {compat.version_text(self.version)}; "
                f"valid: {self.tags}"
            )
        todo = [t for t in self.tags if t in wanted and t in self._released]  # weights first
        if "weights" in todo:
            self._leader_step(
                "resume_memory_occupation", lambda: self.engine.resume_memory_occupation(tags=["weights"])
            )
            self._released.discard("weights")
            todo.remove("weights")
        if todo:
            empty_device_cache()
            self._leader_step(
                "resume_memory_occupation", lambda: self.engine.resume_memory_occupation(tags=todo)
            )
            self._released -= set(todo)

    def weight_rows(self, name: str, rows: int) -> torch.Tensor | None:
        """The first ``rows`` rows of the engine's parameter ``name`` (Hugging Face names: SGLang
        maps ``q/k/v`` and ``gate/up`` into its fused ones), on the host in the engine's dtype, on
        the group's first rank (None on the others): a check that the engine holds the pushed
        weights (``Engine.get_weights_by_name``, which reads float32 values)."""
        self._check_open()
        if not self.is_leader:
            return None
        values = self.engine.get_weights_by_name(name, truncate_size=rows)
        if values is None:
            raise KeyError(f"SGLangEngine.weight_rows: SGLang has no parameter {name!r} (see its log)")
        return torch.tensor(values, dtype=torch.float32).to(getattr(torch, self.dtype_name))

    def shutdown(self) -> None:
        """Stops the engine's processes, dead engine or alive, and reaps them
        (:meth:`EngineProcesses.shutdown`); every later call raises."""
        if self.closed:
            return
        self.closed = True
        release = self._live.release_message()
        if release is not None and self.engine is not None and self.is_alive:
            try:  # the scheduler lets the training rank's parameters go (their IPC references)
                self.procs.watched(
                    "live release",
                    lambda: self.engine.update_weights_from_tensor(
                        named_tensors=release, load_format=live_push.LOADER, flush_cache=False
                    ),
                    self.device,
                )
            except Exception as e:  # stopping it releases them too; said, never silent
                say_once(
                    f"sglang-live-release-{id(self)}",
                    f"SGLang live push: the release at shutdown failed ({type(e).__name__}: {e}); "
                    "stopping the engine releases the mapped parameters instead",
                )
        if self.engine is not None:
            engine, self.engine = self.engine, None
            try:
                self.procs.shutdown(engine.shutdown)
            finally:
                remove_dir(self._config_dir)

    # -------------------------------------------------------------- internals
    def _start(self, model: Any, model_path: str | None, engine_kwargs: dict[str, Any]) -> None:
        self.server_args = self._server_args(model, model_path, engine_kwargs)
        try:
            config_path = self._write_logging_config()
            changes = dict(compat.scheduler_env(os.environ, str(config_path)))
            if self.multimodal:
                # SGLang keeps vision embeddings by image hash across requests and no flush drops
                # them: after a weight push they would be stale. 0 MB turns that cache off.
                changes["SGLANG_VLM_CACHE_SIZE_MB"] = "0"
            before = set(child_pids())
            with compat.scoped_env(changes):
                self.engine = start_with_deadline(
                    lambda: self.runtime.create_engine(**self.server_args),
                    self.start_timeout_s,
                    self.log_path,
                )
            self.procs.found(before)
            compat.disarm_process_killers(self.engine, _on_sigquit)
        except BaseException:
            remove_dir(self._config_dir)
            raise

    def _write_logging_config(self) -> Path:
        """SGLang's logging config (``SGLANG_LOGGING_CONFIG_PATH``) and the log file it names."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        stem = f"sglang-rank{self.rank}-pid{os.getpid()}-{time.strftime('%Y%m%d-%H%M%S')}"
        self.procs.log_path = log_path = self.log_dir / f"{stem}.log"
        config_path = self.log_dir / f"{stem}.logging.json"
        config_path.write_text(json.dumps(compat.logging_config(str(log_path), self.log_level)))
        return config_path

    def _server_args(
        self, model: Any, model_path: str | None, engine_kwargs: dict[str, Any]
    ) -> dict[str, Any]:
        cfg = self.config
        if model_path is None:
            self._config_dir = write_config_dir(
                model, (self.processor or self.tokenizer) if not self.skip_tokenizer_init else None
            )
            path, load_format = str(self._config_dir), "dummy"
        else:
            path, load_format = model_path, None
        args: dict[str, Any] = {
            "model_path": path,
            "tp_size": self.tp_size,
            "base_gpu_id": self.device.index or 0,
            "skip_tokenizer_init": self.skip_tokenizer_init,
            "mem_fraction_static": cfg.engine_mem_util,
            "random_seed": cfg.engine_seed(self.leader),
            "dtype": self.dtype_name,
            "context_length": self.context_length,
            "enable_memory_saver": self.memory_saver,
            "disable_radix_cache": not cfg.engine_enable_prefix_caching,
            # Used where SGLANG_LOGGING_CONFIG_PATH is not (the engine's logging: see _start).
            "log_level": self.log_level,
        }
        if self.cpu_backup:
            args["enable_weights_cpu_backup"] = True
        if load_format is not None:
            args["load_format"] = load_format
        fields = self.runtime.server_fields
        self.live_loader = (
            self.device.type == "cuda"
            and len(self.group_ranks) == 1
            and "custom_weight_loader" in fields
            and os.environ.get("LIGHTRFT_SGLANG_LIVE_PUSH", "1") != "0"
        )

        if cfg.engine_enforce_eager:
            args.update(compat.eager_args(fields))
        else:
            args.update(compat.decode_graph_args(fields, self.decode_graph_max_bs, engine_kwargs))
        args.update(compat.prefill_graph_args(fields, self.memory_saver, engine_kwargs))
        args.update(compat.attention_args(self.dtype_name, engine_kwargs))
        args.update(compat.multimodal_args(fields, self.multimodal, engine_kwargs))
        args.update(compat.idle_args(fields, engine_kwargs))
        args.update(engine_kwargs)
        if self.live_loader:  # beside any loader of the caller's
            args["custom_weight_loader"] = [
                *(engine_kwargs.get("custom_weight_loader") or []),
                live_push.LOADER,
            ]
        return args

    def _warn_if_eager(self, batch: int) -> None:
        """Says once, as a warning, that a decode batch above the captured CUDA graphs runs eagerly
        (several times slower), and how to capture it; nothing when graphs are off by choice."""
        captured = self.decode_graph_captured
        if not captured or batch <= captured:
            return
        say_once(
            f"sglang-eager-decode-{captured}",
            f"SGLang decodes this batch of {batch} requests WITHOUT CUDA graphs (captured up to {captured} "
            "requests): generation runs several times slower. Capture it: set micro_rollout_batch_size x "
            "n_samples_per_prompt to the prompts x samples you generate at once, or pass "
            f"cuda_graph_max_bs={batch} to setup_inference_engine.",
        )

    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError(
                "SGLangEngine was shut down: set up a new engine (strategy.setup_inference_engine)"
            )
        if self.procs.dead is not None:
            raise EngineDiedError("sglang", *self.procs.dead)

    @property
    def is_alive(self) -> bool:
        """Whether every process the engine started still runs (this rank's view: the first rank
        of the group watches them)."""
        return self.procs.dead is None and not self.procs.find_death()

    def _check_generate_ready(self) -> None:
        if self._needs_push:
            raise RuntimeError(
                "SGLangEngine.generate: the engine has no valid weights (released by sleep, or built "
                "from a sharded model): call strategy.update_engine_weights(actor) first"
            )
        asleep = sorted(self._released)
        if asleep:
            raise RuntimeError(
                f"SGLangEngine.generate: {asleep} are released (the engine sleeps): call wake_up() "
                "(strategy.wakeup_inference_engine()) first"
            )

    def _gather_to_leader(self, payload: Any) -> list[Any] | None:
        """Every rank's payload, in group order, on the first rank (None elsewhere)."""
        if self.tp_group is None:
            return [payload]
        out: list[Any] | None = [None] * self.tp_size if self.is_leader else None
        dist.gather_object(payload, out, dst=self.leader, group=self.tp_group)
        return out

    def _from_leader(self, obj: Any) -> Any:
        if self.tp_group is None:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=self.leader, group=self.tp_group)
        return box[0]

    def _leader_step(self, what: str, call: Callable[[], Any]) -> None:
        """Runs ``call`` on the first rank, then tells every rank of the group whether SGLang
        reported success; raises on every rank when it did not."""
        status: tuple[bool, str] = (True, "")
        died: tuple[str, str] | None = None
        error: Exception | None = None
        if self.is_leader:
            try:
                status = compat.result_ok(self.procs.watched(what, call, self.device))
            except EngineDiedError as e:
                died, status = (e.what, e.log_tail), (False, str(e))
            except Exception as e:  # every rank must learn of it: nobody waits for a broadcast
                error, status = e, (False, f"{type(e).__name__}: {e}")
        ok, message, died = self._from_leader((*status, died))
        if died is not None:
            raise self.procs.mark_dead(*died) from error
        if not ok:
            raise RuntimeError(
                f"SGLang {what} failed on rank {self.leader}: {message or 'no message'}"
            ) from error


def sampling_dict(sp: SamplingParams, copy: int = 0) -> dict[str, Any]:
    """SGLang's sampling-parameter dict of one request, the ``copy``-th sample of its prompt
    (``extra`` keys pass through and win). No ``n``: the engine sends a prompt ``sp.n`` times
    (:func:`request_sampling_params`). A seed becomes ``sampling_seed`` (which SGLang honours with
    ``enable_deterministic_inference``), ``seed + copy`` for the copy-th sample, so the samples of
    one prompt differ and are reproducible."""
    if "n" in sp.extra:
        raise ValueError(
            f"SamplingParams.extra has 'n'={sp.extra['n']!r}: give the number of samples per prompt "
            "as SamplingParams.n"
        )
    out: dict[str, Any] = {
        "max_new_tokens": sp.max_new_tokens,
        "temperature": sp.temperature,
        "top_p": sp.top_p,
        "top_k": sp.top_k,
    }
    if sp.stop_token_ids:
        out["stop_token_ids"] = list(sp.stop_token_ids)
    if sp.seed is not None:
        out["sampling_seed"] = sp.seed + copy
    out.update(sp.extra)
    return out


def request_sampling_params(sp: SamplingParams, n_prompts: int) -> dict[str, Any] | list[dict[str, Any]]:
    """``sampling_params`` of one ``Engine.generate`` call over ``n_prompts`` prompts, each sent
    ``sp.n`` times in a row: one dict for every request, or with a seed one per request
    (:func:`sampling_dict`'s ``copy``).

    SGLang's own ``n`` is not used, for two reasons read in SGLang 0.5.16's
    ``managers/tokenizer_manager.py``. With ``n > 1``, ``_handle_batch_request`` (its ``else``
    branch, l. 1630-1685) first sends every prompt alone, with ``max_new_tokens=0``, to cache its
    prefix, and waits for each before the next (l. 1645-1661): one prefill round trip per prompt,
    in series (16 one-request prefill batches before the 64-request one in the soak's SGLang log,
    about 0.27 s of a 0.55-0.86 s generation). And ``generate_request`` has already made a request
    state for each of the ``prompts x n`` ids (``_init_req_state``, l. 646 and 3018-3023; the ids
    were expanded to ``batch_size * n`` in ``io_struct.py`` l. 447-455), of which only the first
    ``prompts`` are ever deleted (l. 1684-1685): ``prompts x (n - 1)`` ``ReqState`` objects (each
    with its ``GenerateReqInput``, an ``asyncio.Event`` and ~25 lists) stay in ``rid_to_state``
    for good, 48 per call at 16 prompts x 4 (the soak's census: +48 ``ReqState`` per iteration).
    Repeated prompts take the ``n == 1`` path (l. 1599-1608 for token ids): one batch sent at
    once, every state deleted when its request finishes (l. 2165)."""
    if sp.seed is None:
        return sampling_dict(sp)
    return [sampling_dict(sp, copy) for _ in range(n_prompts) for copy in range(sp.n)]


def _repeat(items: list[Any], n: int) -> list[Any]:
    """Each item ``n`` times in a row (prompt-major: the order of the outputs)."""
    return list(items) if n == 1 else [x for x in items for _ in range(n)]


def convert_output(
    item: dict[str, Any], prompt_ids: Sequence[int], tokenizer: Any, logprobs: bool
) -> GenerationOutput:
    """One SGLang output dict as a :class:`GenerationOutput`: ``output_ids``, the log-probs of the
    sampled tokens from ``meta_info.output_token_logprobs`` (``(logprob, token_id, text)``
    triples), the finish reason's type."""
    meta = item.get("meta_info", {})
    out_ids = list(item.get("output_ids", []))
    lps = None
    if logprobs:
        triples = meta.get("output_token_logprobs") or []
        if len(triples) != len(out_ids):
            raise RuntimeError(f"SGLang returned {len(triples)} log-probs for {len(out_ids)} output tokens")
        lps = [float(t[0]) for t in triples]
    result = make_output(prompt_ids, out_ids, tokenizer, lps, meta.get("finish_reason"))
    if result.text is None and item.get("text") is not None:
        result.text = item["text"]
    return result


def _config_has_vision(model_path: str | None) -> bool:
    """Whether the Hugging Face directory's ``config.json`` describes a vision-language model."""
    cfg = Path(model_path or "") / "config.json"
    return cfg.is_file() and "vision_config" in json.loads(cfg.read_text())


def _device(strategy: Any) -> torch.device:
    if strategy is not None:
        return torch.device(strategy.device)
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _context_length(cfg: Any, model: Any, engine_kwargs: dict[str, Any]) -> int | None:
    """SGLang ``context_length``: the caller's, else the engines' rule (``engine_max_len``)."""
    if engine_kwargs.get("context_length") is not None:
        return int(engine_kwargs["context_length"])
    return engine_max_len(cfg, model)


def _concurrency(cfg: Any, strategy: Any) -> int | None:
    """Requests one engine runs at once in an RL loop: each rank's generation micro-batch
    (``micro_rollout_batch_size`` prompts x ``n_samples_per_prompt``), gathered over the group.
    None when the config gives neither (its default of 8 says nothing about the loop)."""
    n = None
    if strategy is not None and hasattr(strategy, "get_extra_arg"):
        n = strategy.get_extra_arg("n_samples_per_prompt", None)
    if n is None and "micro_rollout_batch_size" not in getattr(cfg, "model_fields_set", set()):
        return None
    return int(getattr(cfg, "micro_rollout_batch_size", 8)) * int(n or 1) * int(cfg.engine_tp_size)


__all__ = [
    "SGLangEngine",
    "convert_output",
    "flatten_bucket",
    "request_sampling_params",
    "sampling_dict",
    "unflatten_bucket",
]
