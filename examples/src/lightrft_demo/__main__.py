"""``python -m lightrft_demo``: what torchrun starts on every rank."""

import sys

from .cli import main

sys.exit(main())
