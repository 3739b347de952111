"""Everything that differs between SGLang 0.5.x releases, in one place (checked against the 0.5.12,
0.5.16, 0.5.21 and 0.5.23 wheels).

:class:`SGLangRuntime` is the part of the ``sglang`` package the engine uses: building an
``Engine``, the ``ServerArgs`` field names, serializing one tensor-parallel rank's flattened weight
bucket, and the version. :func:`load_runtime` imports the real one; tests pass a double.

Version facts this module encodes:

- ``release_memory_occupation`` / ``resume_memory_occupation`` tags: ``weights`` and ``kv_cache``
  everywhere, ``cuda_graph`` from 0.5.5 (:func:`memory_tags`).
- ``Engine.begin_weight_update`` / ``end_weight_update`` exist from 0.5.21 (sglang PR #28001); from
  then on ``update_weights_from_tensor`` outside such a session returns ``(False, "must run between
  begin_weight_update() and end_weight_update()")`` without raising (:func:`has_update_session`).
- ``monkey_patch_torch_reductions`` lives in ``sglang.srt.utils.patch_torch`` (0.5.3+) and
  ``sglang.srt.patch_torch`` before; ``FlattenedTensorBucket`` in ``sglang.srt.weight_sync.tensor_bucket``
  and ``MultiprocessingSerializer`` in ``sglang.srt.utils`` in every 0.5.x.
- Prefill CUDA graphs (:func:`prefill_graph_args`). 0.5.12 captures prefill with torch.compile
  piecewise graphs (``disable_piecewise_cuda_graph``); 0.5.16+ has per-phase backends and makes
  ``breakable`` the prefill default on CUDA (sglang PR #29458). Breakable capture refuses
  the memory saver outright when the saver also owns graph memory
  (``SGLANG_MEMORY_SAVER_CUDA_GRAPH``: "Breakable CUDA graph is not compatible with memory saver
  mode", ``breakable_cuda_graph_backend.py`` in 0.5.16 to 0.5.23); without that variable, capture
  under ``enable_memory_saver`` failed on the H100 machine with ``CUBLAS_STATUS_EXECUTION_FAILED``
  (SGLang 0.5.16, torch 2.11). Breakable prefill graphs also alias captured inputs across batch
  buckets (sglang issue #37606, fix in PR #37448, open in 0.5.23), and the piecewise backend crashes
  with illegal memory accesses on recent torch (NeMo-RL, which disables it for the same reason). So
  with the memory saver on, prefill runs eagerly; decode keeps its CUDA graphs. A caller who passes
  one of these arguments keeps it.
- Scheduler environment (:func:`scheduler_env`). ``sglang.Engine`` spawns its schedulers with the
  parent's environment, and each one calls ``torch.distributed.init_process_group(
  init_method="tcp://127.0.0.1:<free port>")`` (``srt/distributed/bootstrap.py:170-186`` and
  ``parallel_state.py:2064`` in 0.5.16). Under ``torchrun`` the parent carries
  ``TORCHELASTIC_USE_AGENT_STORE=True`` (torch ``elastic/agent/server/local_elastic_agent.py``), and
  torch before pytorch PR #191989 (August 2026; torch 2.11 is older) then makes *every* rank a
  client of a store at that port that nobody hosts: the scheduler waits in connect-retry until the
  store timeout (10 min on NCCL) while ``Engine()`` sits in ``_wait_for_scheduler_ready``, which is
  how both torchrun jobs of the 2026-11-27 GPU session hung. AReaL (its per-pipeline-stage NCCL
  weight update) sets the variable to False before its own ``tcp://`` groups; LMFlow removes
  torchrun's whole set (``MEMORY_SAFE_VLLM_INFERENCE_ENV_VAR_TO_REMOVE``) before it starts an engine
  subprocess. We remove the set for the duration of ``Engine()`` (the only time SGLang
  spawns) and restore it afterwards.
- Logging (:func:`logging_config`): ``configure_logger`` (``srt/utils/common.py``, 0.5.12 to 0.5.23)
  loads ``SGLANG_LOGGING_CONFIG_PATH`` (a ``logging.config.dictConfig`` JSON) in the engine's
  process and in every scheduler, instead of ``basicConfig(force=True)`` on the root logger. Ours
  configures the ``sglang`` logger only: a file (INFO, rotated) that a start failure quotes, and
  stderr at the chosen level; in the schedulers it also points ``faulthandler`` at a ``.stacks``
  file, so a scheduler stopped with SIGABRT at the start deadline leaves its Python stacks there.
- Decode CUDA graphs (:func:`decode_graph_args`): 0.5.16 captures decode graphs for batch sizes up
  to 256 on an 80 GB GPU (``server_args.py:3957-3964``; 36 graphs, "Capturing batches (bs=256 ...)
  0/36" on the H100), and the first of them is the scheduler's first forward, where SGLang's JIT
  kernels (``sglang/jit_kernel``: norm, activation, rope, kvcache, built with nvcc through tvm-ffi
  into ``~/.cache/tvm-ffi`` on first use) are compiled. A colocated RL engine runs at most
  ``micro_rollout_batch_size x n_samples_per_prompt x engine_tp_size`` requests at once, so when
  the config gives those, fewer graphs are captured; when it gives neither, SGLang's own range is.
  A larger decode batch runs eagerly (4.7x slower at 3B on an H200, issue 17): the engine reads
  back what was captured (:func:`captured_decode_max_bs`) and says so once, as a warning, when a
  generation exceeds it.
- Multimodal (:func:`multimodal_args`, :func:`check_multimodal_ready`): SGLang turns multimodal
  *off* by default for Gemma 3 (``Gemma3ForConditionalGeneration``), Llama 4, Step3-VL and Inkling
  unless ``enable_multimodal=True`` is passed (``configs/model_config.py:307-322`` in 0.5.16: "Multimodal
  is disabled for gemma3"). Then its TokenizerManager has no multimodal processor
  (``managers/tokenizer_manager.py:361-386``: ``mm_processor = None``) and drops ``image_data``
  without a word (l. 874-878): the prompt is tokenized as text, the vision tower never runs, and a
  push of new vision weights changes nothing (what the 2026-12-03 GPU run of
  ``scripts/gpu/multimodal.py --engine sglang`` saw). A vision-language engine passes
  ``enable_multimodal=True``, and a generation with images on an engine without the processor is
  refused.
- ``dtype="float32"``: 0.5.16 picks fa3 on Hopper whatever the dtype (``server_args.py:4880-4914``)
  and FlashAttention-3 has fp16 / bf16 (and fp8) kernels only, so float32 engines get the triton
  attention backend (:func:`attention_args`). ``dtype="auto"`` would turn a float32 config into
  float16 (``configs/model_config.py:1633-1635``), which is why the engine always passes a dtype.
"""

