"""Importing the API pulls no backend, engine or heavy optional dependency."""

import json
import subprocess
import sys


def test_import_pulls_no_backend_or_engine():
    code = (
        "import sys, json\n"
        "from lightrft.strategy import get_strategy, get_fake_strategy, StrategyBase\n"
        "from lightrft.strategy.config import StrategyConfig\n"
        "heavy = ('deepspeed', 'vllm', 'sglang', 'transformers', 'lightrft.fsdp', 'lightrft.deepspeed',"
        " 'lightrft.engines', 'lightrft.testing')\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith(heavy))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_no_namespace_init_file():
    import lightrft

    # PEP 420: a namespace package has no __file__ and may span several distributions.
    assert getattr(lightrft, "__file__", None) is None
