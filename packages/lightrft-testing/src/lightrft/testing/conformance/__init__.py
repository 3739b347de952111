"""The strategy conformance suite: one module per capability (what it measures on every rank and
what it asserts), :class:`StrategyConformanceSuite` to subclass in a backend's tests, and
:func:`run_checks`, the rank-side entry point."""

from .reference import reference_training
from .runner import CAPABILITIES, CHECKS, run_check_sets, run_checks
from .spec import BASE_CONFIG, DATA_SEED, MODEL_SEED, STEPS, Capability, overrides
from .suite import StrategyConformanceSuite, check_results

__all__ = [
    "BASE_CONFIG",
    "CAPABILITIES",
    "CHECKS",
    "DATA_SEED",
    "MODEL_SEED",
    "STEPS",
    "Capability",
    "StrategyConformanceSuite",
    "check_results",
    "overrides",
    "reference_training",
    "run_check_sets",
    "run_checks",
]