from __future__ import annotations

import contextlib
import dataclasses
import faulthandler
import logging
import logging.handlers
import multiprocessing
import os
import re
import signal
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from ._sglang_buckets import BucketEntry

#: The SGLang releases this engine supports (the lower bound of ``lightrft-engines[sglang]``).
MIN_VERSION = (0, 5, 12)
#: The newest release whose sources this module was checked against.
NEWEST_CHECKED = (0, 5, 23)

INSTALL_HINT = "`uv add 'lightrft-engines[sglang]'` (or `pip install 'lightrft-engines[sglang]'`)"


def parse_version(text: str) -> tuple[int, int, int]:
    """``"0.5.15.post1"`` -> ``(0, 5, 15)``; raises on anything that does not start with x.y.z."""
    m = re.match(r"^\s*(\d+)\.(\d+)\.(\d+)", text)
    if m is None:
        raise ValueError(f"cannot read an SGLang version from {text!r}: expected 'X.Y.Z...'")
    return int(m[1]), int(m[2]), int(m[3])


def version_text(v: Sequence[int]) -> str:
    return ".".join(str(x) for x in v)


def memory_tags(version: Sequence[int]) -> list[str]:
    """The tags ``release_memory_occupation`` knows in this version: weights, KV cache and, from
    0.5.5, CUDA graphs."""
    tags = ["weights", "kv_cache"]
    if tuple(version) >= (0, 5, 5):
        tags.append("cuda_graph")
    return tags


