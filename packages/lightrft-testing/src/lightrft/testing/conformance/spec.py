"""What a capability of the conformance suite is: what it measures on every rank and what it asserts.

Each capability lives in one module of this package (``accumulation.py``, ``checkpoint.py``, ...)
holding both halves, langgraph checkpoint-conformance style: ``measure(strategy)`` runs inside every
rank and returns numbers; its ``test_*`` functions receive the suite (``suite.results(name)``: the
per-rank numbers, ``suite.fake(name)``: FakeStrategy's on the same configuration) and assert.

A capability with ``optional_method`` is offered only by strategies that override that method of
:class:`~lightrft.strategy.StrategyBase`: detected on the strategy class, never hand-listed; a
strategy that does not override it skips the capability's tests with that reason.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lightrft.strategy import StrategyBase

from ..models import make_tiny_model

MODEL_SEED = 1234
DATA_SEED = 99
#: Optimizer steps of the parity runs.
STEPS = 3
#: Defaults of the suite's runs: accumulation of 2 micro-steps on 2 ranks, clipping that bites.
BASE_CONFIG: dict[str, Any] = {
    "seed": 7,
    "train_batch_size": 8,
    "micro_train_batch_size": 2,
    "max_norm": 0.5,
    "bf16": False,
    "actor_learning_rate": 1e-2,
    "lr_warmup_ratio": 0.25,
    "lr_scheduler": "cosine_with_min_lr",
    "l2": 0.01,
    "engine_type": "fake",
}


@dataclass(frozen=True)
class Capability:
    """One behaviour of the Strategy API: how it is measured and what is asserted on it."""

    name: str
    #: Runs inside every rank on a fresh strategy; returns tensors, numbers, strings and containers.
    measure: Callable[[StrategyBase], dict[str, Any]]
    #: ``test_*(suite)`` functions: each becomes a test of :class:`StrategyConformanceSuite`.
    tests: tuple[Callable[[Any], None], ...]
    #: A StrategyBase method whose override means the strategy offers this capability (None: required).
    optional_method: str | None = None

    def offered_by(self, strategy_cls: type) -> bool:
        """Whether ``strategy_cls`` offers the capability (required ones: always)."""
        return self.optional_method is None or overrides(strategy_cls, self.optional_method)


def overrides(strategy_cls: type, method: str) -> bool:
    """Whether ``strategy_cls`` defines ``method`` differently from :class:`StrategyBase` (a method
    the base lacks counts as overridden where the class has it)."""
    base = getattr(StrategyBase, method, None)
    own = getattr(strategy_cls, method, None)
    return own is not None and own is not base


def tiny_model(seed: int = MODEL_SEED) -> Any:
    """The suite's model: TinyCausalLM, the same weights on every rank for a seed."""
    return make_tiny_model(seed)
