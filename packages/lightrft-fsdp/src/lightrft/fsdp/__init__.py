"""FSDP2 backend of the LightRFT Strategy API: ``get_strategy({"strategy": "fsdp", ...})``."""

from .strategy import FSDPV2Strategy

__all__ = ["FSDPV2Strategy"]
__version__ = "0.1.0"
