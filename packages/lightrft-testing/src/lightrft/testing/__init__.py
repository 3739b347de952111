"""Test doubles and the conformance suite for LightRFT strategies.

- :class:`FakeStrategy`: the Strategy API in one process, no GPU, real arithmetic.
- :class:`FakeEngine`: an InferenceEngine generating greedily from pushed weights.
- :mod:`lightrft.testing.conformance`: the behavioural suite every strategy passes.
- :func:`run_distributed`: run a function on N gloo ranks under torchrun and collect results.
- :mod:`lightrft.testing.harness`: build, train, full parameters, shared temp dirs, reduction
  counts and an isolating check runner: the pieces of every multi-rank strategy test.
"""

from importlib.metadata import version as _distribution_version

from . import harness
from .distributed import RANK_THREADS, DistributedRunError, call, rank_threads, run_distributed
from .engine import FakeEngine
from .fake import FakeStrategy, NoEngineModelWarning, clone_model
from .models import (
    COLORS,
    IMAGE_PLACEHOLDER,
    PeftShapedModel,
    TinyCausalLM,
    TinyConfig,
    causal_lm_loss,
    make_batches,
    make_color_image,
    make_lora_like,
    make_sequential_lm,
    make_tiny_llama,
    make_tiny_model,
    make_tiny_vlm,
    make_tiny_vlm_tokenizer,
    vlm_batch,
    vlm_loss,
)


def get_fake_strategy(args=None, **overrides):  # noqa: ANN001, ANN201 - mirrors lightrft.strategy
    """Same as :func:`lightrft.strategy.get_fake_strategy`."""
    from lightrft.strategy import get_fake_strategy as _get

    return _get(args, **overrides)


__all__ = [
    "COLORS",
    "IMAGE_PLACEHOLDER",
    "RANK_THREADS",
    "DistributedRunError",
    "FakeEngine",
    "FakeStrategy",
    "NoEngineModelWarning",
    "PeftShapedModel",
    "TinyCausalLM",
    "TinyConfig",
    "call",
    "causal_lm_loss",
    "clone_model",
    "get_fake_strategy",
    "harness",
    "make_batches",
    "make_color_image",
    "make_lora_like",
    "make_sequential_lm",
    "make_tiny_llama",
    "make_tiny_model",
    "make_tiny_vlm",
    "make_tiny_vlm_tokenizer",
    "rank_threads",
    "run_distributed",
    "vlm_batch",
    "vlm_loss",
]
__version__ = _distribution_version("lightrft-testing")  # the version is written once: pyproject.toml
