"""The one sleep-mode vLLM engine a process may hold, and how a later engine reuses it.

vLLM's sleep mode allocates the weights and the KV cache through ``CuMemAllocator``, a process-wide
singleton (``vllm/device_allocator/cumem.py``: its C extension keeps one pair of callbacks). When a
second engine loads its weights, the worker asserts that the allocator holds nothing
(``gpu_worker.py``, ``_maybe_get_memory_pool_context``: "CuMem allocator can only be used for one
instance per process"); the first engine's allocations stay registered after its shutdown, so a
second sleep-mode engine in the same process fails (vLLM 0.26, H200).

What works instead: ``VLLMEngine.shutdown()`` of a sleep-mode engine *parks* it here: asleep at
level 2 (its weights and KV cache are unmapped; the device memory they held is free), the
``vllm.LLM`` kept. The next sleep-mode ``VLLMEngine`` of the same engine settings (the model's
config, dtype, lengths, parallelism, memory fraction, seed, ...: :func:`engine_key`) takes the
parked engine back, wakes it and loads the new model's weights into it. Different settings are
refused with an error that lists the differences and what works. The parked engine is shut down
for real when the process exits.
"""

from __future__ import annotations

import atexit
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

#: Engine arguments that do not have to match for a parked engine to be reused: where the model's
#: files are (a new temporary directory per engine). ``load_format`` must match: only an engine built
#: from ``model=`` ("dummy" weights, then a push) can take a parked engine's place.
_FREE_KEYS = frozenset({"model", "tokenizer"})


@dataclass
class Parked:
    """A sleep-mode ``vllm.LLM`` kept asleep (level 2) for the next engine of the same key."""

    llm: Any
    key: dict[str, Any]
    directory: str | None
    close: Callable[[], None]
    """Shuts the parked engine down for real (at exit, or when it is replaced)."""


_parked: Parked | None = None
_live: Any = None  # the VLLMEngine that holds the process's sleep-mode engine now
_atexit_registered = False


def engine_key(llm_kwargs: Mapping[str, Any], model_config: Mapping[str, Any] | None) -> dict[str, Any]:
    """What two engines must share for one to reuse the other's ``vllm.LLM``: every engine
    argument except where the files are, and the model's Hugging Face config."""
    key = {k: _plain(v) for k, v in sorted(llm_kwargs.items()) if k not in _FREE_KEYS}
    key["model_config"] = _plain(dict(model_config)) if model_config is not None else None
    return key


def differences(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    """``name: old -> new`` for every key that differs (the model config's keys one by one)."""
    out = []
    for k in sorted(set(a) | set(b)):
        if k == "model_config" and isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
            ca, cb = a[k], b[k]
            out += [
                f"config.{c}: {ca.get(c)!r} -> {cb.get(c)!r}"
                for c in sorted(set(ca) | set(cb))
                if ca.get(c) != cb.get(c)
            ]
        elif a.get(k) != b.get(k):
            out.append(f"{k}: {a.get(k)!r} -> {b.get(k)!r}")
    return out


def claim(owner: Any, key: dict[str, Any], version: str) -> Parked | None:
    """Called by a new sleep-mode engine before it builds a ``vllm.LLM``. Returns the parked
    engine to reuse when ``key`` matches (it is no longer parked), None when the process holds
    none, and raises when another engine is live or the parked one has other settings."""
    global _parked, _live
    if _live is not None and not getattr(_live, "closed", True):
        raise RuntimeError(
            f"vLLM {version} allows one sleep-mode engine per process (CuMemAllocator), and this "
            "process's engine is still running: shut it down first (strategy.engine_lifecycle.shutdown(); "
            "strategy.setup_inference_engine does it), then the new engine reuses it when its "
            "settings match; or set StrategyConfig.enable_engine_sleep=False for a second engine"
        )
    if _parked is None:
        _live = owner
        return None
    diff = differences(_parked.key, key)
    if diff:
        raise RuntimeError(
            f"vLLM {version} allows one sleep-mode engine per process (CuMemAllocator: a second one "
            "fails with 'CuMem allocator can only be used for one instance per process'). This process "
            "already built one, and the new engine differs from it in: "
            + "; ".join(diff[:8])
            + ("; ..." if len(diff) > 8 else "")
            + ". What works: an engine with the same settings and model architecture (it reuses the "
            "process's engine and loads the new weights), StrategyConfig.enable_engine_sleep=False for "
            "this engine, or a new process (e.g. resume from a checkpoint)"
        )
    parked, _parked = _parked, None
    _live = owner
    return parked


def park(owner: Any, parked: Parked) -> None:
    """Keeps ``parked`` for the next engine of the same key (shut down for real at exit)."""
    global _parked, _live, _atexit_registered
    if _live is owner:
        _live = None
    if _parked is not None:  # pragma: no cover - claim() refuses a second engine while one is parked
        _parked.close()
    _parked = parked
    if not _atexit_registered:
        atexit.register(release)
        _atexit_registered = True


def release() -> None:
    """Shuts the parked engine down for real (at exit; tests)."""
    global _parked
    parked, _parked = _parked, None
    if parked is not None:
        try:
            parked.close()
        except Exception:  # at exit: nothing left to tell
            pass


def forget(owner: Any) -> None:
    """``owner`` failed to start or was shut down without parking."""
    global _live
    if _live is owner:
        _live = None


def _plain(value: Any) -> Any:
    """A JSON-comparable form (dtypes, tuples and paths as text)."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))
