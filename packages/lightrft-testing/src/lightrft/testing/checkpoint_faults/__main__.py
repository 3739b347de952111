"""``python -m lightrft.testing.checkpoint_faults``: the crash trials (:func:`.crash.main`)."""

import sys

from .crash import main

sys.exit(main())