def has_update_session(engine: Any) -> bool:
    """Whether weight updates must run inside ``begin_weight_update`` / ``end_weight_update``
    (SGLang 0.5.21+; the methods do not exist before)."""
    return callable(getattr(engine, "begin_weight_update", None)) and callable(
        getattr(engine, "end_weight_update", None)
    )


def result_ok(result: Any) -> tuple[bool, str]:
    """``(success, message)`` from what an SGLang control call returned: a ``(bool, str)`` tuple
    (weight updates, sessions), an object with ``success`` (``flush_cache``), a bool, or None
    (release / resume return nothing and raise on failure)."""
    if result is None:
        return True, ""
    if isinstance(result, tuple) and result and isinstance(result[0], bool):
        return result[0], str(result[1]) if len(result) > 1 else ""
    success = getattr(result, "success", None)
    if success is not None:  # FlushCacheReqOutput and the like
        return bool(success), str(getattr(result, "message", "") or "")
    if isinstance(result, bool):
        return result, ""
    return True, ""


def prefill_graph_args(
    server_fields: frozenset[str], enable_memory_saver: bool, user_kwargs: Mapping[str, Any]
) -> dict[str, Any]:
    """The ``Engine`` arguments that turn prefill CUDA graphs off when the memory saver is on (see
    the module docstring for why), in the spelling this version has; empty when the saver is off,
    when the caller chose a prefill graph setting, or when the version has neither knob."""
    chosen = {"cuda_graph_backend_prefill", "disable_prefill_cuda_graph", "cuda_graph_config"}
    chosen |= {"disable_piecewise_cuda_graph", "enforce_piecewise_cuda_graph", "disable_cuda_graph"}
    if not enable_memory_saver or chosen & set(user_kwargs):
        return {}
    if "cuda_graph_backend_prefill" in server_fields:  # 0.5.16+
        return {"cuda_graph_backend_prefill": "disabled"}
    if "disable_piecewise_cuda_graph" in server_fields:  # 0.5.12 - 0.5.15
        return {"disable_piecewise_cuda_graph": True}
    return {}


