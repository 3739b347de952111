"""How a rank-side function named ``"package.module:qualname"`` is found (shared by the ranks of
:func:`lightrft.testing.run_distributed` and by :func:`lightrft.testing.call`)."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from typing import Any


def resolve(target: str, source_file: str | None = None) -> Any:
    """The object named by ``"package.module:qualname"``: imported by name; where the name does not
    import (a test module that pytest imported by path), loaded from ``source_file``."""
    module_name, qualname = target.split(":", 1)
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        missing = e.name or ""
        if not source_file or not (module_name == missing or module_name.startswith(missing + ".")):
            raise
        spec = importlib.util.spec_from_file_location(module_name, source_file)
        if spec is None or spec.loader is None:
            raise
        obj = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = obj
        spec.loader.exec_module(obj)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj
