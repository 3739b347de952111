"""DeepSpeed ZeRO-2 checkpoints under damage and SIGKILL, on 2 gloo ranks: every damaged file fails the load
on both ranks with the same CheckpointError; ranks killed at random points of save_ckpt never
cost the newest complete checkpoint nor an older one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightrft.testing import run_distributed
from lightrft.testing.checkpoint_faults import damage_problems, sigkill_trial_problems

CONFIG: dict[str, Any] = {"strategy": "deepspeed", "zero_stage": 2}
TRIALS = 20


def test_every_damaged_file_fails_on_both_ranks_with_the_same_message(tmp_path: Path) -> None:
    per_rank = run_distributed(
        "lightrft.testing.checkpoint_faults:check_damaged_loads",
        world_size=2,
        kwargs={"config": CONFIG, "root": str(tmp_path)},
    )
    kinds = per_rank[0]["kinds"]
    assert kinds == ["manifest", "rank_state", "client_state", "ds_optim_states", "ds_model_states"]
    # The damaged shard and rank state are rank 1's: rank 0 sees the damage only through the agreement.
    files = {c["kind"]: c["file"] for c in per_rank[0]["cases"]}
    assert (
        files["ds_optim_states"].startswith("zero_pp_rank_1_")
        and files["rank_state"] == "lightrft_rank00001.pt"
    )
    assert damage_problems(per_rank) == []
    assert [r["clean_load"] for r in per_rank] == ["good2", "good2"]


def test_sigkill_at_random_points_of_save_never_loses_a_complete_checkpoint(tmp_path: Path) -> None:
    assert sigkill_trial_problems(CONFIG, tmp_path, trials=TRIALS) == []
