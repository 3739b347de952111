"""Makes the test helpers importable by the torchrun children of ``run_distributed``."""

from __future__ import annotations

import os
import sys
from pathlib import Path

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
_paths = os.environ.get("PYTHONPATH", "").split(os.pathsep) if os.environ.get("PYTHONPATH") else []
if _HERE not in _paths:
    os.environ["PYTHONPATH"] = os.pathsep.join([_HERE, *_paths])
