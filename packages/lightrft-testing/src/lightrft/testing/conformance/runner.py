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
    unknown = sorted(set(checks or ()) - set(CHECKS))
    if unknown:
        raise ValueError(f"checks={unknown} are unknown: valid are {sorted(CHECKS)}")
    cfg = {**BASE_CONFIG, **(config or {}), "strategy": strategy_name}
    cls = load_strategy_class(strategy_name)
    strategies: list[StrategyBase] = []

    def measure(capability: Capability) -> dict[str, Any]:
        strategy = get_strategy(cfg)
        strategies.append(strategy)
        return capability.measure(strategy)

    selected = [c for c in CAPABILITIES if (checks is None or c.name in checks) and c.offered_by(cls)]
    # The ranks' thread count also where the test process itself measures (the fake reference).
    with rank_threads():
        results = run_isolated([(c.name, lambda c=c: measure(c)) for c in selected])
    if strategies:  # they share one process group: shut it down once
        with contextlib.suppress(Exception):
            strategies[-1].shutdown()
    return results
