"""2-D toy data (`data.dataset=ring8|grid25|gaussian`): the mixtures' mode centres (`mixture_centers`) and endless
batches of points drawn from them (`PointBatches`).

A batch is drawn from a generator seeded by (seed, rank, batch index), so a resumed run continues the same stream
from the batch index alone.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from gan_dist.config import DataConfig


class PointBatches:
    """Batches of 2-D points (B, 2) float32 with their mode as label (B,), drawn per batch from a generator seeded by
    (seed, rank, batch index)."""

    def __init__(self, cfg: DataConfig, batch: int, seed: int, rank: int, start_batch: int) -> None:
        self.centers = mixture_centers(cfg)
        self.std = 1.0 if cfg.dataset == "gaussian" else cfg.std
        self.batch, self.seed, self.rank, self.index = batch, seed, rank, start_batch
        self.epoch_size = 0

    def __iter__(self) -> PointBatches:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, self.rank, self.index])
        self.index += 1
        labels = rng.integers(len(self.centers), size=self.batch)
        points = self.centers[labels] + self.std * rng.standard_normal((self.batch, 2))
        return torch.from_numpy(points.astype(np.float32)), torch.from_numpy(labels)

    def state(self) -> torch.Tensor:
        return torch.tensor([[self.index, 0, 0]], dtype=torch.int64)


def mixture_centers(cfg: DataConfig) -> np.ndarray:
    """Mode centres of the 2-D target, (K, 2); the single origin for the seed's N(0, I)."""
    if cfg.dataset == "ring8":
        angles = 2 * math.pi * np.arange(8) / 8
        return cfg.radius * np.stack([np.cos(angles), np.sin(angles)], 1)
    if cfg.dataset == "grid25":
        ticks = cfg.spacing * (np.arange(5) - 2)
        return np.stack(np.meshgrid(ticks, ticks, indexing="ij"), -1).reshape(-1, 2)
    return np.zeros((1, 2))