def idle_args(server_fields: frozenset[str], user_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """``sleep_on_idle=True`` where this version has it and the caller did not choose: SGLang's
    scheduler otherwise polls its sockets without blocking and runs its idle bookkeeping in a loop,
    holding one CPU core at 100 % for as long as the engine is up. A colocated engine idles through
    every train step (asleep or not), so that core is taken from the trainer's host thread. With it
    the scheduler waits in ``zmq.Poller.poll``, which returns as soon as a request arrives."""
    if "sleep_on_idle" not in server_fields or "sleep_on_idle" in user_kwargs:
        return {}
    return {"sleep_on_idle": True}


def eager_args(server_fields: frozenset[str]) -> dict[str, Any]:
    """``Engine`` arguments for no CUDA graphs at all (``engine_enforce_eager``)."""
    out: dict[str, Any] = {"disable_cuda_graph": True}
    if "cuda_graph_backend_prefill" in server_fields:
        out["cuda_graph_backend_prefill"] = "disabled"
    elif "disable_piecewise_cuda_graph" in server_fields:
        out["disable_piecewise_cuda_graph"] = True
    return out


#: What ``torchrun`` (torch.distributed.elastic's local agent) exports into each worker. None of it
#: may reach SGLang's schedulers (see the module docstring: TORCHELASTIC_USE_AGENT_STORE).
TORCHRUN_ENV_VARS = (
    "TORCHELASTIC_USE_AGENT_STORE",
    "TORCHELASTIC_RESTART_COUNT",
    "TORCHELASTIC_MAX_RESTARTS",
    "TORCHELASTIC_RUN_ID",
    "TORCHELASTIC_ERROR_FILE",
    "RANK",
    "LOCAL_RANK",
    "GROUP_RANK",
    "ROLE_RANK",
    "ROLE_NAME",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "GROUP_WORLD_SIZE",
    "ROLE_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
)
#: Decode CUDA-graph batch sizes captured at most / at least (SGLang's own default on an 80 GB GPU
#: is 256, ``server_args.py:3957-3964`` in 0.5.16).
DECODE_GRAPH_MAX_BS = 256
DECODE_GRAPH_MIN_BS = 8
#: Arguments by which a caller chooses the decode CUDA graphs himself.
_DECODE_GRAPH_CHOICES = frozenset(
    {
        "cuda_graph_max_bs",
        "cuda_graph_max_bs_decode",
        "cuda_graph_bs",
        "cuda_graph_bs_decode",
        "cuda_graph_config",
        "disable_cuda_graph",
        "disable_decode_cuda_graph",
        "cuda_graph_backend_decode",
    }
)


def scheduler_env(
    environ: Mapping[str, str], logging_config_path: str | None = None
) -> dict[str, str | None]:
    """The environment changes (None: remove) that ``Engine()`` must run under so that its
    schedulers start outside torchrun's world: torchrun's variables removed, SGLang's logging
    pointed at ``logging_config_path``."""
    out: dict[str, str | None] = {k: None for k in TORCHRUN_ENV_VARS if k in environ}
    if logging_config_path is not None:
        out["SGLANG_LOGGING_CONFIG_PATH"] = logging_config_path
    return out


@contextlib.contextmanager
def scoped_env(changes: Mapping[str, str | None]) -> Iterator[None]:
    """Applies ``changes`` to ``os.environ`` (None removes) and restores the previous values."""

    def apply(values: Mapping[str, str | None]) -> None:
        for k, v in values.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

    saved = {k: os.environ.get(k) for k in changes}
    try:
        apply(changes)
        yield
    finally:
        apply(saved)


def logging_config(log_path: str, console_level: str) -> dict[str, Any]:
    """The ``dictConfig`` for ``SGLANG_LOGGING_CONFIG_PATH``: the ``sglang`` logger to
    ``log_path`` (INFO and above, rotated at 20 MB) and to stderr at ``console_level``, the live
    push's loader (``_sglang_live``, in the scheduler) to the same file; other loggers (the
    training process's) are left alone."""
    level = console_level.upper()
    fmt = "[%(asctime)s %(processName)s pid=%(process)d] %(levelname)s %(name)s: %(message)s"
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"sglang": {"format": fmt, "datefmt": "%H:%M:%S"}},
        "handlers": {
            "file": {
                "()": "lightrft.engines._sglang_compat.scheduler_file_handler",
                "filename": log_path,
                "level": "INFO",
                "formatter": "sglang",
            },
            "console": {
                "class": "logging.StreamHandler",
                "stream": "ext://sys.stderr",
                "level": level,
                "formatter": "sglang",
            },
        },
        "loggers": {
            "sglang": {
                "level": "DEBUG" if level == "DEBUG" else "INFO",
                "handlers": ["file", "console"],
                "propagate": False,
            },
            # The live push's loader runs in the scheduler: its lines go to the same file.
            "lightrft.engines._sglang_live": {"level": "INFO", "handlers": ["file"], "propagate": False},
        },
    }


#: Files faulthandler writes to in this process (kept open for the process's life).
_STACK_FILES: list[Any] = []


def scheduler_file_handler(filename: str) -> logging.Handler:
    """The file handler of :func:`logging_config` (built by ``dictConfig`` in SGLang's processes).
    In a spawned child (a scheduler, the detokenizer) it also sends faulthandler's dumps to
    ``<filename>.stacks``; the engine's own process keeps its faulthandler as it was."""
    handler = logging.handlers.RotatingFileHandler(filename, maxBytes=20 << 20, backupCount=1)
    if multiprocessing.parent_process() is not None and not _STACK_FILES:
        stacks = open(filename + ".stacks", "a", buffering=1)  # noqa: SIM115  (open for the process's life)
        _STACK_FILES.append(stacks)
        faulthandler.enable(file=stacks, all_threads=True)
    return handler


def rl_decode_graph_max_bs(concurrency: int) -> int:
    """The largest decode batch to capture a CUDA graph for: the next power of two >= the requests
    an RL engine runs at once, within [DECODE_GRAPH_MIN_BS, DECODE_GRAPH_MAX_BS]."""
    bs = 1 << max(0, int(concurrency) - 1).bit_length()
    return max(DECODE_GRAPH_MIN_BS, min(DECODE_GRAPH_MAX_BS, bs))


