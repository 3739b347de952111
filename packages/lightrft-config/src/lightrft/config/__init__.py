"""Typed, validated configuration of LightRFT training strategies.

```python
from lightrft.config import StrategyConfig, ConfigError

config = StrategyConfig.from_args(args)  # argparse.Namespace, dict, dataclass, any object
config.backend                           # "deepspeed", "fsdp", "fake", ...
```
"""

from ._errors import ConfigError
from ._model import StrategyConfig

__all__ = ["ConfigError", "StrategyConfig"]
