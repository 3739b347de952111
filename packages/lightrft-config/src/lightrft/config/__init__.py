"""Typed, validated configuration of LightRFT training strategies.

```python
from lightrft.config import StrategyConfig, ConfigError

config = StrategyConfig.from_args(args)  # argparse.Namespace, dict, dataclass, any object
config.backend                           # "deepspeed", "fsdp", "fake", ...
```

Packages that validate configuration of their own (e.g. lightrft-deepspeed's ``deepspeed_config``)
report it the same way with :func:`problem` / :func:`one_problem` and :class:`ConfigError`.
"""

from importlib.metadata import version as _distribution_version

from ._errors import ConfigError, Problem, format_value, one_problem, problem
from ._model import StrategyConfig

__all__ = ["ConfigError", "Problem", "StrategyConfig", "format_value", "one_problem", "problem"]
__version__ = _distribution_version("lightrft-config")  # the version is written once: pyproject.toml
