"""Rollout engines for the LightRFT Strategy API (found through the ``lightrft.engines`` entry points).

- ``hf``: :class:`HFEngine`, Hugging Face ``generate`` (the embedded default; extra ``[hf]``).
- ``vllm``: ``lightrft.engines.vllm_engine.VLLMEngine`` (extra ``[vllm]``).
- ``sglang``: ``lightrft.engines.sglang.SGLangEngine`` (extra ``[sglang]``).

The vLLM and SGLang modules import their engine package only when an engine is built: without it,
building one raises an ImportError naming the extra to install.
"""

from importlib.metadata import version as _distribution_version

from .hf import HFEngine

__all__ = ["HFEngine"]
__version__ = _distribution_version("lightrft-engines")  # the version is written once: pyproject.toml
