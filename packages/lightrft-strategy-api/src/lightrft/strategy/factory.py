"""``get_strategy``: from args or a StrategyConfig to a ready strategy, backend found by name."""

from __future__ import annotations

from typing import Any

from lightrft.config import StrategyConfig

from .base import StrategyBase
from .registry import check_engine_name, load_strategy_class


def get_strategy(args: Any = None, **overrides: Any) -> StrategyBase:
    """Builds the strategy named by ``args.strategy`` (or the legacy ``args.fsdp`` flag) and sets
    up distributed training. ``args``: an argparse Namespace, a dict, a StrategyConfig or any
    object with attributes; unknown keys stay readable through ``strategy.get_extra_arg``.

    Both names are checked here, before anything is built: an unknown ``strategy`` or
    ``engine_type`` raises ValueError listing what is installed."""
    config = StrategyConfig.from_args(args if args is not None else {})
    if overrides:
        config = StrategyConfig.from_args({**config.model_dump(), **(config.model_extra or {}), **overrides})
    cls = load_strategy_class(config.backend)
    check_engine_name(config.engine_type)
    strategy = cls(config, args=args)
    strategy.setup_distributed()
    return strategy


def get_fake_strategy(args: Any = None, **overrides: Any) -> StrategyBase:
    """A :class:`lightrft.testing.FakeStrategy`: the same loop in one process, without GPUs. Found
    through the registry (the ``fake`` entry point of lightrft-testing), as every backend is;
    without lightrft-testing the ImportError says to install it."""
    try:
        cls = load_strategy_class("fake")
    except ImportError as e:  # not installed, or its import failed (the cause is chained)
        raise ImportError(
            "get_fake_strategy() needs the lightrft-testing distribution: `uv add lightrft-testing` "
            "(or `pip install lightrft-testing`)"
        ) from e
    config = StrategyConfig.from_args(args if args is not None else {})
    check_engine_name(overrides.get("engine_type", config.engine_type))
    strategy = cls(config, args=args, **overrides)
    strategy.setup_distributed()
    return strategy
