"""Training batches as a pure function of (seed, step): resuming needs no loader state.

The global batch of step ``s`` is a slice of a seeded per-epoch permutation; with DDP each rank
takes its own contiguous part of that global batch, so 1 process with batch B and R processes
with batch B/R see exactly the same images at every step.
"""

from __future__ import annotations

from typing import Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from spectralar.data.shards import ImageShards


def global_batch_indices(step: int, *, num_items: int, batch_size: int, seed: int) -> np.ndarray:
    """Indices of the global batch at ``step`` (epochs drop their last incomplete batch)."""
    steps_per_epoch = num_items // batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"batch_size {batch_size} is larger than the dataset ({num_items} images)")
    epoch, within = divmod(step, steps_per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(num_items)
    return order[within * batch_size:(within + 1) * batch_size]


class StepBatchSampler(Sampler[list[int]]):
    """Yields this rank's indices for steps ``start_step .. total_steps - 1``."""

    def __init__(self, *, num_items: int, batch_size: int, seed: int, start_step: int, total_steps: int,
                 rank: int = 0, world_size: int = 1) -> None:
        if batch_size % world_size:
            raise ValueError(f"global batch {batch_size} is not divisible by world size {world_size}")
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.start_step, self.total_steps = start_step, total_steps
        self.rank, self.world_size = rank, world_size

    def __len__(self) -> int:
        return max(self.total_steps - self.start_step, 0)

    def __iter__(self) -> Iterator[list[int]]:
        local = self.batch_size // self.world_size
        for step in range(self.start_step, self.total_steps):
            batch = global_batch_indices(step, num_items=self.num_items, batch_size=self.batch_size, seed=self.seed)
            yield batch[self.rank * local:(self.rank + 1) * local].tolist()


class ShardDataset(Dataset):
    """(image uint8 (C, H, W), label, index) triples from a prepared split."""

    def __init__(self, shards: ImageShards, in_memory: bool = False) -> None:
        self.shards = shards
        self.cache: Optional[np.ndarray] = shards.load_all() if in_memory else None

    def __len__(self) -> int:
        return len(self.shards)

    def __getitems__(self, indices: list[int]):
        index = np.asarray(indices)
        images = self.cache[index] if self.cache is not None else self.shards.images(index)
        images = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)  # (B, C, H, W)
        return images, torch.from_numpy(self.shards.labels[index]), torch.from_numpy(index)

    def __getitem__(self, i: int):
        images, labels, index = self.__getitems__([i])
        return images[0], labels[0], index[0]


def _identity(batch):
    return batch


def step_loader(shards: ImageShards, *, batch_size: int, seed: int, start_step: int, total_steps: int,
                workers: int = 0, rank: int = 0, world_size: int = 1, in_memory: bool = False) -> DataLoader:
    """A DataLoader yielding (images uint8 (b, C, H, W), labels, dataset indices) per step."""
    sampler = StepBatchSampler(num_items=len(shards), batch_size=batch_size, seed=seed, start_step=start_step,
                               total_steps=total_steps, rank=rank, world_size=world_size)
    # Its own generator: creating an iterator draws a seed, which must not consume the global RNG
    # (a resumed run creates its loader at another point of the RNG stream than the original).
    return DataLoader(ShardDataset(shards, in_memory=in_memory), batch_sampler=sampler, num_workers=workers,
                      collate_fn=_identity, persistent_workers=False, pin_memory=torch.cuda.is_available(),
                      generator=torch.Generator().manual_seed(seed))


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1] (the tokenizer's and proxy's input range)."""
    return images.float().div(127.5).sub(1.0)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    return images.clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
