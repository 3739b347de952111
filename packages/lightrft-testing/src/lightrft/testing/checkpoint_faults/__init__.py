"""Fault injection for checkpoints: damaged files and ranks killed in the middle of ``save_ckpt``.

- :func:`damage` truncates, deletes or corrupts one file; :func:`damage_cases` lists one file of
  each kind a checkpoint holds (DCP shard and ``.metadata``, per-rank state, DeepSpeed optimizer
  states, ``fake_state.pt``, the manifest...).
- :func:`check_damaged_loads` (on every rank) damages a copy of a good checkpoint in each way and
  records what ``load_ckpt`` raised on each rank and whether the model, optimizer, dataloader and
  RNG stayed untouched.
- :func:`run_crash_trials` (one process; ``python -m lightrft.testing.checkpoint_faults``) runs
  trials in which every rank is forked from it (imports paid once): load the newest checkpoint,
  train, save, train, save again while one rank SIGKILLs itself at a random point of that save;
  the others are then killed, as torchrun does. Between trials it checks every published checkpoint.
These functions measure; the tests assert. :mod:`.damaged` holds the damaged loads,
:mod:`.crash` the crash trials, :mod:`.suite` the tests a backend subclasses.
"""

from .crash import PEER_LOST, crash_problems, lost_peer, main, run_crash_trials, sigkill_trial_problems
from .damaged import (
    HOWS,
    check_damaged_loads,
    damage,
    damage_cases,
    damage_problems,
    expected_words,
    file_kinds,
)

__all__ = [
    "HOWS",
    "PEER_LOST",
    "check_damaged_loads",
    "crash_problems",
    "damage",
    "damage_cases",
    "damage_problems",
    "expected_words",
    "file_kinds",
    "lost_peer",
    "main",
    "run_crash_trials",
    "sigkill_trial_problems",
]