def decode_graph_args(
    server_fields: frozenset[str], max_bs: int | None, user_kwargs: Mapping[str, Any]
) -> dict[str, Any]:
    """:func:`decode_graph_batch_args` unless the caller chose the decode graphs himself, or
    ``max_bs`` is None (SGLang's own range)."""
    if max_bs is None or _DECODE_GRAPH_CHOICES & set(user_kwargs):
        return {}
    return decode_graph_batch_args(server_fields, max_bs)


def captured_decode_max_bs(resolved: Any, passed: Mapping[str, Any]) -> int | None:
    """The largest decode batch that has a CUDA graph: from SGLang's resolved ``ServerArgs``
    (``Engine.server_args``, where it has filled in its defaults) when it names one, else from the
    arguments the engine was started with. 0: decode graphs are off; None: not known."""
    for source in (resolved, passed):
        if source is None:
            continue
        get = source.get if isinstance(source, Mapping) else (lambda k, s=source: getattr(s, k, None))
        if get("disable_cuda_graph") or get("disable_decode_cuda_graph"):
            return 0
        for name in ("cuda_graph_max_bs_decode", "cuda_graph_max_bs"):
            value = get(name)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
        for name in ("cuda_graph_bs_decode", "cuda_graph_bs"):
            sizes = get(name)
            if isinstance(sizes, (list, tuple)) and sizes:
                return int(max(sizes))
    return None


