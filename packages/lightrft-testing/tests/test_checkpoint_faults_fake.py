"""FakeStrategy checkpoints killed mid-save: 20 trials of one forked rank SIGKILLed at random
points of save_ckpt (lightrft.testing.checkpoint_faults), then one load."""

from __future__ import annotations

from pathlib import Path

from lightrft.testing.checkpoint_faults import crash_problems, run_crash_trials

TRIALS = 20


def test_sigkill_at_random_points_of_save_never_loses_a_complete_checkpoint(tmp_path: Path) -> None:
    result = run_crash_trials({"strategy": "fake"}, world_size=1, trials=TRIALS, root=tmp_path, seed=2)
    assert len(result["trials"]) == TRIALS + 1
    assert crash_problems(result) == []
    killed = [t for t in result["trials"] if "phase" in t]
    assert all(t["exits"] == {"0": "signal 9"} for t in killed), [t["exits"] for t in killed]
    assert sum(t["phase"] != "finished" for t in killed) >= TRIALS // 2, [t["phase"] for t in killed]
    # The last round only loads: the newest complete checkpoint, bit for bit.
    last = result["trials"][-1]
    assert last["exits"] == {"0": "exit 0"} and last["ranks"]["0"]["loaded"] == result["trials"][-2]["latest"]
