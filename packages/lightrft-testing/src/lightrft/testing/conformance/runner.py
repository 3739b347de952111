"""The rank side of the conformance suite: builds the strategy by name and measures every
capability it offers, each isolated (:func:`lightrft.testing.harness.run_isolated`)."""

from __future__ import annotations

import contextlib
from typing import Any

from lightrft.strategy import StrategyBase, get_strategy
from lightrft.strategy.registry import load_strategy_class

from ..distributed import rank_threads
from ..harness import run_isolated
from . import (
    accumulation,
    checkpoint,
    collectives,
    ema,
    meta_init,
    misuse,
    no_sync,
    non_finite,
    parity,
    save_model,
    weight_sync,
)
from .spec import BASE_CONFIG, Capability

#: Every capability of the suite, in the order a run measures them.
CAPABILITIES: tuple[Capability, ...] = tuple(
    m.CAPABILITY
    for m in (
        accumulation,
        no_sync,
        parity,
        non_finite,
        checkpoint,
        save_model,
        collectives,
        ema,
        weight_sync,
        misuse,
        meta_init,
    )
)
#: ``{name: measure}`` of every capability.
CHECKS = {c.name: c.measure for c in CAPABILITIES}


def run_checks(
    strategy_name: str, config: dict[str, Any] | None = None, checks: list[str] | None = None
) -> dict[str, Any]:
    """Measures ``checks`` (default: every capability the strategy offers) on
    ``get_strategy(strategy=strategy_name, ...)``, a fresh strategy for each, on this rank.
    Returns ``{name: {"ok": True, "result": ...} | {"ok": False, "error": traceback}}``; a capability
    the strategy does not offer has no entry."""
    strategies: list[StrategyBase] = []
    results = _measure(strategy_name, config, checks, strategies)
    _shutdown(strategies)
    return results


def run_check_sets(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Several :func:`run_checks` in one launch, in turn: ``runs`` holds ``{"strategy_name",
    "config"}`` items (every check of each); returns their results in that order. Each check still
    gets a fresh strategy; they all share the launch's process group, shut down once at the end
    (a launch of DeepSpeed ranks costs ~20 s of CPU in imports alone: one per configuration
    would repeat it)."""
    strategies: list[StrategyBase] = []
    out = [_measure(r["strategy_name"], r.get("config"), None, strategies) for r in runs]
    _shutdown(strategies)
    return out


def _shutdown(strategies: list[StrategyBase]) -> None:
    if strategies:  # they share one process group: shut it down once
        with contextlib.suppress(Exception):
            strategies[-1].shutdown()


def _measure(
    strategy_name: str,
    config: dict[str, Any] | None,
    checks: list[str] | None,
    strategies: list[StrategyBase],
) -> dict[str, Any]:
    unknown = sorted(set(checks or ()) - set(CHECKS))
    if unknown:
        raise ValueError(f"checks={unknown} are unknown: valid are {sorted(CHECKS)}")
    cfg = {**BASE_CONFIG, **(config or {}), "strategy": strategy_name}
    cls = load_strategy_class(strategy_name)

    def measure(capability: Capability) -> dict[str, Any]:
        strategy = get_strategy(cfg)
        strategies.append(strategy)
        return capability.measure(strategy)

    selected = [c for c in CAPABILITIES if (checks is None or c.name in checks) and c.offered_by(cls)]
    # The ranks' thread count also where the test process itself measures (the fake reference).
    with rank_threads():
        return run_isolated([(c.name, lambda c=c: measure(c)) for c in selected])
