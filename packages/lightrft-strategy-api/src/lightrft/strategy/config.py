"""Re-export of :class:`lightrft.config.StrategyConfig` under the documented import path."""

from lightrft.config import ConfigError, StrategyConfig

__all__ = ["ConfigError", "StrategyConfig"]
