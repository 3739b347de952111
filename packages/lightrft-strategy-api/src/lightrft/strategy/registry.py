"""Backends and engines announce themselves through entry points; this module finds them.

The API package never imports a backend at module level: a name is resolved to a class only when
``get_strategy`` (or ``setup_inference_engine``) asks for it.
"""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any

STRATEGY_GROUP = "lightrft.strategies"
ENGINE_GROUP = "lightrft.engines"

#: The distribution that provides each first-party backend, for the "install it" hint.
KNOWN_STRATEGIES: dict[str, str] = {
    "deepspeed": "lightrft-deepspeed",
    "fsdp": "lightrft-fsdp",
    "fake": "lightrft-testing",
}
#: The distribution (with extra) that provides each first-party engine.
KNOWN_ENGINES: dict[str, str] = {
    "hf": "lightrft-engines[hf]",
    "vllm": "lightrft-engines[vllm]",
    "sglang": "lightrft-engines[sglang]",
    "fake": "lightrft-testing",
}

_registered: dict[str, dict[str, Any]] = {STRATEGY_GROUP: {}, ENGINE_GROUP: {}}


def register_strategy(name: str, cls: Any) -> None:
    """Registers a strategy class under ``name`` for this process (entry points need no call)."""
    _registered[STRATEGY_GROUP][name] = cls


def register_engine(name: str, cls: Any) -> None:
    """Registers an inference-engine class under ``name`` for this process."""
    _registered[ENGINE_GROUP][name] = cls


def _entry_points(group: str) -> dict[str, Any]:
    return {ep.name: ep for ep in entry_points(group=group)}


def available(group: str) -> list[str]:
    """Names that can be loaded now in ``group`` (installed entry points and registered classes)."""
    return sorted(set(_entry_points(group)) | set(_registered[group]))


def _load(group: str, name: str, known: dict[str, str], kind: str, field: str) -> Any:
    if name in _registered[group]:
        return _registered[group][name]
    eps = _entry_points(group)
    if name in eps:
        # An ImportError raised while loading an installed backend is a real error: let it through.
        return eps[name].load()
    if name in known:
        raise ImportError(
            f"The {kind} {name!r} (StrategyConfig.{field}={name!r}) is provided by the distribution "
            f"{known[name]!r}, which is not installed. Install it with `uv add {known[name]}` "
            f"(or `pip install {known[name]}`)."
        )
    names = ", ".join(repr(n) for n in available(group)) or "none installed"
    raise ValueError(
        f"Unknown {kind} StrategyConfig.{field}={name!r}. Available: {names}; first-party {kind}s: "
        f"{', '.join(repr(n) for n in known)}."
    )


def load_strategy_class(name: str) -> Any:
    """Returns the strategy class registered as ``name``."""
    return _load(STRATEGY_GROUP, name, KNOWN_STRATEGIES, "strategy", "strategy")


def load_engine_class(name: str) -> Any:
    """Returns the inference-engine class registered as ``name``."""
    return _load(ENGINE_GROUP, name, KNOWN_ENGINES, "engine", "engine_type")
