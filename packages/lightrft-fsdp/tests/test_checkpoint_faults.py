"""FSDP checkpoints under damage and SIGKILL, on 2 gloo ranks (lightrft-testing's
CheckpointFaultSuite): every damaged file fails the load on both ranks with the same
CheckpointError; ranks killed at random points of save_ckpt never cost the newest complete
checkpoint nor an older one."""

from __future__ import annotations

from lightrft.testing.checkpoint_faults.suite import CheckpointFaultSuite


class TestFSDPCheckpointFaults(CheckpointFaultSuite):
    config = {"strategy": "fsdp"}
    file_kinds = ["manifest", "dcp_metadata", "dcp_shard", "rank_state", "client_state", "scheduler"]
    # The damaged shard and rank state are rank 1's: rank 0 sees the damage only through the agreement.
    rank1_files = {"dcp_shard": "dcp/__1_0.distcp", "rank_state": "lightrft_rank00001.pt"}
