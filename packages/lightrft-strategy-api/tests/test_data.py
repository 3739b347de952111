import pytest
import torch

from lightrft.strategy import ResumableDataLoader, ResumableDistributedSampler


def test_sampler_partitions_and_resumes():
    data = list(range(20))
    shards = [list(ResumableDistributedSampler(data, 2, r, shuffle=True, seed=3)) for r in range(2)]
    assert sorted(shards[0] + shards[1]) == data and not set(shards[0]) & set(shards[1])
    # Skipping 8 global samples = skipping 4 per rank.
    resumed = [list(ResumableDistributedSampler(data, 2, r, seed=3, consumed_samples=8)) for r in range(2)]
    assert resumed[0] == shards[0][4:] and resumed[1] == shards[1][4:]
    with pytest.raises(ValueError, match="rank=2"):
        ResumableDistributedSampler(data, 2, 2)


def test_loader_counts_handed_out_batches_and_resumes():
    data = [torch.tensor([i]) for i in range(12)]

    def make():
        return ResumableDataLoader(
            data, batch_size=2, sampler=ResumableDistributedSampler(data, 1, 0, seed=1), num_workers=0
        )

    full = [b.flatten().tolist() for b in make()]
    loader = make()
    it = iter(loader)
    seen = [next(it).flatten().tolist() for _ in range(2)]
    state = loader.state_dict()
    assert state == {"epoch": 0, "consumed_samples": 4}
    other = make()
    other.load_state_dict(state)
    assert seen + [b.flatten().tolist() for b in other] == full
    # After a full epoch the next one starts from its beginning, reshuffled.
    assert other.state_dict() == {"epoch": 1, "consumed_samples": 0}
    assert [b.flatten().tolist() for b in other] != full
