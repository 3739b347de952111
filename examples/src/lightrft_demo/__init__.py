"""lightrft-demo: a GRPO run on the LightRFT Strategy API with progress, a reward curve and resume.

Run it as ``lightrft-demo`` (or ``python -m lightrft_demo``); ``lightrft_demo.read_metrics`` reads a
run's ``metrics.jsonl`` back for plotting.
"""

from .metrics import read_metrics

__all__ = ["read_metrics"]
