"""Rollout engines for the LightRFT Strategy API (found through the ``lightrft.engines`` entry points).

- ``hf``: :class:`HFEngine`, Hugging Face ``generate`` (the embedded default; extra ``[hf]``).

vLLM and SGLang adapters are planned; until then ``engine_type='vllm'`` / ``'sglang'`` raise an
ImportError naming the distribution.
"""

from importlib.metadata import version as _distribution_version

from .hf import HFEngine

__all__ = ["HFEngine"]
__version__ = _distribution_version("lightrft-engines")  # the version is written once: pyproject.toml
