"""The strategy conformance suite (see :class:`StrategyConformanceSuite`)."""

from .checks import BASE_CONFIG, CHECKS, run_checks
from .reference import reference_training
from .suite import StrategyConformanceSuite, check_results

__all__ = [
    "BASE_CONFIG",
    "CHECKS",
    "StrategyConformanceSuite",
    "check_results",
    "reference_training",
    "run_checks",
]
