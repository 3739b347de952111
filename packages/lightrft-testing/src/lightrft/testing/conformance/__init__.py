"""The strategy conformance suite (see :class:`StrategyConformanceSuite`)."""

from .checks import BASE_CONFIG, CHECKS, run_checks
from .reference import reference_training
from .suite import StrategyConformanceSuite

__all__ = ["BASE_CONFIG", "CHECKS", "StrategyConformanceSuite", "reference_training", "run_checks"]
