"""The LightRFT Strategy API: one interface over DeepSpeed, FSDP2 and the fake backend.

Importing this package imports no backend, engine, deepspeed, vllm, sglang or transformers.
"""

from importlib.metadata import version as _distribution_version

from .base import StrategyBase, TrainState
from .config import ConfigError, StrategyConfig
from .data import ResumableDataLoader, ResumableDistributedSampler
from .engine import (
    EngineDiedError,
    EngineLifecycle,
    EngineNotSetUpWarning,
    GenerationOutput,
    InferenceEngine,
    SamplingParams,
    WeightBucket,
)
from .factory import get_fake_strategy, get_strategy
from .integrity import CheckpointError
from .registry import available, register_engine, register_strategy
from .weights import bucket_named_tensors, clean_param_name, plan_buckets

__all__ = [
    "CheckpointError",
    "ConfigError",
    "EngineDiedError",
    "EngineLifecycle",
    "EngineNotSetUpWarning",
    "GenerationOutput",
    "InferenceEngine",
    "ResumableDataLoader",
    "ResumableDistributedSampler",
    "SamplingParams",
    "StrategyBase",
    "StrategyConfig",
    "TrainState",
    "WeightBucket",
    "available",
    "bucket_named_tensors",
    "clean_param_name",
    "get_fake_strategy",
    "get_strategy",
    "plan_buckets",
    "register_engine",
    "register_strategy",
]
__version__ = _distribution_version("lightrft-strategy-api")  # the version is written once: pyproject.toml
