"""In-memory batches on the training device: shuffled, sharded for DDP, augmented, normalised."""
from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch

from ..transforms import SegmentationPreset
from .augment import PaperAugment
from .dataset import SplitArrays
from .robust_augment import RobustAugment


def _generator(*entropy: int) -> torch.Generator:
    """A CPU generator seeded from several integers, well mixed (unlike ``seed + epoch``)."""
    seed = int(np.random.SeedSequence(list(entropy)).generate_state(1, np.uint64)[0] >> 1)
    return torch.Generator().manual_seed(seed)


class TrainLoader:
    """Batches ``(x, y)`` of a split held on ``device`` as uint8, converted there per batch.

    ``x`` is float32 (B, 3, H, W), ``(x / 255 - mean) / std``; ``y`` is float32 (B, 1, H, W) in
    {0, 1}. Call ``set_epoch(epoch)`` before each epoch, as with ``DistributedSampler``: the order
    and the augmentation are functions of (seed, epoch) only, so a resumed run sees the same batches.

    Args:
        arrays: the split, from ``PreparedData.load``.
        batch_size: samples per batch on this rank.
        mean: RGB mean, 0..1 scale (the training statistics of the manifest).
        std: RGB std, 0..1 scale.
        augment: apply ``PaperAugment``.
        robust_augment: ``{transform: probability}``: ``RobustAugment`` after the paper's transforms
            (empty: the paper's only, with exactly its batches and random stream).
        shuffle: new order every epoch; otherwise the array order.
        seed: base seed of the order and the augmentation.
        device: where batches (and the whole split, once) live.
        drop_last: drop the incomplete last batch, and trim the split to a multiple of
            ``world_size`` instead of padding it (False).
        rank: this process's rank for DDP (0).
        world_size: number of DDP processes (1). Every rank gets the same number of batches; without
            ``drop_last`` the split is padded by repeating its first samples, as ``DistributedSampler`` does.
    """

    def __init__(self, arrays: SplitArrays, batch_size: int, mean: Sequence[float], std: Sequence[float], *,
                 augment: bool, shuffle: bool, seed: int, device: str | torch.device, drop_last: bool = False,
                 rank: int = 0, world_size: int = 1, robust_augment: dict[str, float] | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.device = torch.device(device)
        self.images = arrays.images.to(self.device)
        self.masks = arrays.masks.to(self.device)
        self.ids = arrays.ids
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.drop_last, self.rank, self.world_size = drop_last, rank, world_size
        self.augment = PaperAugment() if augment else None
        if robust_augment:
            self.augment = RobustAugment(robust_augment, paper=self.augment)
        self.preset = SegmentationPreset.from_stats(mean, std, tuple(arrays.images.shape[-2:]))
        self.epoch = 0
        n = len(arrays)
        total = (n // world_size if drop_last else -(-n // world_size)) * world_size
        self.num_samples = total // world_size  # per rank
        if self.num_samples == 0:
            raise ValueError(f"{n} samples cannot be shared among {world_size} ranks with drop_last")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def indices(self) -> torch.Tensor:
        """This rank's sample indices for the current epoch, in batch order."""
        n = len(self.ids)
        order = torch.randperm(n, generator=_generator(self.seed, self.epoch)) if self.shuffle else torch.arange(n)
        total = self.num_samples * self.world_size
        if total > n:
            order = torch.cat([order, order.repeat(-(-total // n))[: total - n]])
        return order[:total][self.rank::self.world_size]

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_samples // self.batch_size
        return -(-self.num_samples // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        indices = self.indices().to(self.device)
        # Each rank augments its own samples: its stream depends on the rank too.
        generator = _generator(self.seed, self.epoch, self.rank, 1)
        for b in range(len(self)):
            idx = indices[b * self.batch_size:(b + 1) * self.batch_size]
            x = self.images[idx].float()
            y = self.masks[idx].float()
            if self.augment is not None:
                x, y = self.augment(x, y, generator)
            yield self.preset.normalize(x), y
