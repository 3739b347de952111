"""DeepSpeed (ZeRO 0-3) backend of the LightRFT Strategy API.

```python
from lightrft.strategy import get_strategy

strategy = get_strategy({"strategy": "deepspeed", "zero_stage": 3, "bf16": True})
```

Importing this package does not import DeepSpeed; building or using the strategy does.
"""

from importlib.metadata import version as _distribution_version

from .config import eval_config, eval_stage, train_config
from .strategy import DeepspeedStrategy

__all__ = ["DeepspeedStrategy", "eval_config", "eval_stage", "train_config"]
__version__ = _distribution_version("lightrft-deepspeed")  # the version is written once: pyproject.toml
