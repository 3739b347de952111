"""Backends and engines announce themselves through entry points; this module finds them.

The API package never imports a backend at module level: a name is resolved to a class only when
``get_strategy`` (or ``setup_inference_engine``) asks for it.
"""

from __future__ import annotations

import difflib
import re
from importlib.metadata import PackageNotFoundError, distribution, entry_points
from typing import Any

STRATEGY_GROUP = "lightrft.strategies"
ENGINE_GROUP = "lightrft.engines"

#: The distribution that provides each first-party backend, for the "install it" hint.
KNOWN_STRATEGIES: dict[str, str] = {
    "deepspeed": "lightrft-deepspeed",
    "fsdp": "lightrft-fsdp",
    "fake": "lightrft-testing",
}
#: The distribution that provides each first-party engine.
KNOWN_ENGINES: dict[str, str] = {
    "hf": "lightrft-engines",
    "vllm": "lightrft-engines",
    "sglang": "lightrft-engines",
    "fake": "lightrft-testing",
}
#: The extra of the engine's distribution that installs an engine's own dependency, and that
#: dependency (named instead when the extra does not exist).
ENGINE_EXTRAS: dict[str, tuple[str, str]] = {
    "hf": ("hf", "transformers"),
    "vllm": ("vllm", "vllm"),
    "sglang": ("sglang", "sglang"),
}
#: The extras that lightrft-engines declares (``[project.optional-dependencies]`` in its
#: pyproject.toml; a test keeps the two equal). Used for the hint when lightrft-engines is not
#: installed; an installed lightrft-engines is asked directly.
ENGINE_DISTRIBUTION_EXTRAS: frozenset[str] = frozenset({"hf"})

_PLURAL = {"strategy": "strategies", "engine": "engines"}

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


def _installed_extras(dist: str) -> set[str] | None:
    """The extras an installed distribution declares; None when it is not installed."""
    try:
        declared = distribution(dist).metadata.get_all("Provides-Extra") or []
    except PackageNotFoundError:
        return None
    # Metadata 2.1+ normalises extra names (PEP 685); compare in that form.
    return {re.sub(r"[-_.]+", "-", e).lower() for e in declared}


def _installed_version(dist: str) -> str | None:
    try:
        return distribution(dist).version
    except PackageNotFoundError:
        return None


def engine_requirement(name: str) -> str:
    """What to install for the first-party engine ``name``, as arguments of ``uv add`` / ``pip
    install``: ``'lightrft-engines[hf]'`` where that extra exists, else the distribution and the
    engine's own package (``lightrft-engines vllm``), so the hint always names something that
    installs."""
    dist = KNOWN_ENGINES[name]
    if name not in ENGINE_EXTRAS:
        return dist
    extra, package = ENGINE_EXTRAS[name]
    extras = _installed_extras(dist)
    if extras is None:
        extras = set(ENGINE_DISTRIBUTION_EXTRAS) if dist == "lightrft-engines" else set()
    return f"'{dist}[{extra}]'" if extra in extras else f"{dist} {package}"


def _unknown(group: str, name: str, known: dict[str, str], kind: str, field: str) -> ValueError:
    installed = available(group)
    names = ", ".join(repr(n) for n in installed) or "none installed"
    close = difflib.get_close_matches(name, sorted(set(installed) | set(known)), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return ValueError(
        f"Unknown {kind} StrategyConfig.{field}={name!r}.{hint} Installed: {names}; first-party "
        f"{_PLURAL[kind]}: {', '.join(repr(n) for n in known)}."
    )


def _load(group: str, name: str, known: dict[str, str], kind: str, field: str) -> Any:
    if name in _registered[group]:
        return _registered[group][name]
    eps = _entry_points(group)
    if name in eps:
        # An ImportError raised while loading an installed backend is a real error: let it through.
        return eps[name].load()
    if name not in known:
        raise _unknown(group, name, known, kind, field)
    dist = known[name]
    requirement = engine_requirement(name) if group == ENGINE_GROUP else dist
    version = _installed_version(dist)
    if version is None:
        raise ImportError(
            f"The {kind} {name!r} (StrategyConfig.{field}={name!r}) is provided by the distribution "
            f"{dist!r}, which is not installed. Install it with `uv add {requirement}` "
            f"(or `pip install {requirement}`)."
        )
    provided = sorted(ep.name for ep in distribution(dist).entry_points if ep.group == group)
    raise ImportError(
        f"The {kind} {name!r} (StrategyConfig.{field}={name!r}) is not provided by the installed "
        f"{dist} {version} (its {_PLURAL[kind]}: {', '.join(map(repr, provided)) or 'none'}). "
        f"Upgrade it to a release that provides {name!r}: "
        f"`uv add --upgrade-package {dist} {requirement}`."
    )


def load_strategy_class(name: str) -> Any:
    """Returns the strategy class registered as ``name``."""
    return _load(STRATEGY_GROUP, name, KNOWN_STRATEGIES, "strategy", "strategy")


def load_engine_class(name: str) -> Any:
    """Returns the inference-engine class registered as ``name``."""
    return _load(ENGINE_GROUP, name, KNOWN_ENGINES, "engine", "engine_type")


def check_engine_name(name: str) -> None:
    """Raises ValueError, listing the installed engines, when ``name`` is neither installed,
    registered nor a first-party engine (a typo such as ``engine_type="vlm"``). A first-party
    engine that is not installed passes: training needs no engine, and
    :func:`load_engine_class` names what to install when the engine is created."""
    if name in _registered[ENGINE_GROUP] or name in KNOWN_ENGINES or name in _entry_points(ENGINE_GROUP):
        return
    raise _unknown(ENGINE_GROUP, name, KNOWN_ENGINES, "engine", "engine_type")
