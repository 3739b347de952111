"""DeepSpeed ZeRO-2 checkpoints under damage and SIGKILL, on 2 gloo ranks (lightrft-testing's
CheckpointFaultSuite): every damaged file fails the load on both ranks with the same
CheckpointError; ranks killed at random points of save_ckpt never cost the newest complete
checkpoint nor an older one."""

from __future__ import annotations

from lightrft.testing.checkpoint_faults.suite import CheckpointFaultSuite


class TestDeepspeedZero2CheckpointFaults(CheckpointFaultSuite):
    config = {"strategy": "deepspeed", "zero_stage": 2}
    file_kinds = ["manifest", "rank_state", "client_state", "ds_optim_states", "ds_model_states"]
    # The damaged optimizer partition and rank state are rank 1's: rank 0 sees the damage only
    # through the agreement.
    rank1_files = {"ds_optim_states": "zero_pp_rank_1_*", "rank_state": "lightrft_rank00001.pt"}
