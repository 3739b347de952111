"""``python -m lightrft_demo``: what torchrun starts on every rank."""

import sys

from .cli import main

if __name__ == "__main__":  # engines that spawn processes (SGLang) import the main module again
    sys.exit(main())
