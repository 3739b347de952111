"""FSDP2 backend of the LightRFT Strategy API: ``get_strategy({"strategy": "fsdp", ...})``."""

from importlib.metadata import version as _distribution_version

from .strategy import FSDPV2Strategy

__all__ = ["FSDPV2Strategy"]
__version__ = _distribution_version("lightrft-fsdp")  # the version is written once: pyproject.toml
