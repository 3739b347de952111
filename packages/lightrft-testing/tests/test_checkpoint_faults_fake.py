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


def _one_killed_trial(error: str, rank: str = "1", in_killed_save: bool = True) -> dict:
    log = {"trial": 0, "rank": int(rank), "in_killed_save": in_killed_save, "error": error}
    ranks = {"0": {"trial": 0, "rank": 0}, "1": {"trial": 0, "rank": 1}}
    ranks[rank] = log
    trial = {
        "trial": 0, "victim": 0, "exits": {"0": "signal 9", "1": "exit 1"}, "ranks": ranks,
        "published": ["t000a"], "latest": "t000a", "verify_errors": {}, "phase": "writing",
    }  # fmt: skip
    return {"world_size": 2, "trials": [trial]}


GLOO_PEER_DIED = (
    "Traceback (most recent call last):\n  ...\nRuntimeError: [gloo/transport/tcp/pair.cc:561] "
    "Connection closed by peer [127.0.0.1]:26791. This is typically caused by a remote worker crashing."
)


def test_a_survivor_may_fail_only_on_its_dead_peer_during_the_killed_save() -> None:
    assert crash_problems(_one_killed_trial(GLOO_PEER_DIED)) == []
    # Another error of the survivor in the same save is a bug, not the crash.
    bug = "Traceback (most recent call last):\n  ...\nKeyError: 'exp_avg'"
    assert [p.splitlines()[0] for p in crash_problems(_one_killed_trial(bug))] == ["trial 0 rank 1 failed:"]
    # The peer-lost error outside the killed save, or on the victim itself, is a problem too.
    assert crash_problems(_one_killed_trial(GLOO_PEER_DIED, in_killed_save=False))
    assert crash_problems(_one_killed_trial(GLOO_PEER_DIED, rank="0"))


def test_the_trials_fork_safely_from_a_process_that_used_several_threads(tmp_path: Path) -> None:
    """OpenMP's workers do not survive fork(): ranks forked from a process whose intra-op pool ran
    with several threads hung until the 300 s deadline. run_crash_trials forks with one thread and
    gives the caller's count back."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x = torch.randn(512, 512)
        (x @ x).sum().item()  # a parallel region: the pool's workers exist now
        result = run_crash_trials({"strategy": "fake"}, world_size=1, trials=2, root=tmp_path, seed=3)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert all("timeout" not in t["exits"].values() for t in result["trials"]), result["trials"]
    assert crash_problems(result) == []
