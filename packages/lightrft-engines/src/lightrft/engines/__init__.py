"""Rollout engines for the LightRFT Strategy API (found through the ``lightrft.engines`` entry points).

- ``hf``: :class:`HFEngine`, Hugging Face ``generate`` (the embedded default; extra ``[hf]``).

vLLM and SGLang adapters are planned; until then ``engine_type='vllm'`` / ``'sglang'`` raise an
ImportError naming the distribution.
"""

from .hf import HFEngine

__all__ = ["HFEngine"]
__version__ = "0.1.0"
