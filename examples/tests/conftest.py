"""Puts this directory on sys.path: the tests import their helpers (demo_testing) by bare name,
under --import-mode=importlib too."""

import sys
from pathlib import Path

HERE = str(Path(__file__).resolve().parent)
if HERE not in sys.path:
    sys.path.insert(0, HERE)
