"""A distributed sampler and dataloader that resume exactly where training stopped."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sized
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler


class ResumableDistributedSampler(Sampler[int]):
    """Splits a (shuffled per epoch) index permutation over ``num_replicas`` ranks and can skip the
    first ``consumed_samples`` (global) samples of the current epoch, so a resumed run sees exactly
    the samples the interrupted one had not yet used."""

    def __init__(
        self,
        dataset: Sized,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = True,
        consumed_samples: int = 0,
    ) -> None:
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(
                f"rank={rank} / num_replicas={num_replicas} is invalid: need 0 <= rank < num_replicas"
            )
        self.dataset = dataset
        self.num_replicas = num_replicas
        self.rank = rank
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0
        self.consumed_samples = consumed_samples
        n = len(dataset)
        if drop_last:
            self.total_size = (n // num_replicas) * num_replicas
        else:
            self.total_size = math.ceil(n / num_replicas) * num_replicas

    def set_epoch(self, epoch: int, consumed_samples: int = 0) -> None:
        self.epoch = epoch
        self.consumed_samples = consumed_samples

    def _indices(self) -> list[int]:
        n = len(self.dataset)
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            indices = torch.randperm(n, generator=g).tolist()
        else:
            indices = list(range(n))
        if self.drop_last:
            indices = indices[: self.total_size]
        else:
            indices += indices[: self.total_size - len(indices)]
        return indices[self.consumed_samples :][self.rank :: self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices())

    def __len__(self) -> int:
        return max(0, (self.total_size - self.consumed_samples) // self.num_replicas)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "consumed_samples": self.consumed_samples}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.set_epoch(int(state["epoch"]), int(state["consumed_samples"]))


class ResumableDataLoader(DataLoader):
    """A DataLoader over a :class:`ResumableDistributedSampler` that counts the batches it has
    handed out (not those prefetched by workers), so its ``state_dict`` is exact."""

    sampler: ResumableDistributedSampler

    def __init__(
        self, dataset: Any, batch_size: int, sampler: ResumableDistributedSampler, **kwargs: Any
    ) -> None:
        super().__init__(dataset, batch_size=batch_size, sampler=sampler, **kwargs)
        self._global_batch = batch_size * sampler.num_replicas

    def __iter__(self) -> Iterator[Any]:
        start = self.sampler.consumed_samples
        for i, batch in enumerate(super().__iter__()):
            # Count the batch as consumed once handed out; a checkpoint taken now resumes after it.
            self.sampler.consumed_samples = start + (i + 1) * self._global_batch
            yield batch
        # A finished epoch starts the next from its beginning.
        self.sampler.set_epoch(self.sampler.epoch + 1, 0)

    def set_epoch(self, epoch: int, consumed_samples: int = 0) -> None:
        self.sampler.set_epoch(epoch, consumed_samples)

    def state_dict(self) -> dict[str, int]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.load_state_dict(state)