def attention_args(dtype_name: str, user_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """``attention_backend="triton"`` for a float32 engine (fa3, SGLang's Hopper default, has no
    float32 kernels); nothing when the caller chose a backend."""
    if dtype_name != "float32" or {"attention_backend", "decode_attention_backend"} & set(user_kwargs):
        return {}
    return {"attention_backend": "triton"}


def decode_graph_batch_args(server_fields: frozenset[str], max_bs: int) -> dict[str, Any]:
    """The ``Engine`` argument that caps the decode CUDA-graph batch sizes captured at start
    (fewer graphs: a faster start): ``cuda_graph_max_bs_decode`` from 0.5.16, ``cuda_graph_max_bs``
    before."""
    for name in ("cuda_graph_max_bs_decode", "cuda_graph_max_bs"):
        if name in server_fields:
            return {name: max_bs}
    return {}


def multimodal_args(
    server_fields: frozenset[str], multimodal: bool, user_kwargs: Mapping[str, Any]
) -> dict[str, Any]:
    """``enable_multimodal=True`` for a vision-language model (SGLang keeps it off for Gemma 3 by
    default: see the module docstring); nothing for a text-only model, when the caller chose, or
    when this version has no such field."""
    if not multimodal or "enable_multimodal" in user_kwargs or "enable_multimodal" not in server_fields:
        return {}
    return {"enable_multimodal": True}


def check_multimodal_ready(engine: Any) -> None:
    """Raises when the engine would drop images: its TokenizerManager (in this process) has no
    multimodal processor (multimodal off). Nothing when that cannot be seen (no such attribute)."""
    manager = getattr(engine, "tokenizer_manager", None)
    if manager is None or not hasattr(manager, "mm_processor") or manager.mm_processor is not None:
        return
    raise ValueError(
        "this SGLang engine runs with multimodal off (its TokenizerManager has no multimodal "
        "processor): it would ignore the images and read each prompt as text. Set up the engine "
        "with enable_multimodal=True (the default for a vision-language model; an "
        "enable_multimodal=False passed to setup_inference_engine turns it off)"
    )


class SGLangRuntime:
    """The real ``sglang`` package behind the calls the engine makes. Import it with
    :func:`load_runtime`."""

    def __init__(self, sglang: Any) -> None:
        self.sglang = sglang
        self.version = parse_version(getattr(sglang, "__version__", "0.0.0"))
        from sglang.srt.server_args import ServerArgs

        self.server_fields = _record_fields(ServerArgs)

    def create_engine(self, **server_args: Any) -> Any:
        """``sglang.Engine(**server_args)`` (starts the scheduler processes)."""
        from sglang.srt.entrypoints.engine import Engine

        return Engine(**server_args)

    def prepare_sender(self) -> None:
        """Patches torch's CUDA tensor reductions so IPC handles name the GPU by UUID (the sender
        side of ``update_weights_from_tensor``; SGLang patches its receivers itself)."""
        try:
            from sglang.srt.utils.patch_torch import monkey_patch_torch_reductions
        except ImportError:  # before 0.5.3
            from sglang.srt.patch_torch import monkey_patch_torch_reductions  # type: ignore[no-redef]
        monkey_patch_torch_reductions()

    def serialize_bucket(self, flat: torch.Tensor, entries: Sequence[BucketEntry]) -> Any:
        """One rank's payload for ``update_weights_from_tensor(load_format="flattened_bucket")``:
        the uint8 buffer (a CUDA IPC handle when on the GPU) and SGLang's own metadata records
        (its receivers unpickle only sglang and torch classes), base64 text."""
        from sglang.srt.utils import MultiprocessingSerializer
        from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorMetadata

        metadata = [
            FlattenedTensorMetadata(
                name=e.name,
                shape=torch.Size(e.shape),
                dtype=e.dtype,
                start_idx=e.start,
                end_idx=e.end,
                numel=e.end - e.start,
            )
            for e in entries
        ]
        return MultiprocessingSerializer.serialize(
            {"flattened_tensor": flat, "metadata": metadata}, output_str=True
        )


def load_runtime() -> SGLangRuntime:
    """Imports SGLang; a missing or too old installation raises an ImportError naming the extra."""
    try:
        import sglang
    except ImportError as e:
        raise ImportError(
            f"engine_type='sglang' needs SGLang {version_text(MIN_VERSION)} or newer: install {INSTALL_HINT}"
        ) from e
    runtime = SGLangRuntime(sglang)
    if runtime.version < MIN_VERSION:
        raise ImportError(
            f"SGLang {version_text(runtime.version)} is installed; engine_type='sglang' needs "
            f"{version_text(MIN_VERSION)} or newer: install {INSTALL_HINT}"
        )
    return runtime


def _record_fields(cls: Any) -> frozenset[str]:
    """Field names of ``ServerArgs``: a dataclass up to 0.5.20, a msgspec Struct from 0.5.21."""
    names = getattr(cls, "__struct_fields__", None)
    if names:
        return frozenset(names)
    if dataclasses.is_dataclass(cls):
        return frozenset(f.name for f in dataclasses.fields(cls))
    return frozenset(getattr(cls, "__annotations__", {}))


def disarm_process_killers(engine: Any, on_sigquit: Callable[[int, Any], None]) -> None:
    """Stops SGLang from killing the training process when one of its subprocesses dies.

    SGLang 0.5.x answers a dead scheduler with SIGQUIT to this process (its ``SubprocessWatchdog``,
    or the scheduler's own exception handler), and its SIGQUIT handlers (the launch-phase one of
    ``_set_envs_and_config``, the tokenizer manager's ``running_phase_sigquit_handler`` on its event
    loop) call ``kill_process_tree`` on this process: training state lost, no checkpoint. The
    engine watches its processes itself (``SGLangEngine``), so here the watchdog is stopped and
    SIGQUIT goes to ``on_sigquit``. Best effort on every version; main thread only (signals)."""
    manager = getattr(engine, "tokenizer_manager", None)
    watchdog = getattr(manager, "_subprocess_watchdog", None)
    if watchdog is not None and hasattr(watchdog, "stop"):
        try:
            watchdog.stop()
        except Exception:
            pass
    if threading.current_thread() is not threading.main_thread():
        return
    for loop in {
        id(x): x for x in (getattr(engine, "loop", None), getattr(manager, "event_loop", None))
    }.values():
        if loop is not None and hasattr(loop, "remove_signal_handler"):
            try:
                loop.remove_signal_handler(signal.SIGQUIT)
            except Exception:
                pass
    signal.signal(signal.SIGQUIT, on_sigquit)
