"""The checkpoint-fault tests of a backend: subclass :class:`CheckpointFaultSuite` in its tests.

Two tests, on ``world_size`` gloo ranks: every damaged file fails the load on every rank with the
same CheckpointError; ranks killed at random points of ``save_ckpt`` never cost the newest complete
checkpoint nor an older one. The subclass says what its checkpoints hold (``file_kinds``, in the
order :func:`~.damaged.damage_cases` finds them) and which of the damaged files rank 1 wrote
(``rank1_files``: rank 0 then sees that damage only through the ranks' agreement).
"""

from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import Any, ClassVar

from ..distributed import run_distributed
from .crash import sigkill_trial_problems
from .damaged import damage_problems


class CheckpointFaultSuite:
    """Set ``config``, ``file_kinds`` and ``rank1_files`` in a subclass named ``Test...``."""

    #: StrategyConfig overrides (``strategy`` at least).
    config: ClassVar[dict[str, Any]] = {}
    world_size: ClassVar[int] = 2
    #: The kinds of files a checkpoint holds, as :func:`~.damaged.damage_cases` lists them.
    file_kinds: ClassVar[list[str]] = []
    #: ``{kind: glob pattern}``: the damaged file of that kind is rank 1's.
    rank1_files: ClassVar[dict[str, str]] = {}
    #: Crash trials (kills at stratified random points of a save).
    trials: ClassVar[int] = 20

    def test_every_damaged_file_fails_on_both_ranks_with_the_same_message(self, tmp_path: Path) -> None:
        per_rank = run_distributed(
            "lightrft.testing.checkpoint_faults:check_damaged_loads",
            world_size=self.world_size,
            kwargs={"config": self.config, "root": str(tmp_path)},
        )
        assert per_rank[0]["kinds"] == self.file_kinds
        files = {c["kind"]: c["file"] for c in per_rank[0]["cases"]}
        for kind, pattern in self.rank1_files.items():
            assert fnmatch.fnmatchcase(files[kind], pattern), (kind, files[kind], pattern)
        assert damage_problems(per_rank) == []
        assert [r["clean_load"] for r in per_rank] == ["good2"] * self.world_size

    def test_sigkill_at_random_points_of_save_never_loses_a_complete_checkpoint(self, tmp_path: Path) -> None:
        problems = sigkill_trial_problems(
            self.config, tmp_path, trials=self.trials, world_size=self.world_size
        )
        assert problems == []
