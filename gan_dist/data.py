"""Training data as an endless, deterministic stream of batches for one rank.

Images come from webdataset tar shards. Every rank x loader-worker pair is a "slot". In each pass over the data
the shards are permuted with a seed all ranks share and dealt out to the slots, so within a pass no two slots read
the same shard; a slot that finishes its shards starts its next pass. No slot ever runs dry, so every rank gets the
same number of batches whatever the shard count, and nothing hangs in DDP. The order depends only on
(seed, rank, worker), and resuming after `start_batch` batches skips the consumed samples as raw bytes before they
are decoded. 2-D mixtures are drawn per batch from a generator seeded by (seed, rank, batch index).

This module knows the rank and world size only as numbers it is given; it does not touch the Accelerator.
"""

from __future__ import annotations

import itertools
import math
import random
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from gan_dist.config import DataConfig
from gan_dist.mnist import decode_png

Batch = tuple[torch.Tensor, torch.Tensor]  # images (B, C, H, W) in [-1, 1] or points (B, 2); labels (B,)


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


def decode_sample(sample: dict) -> tuple[np.ndarray, int]:
    return decode_png(sample["png"]), int(sample["cls"])


def _collate(items: list[tuple[np.ndarray, int]]) -> Batch:
    images = torch.from_numpy(np.stack([im for im, _ in items])).permute(0, 3, 1, 2)  # (B, C, H, W) uint8
    labels = torch.tensor([label for _, label in items])
    return images.float().div_(127.5).sub_(1.0), labels


class ShardStream(IterableDataset):
    """Batches of `batch` decoded images for one rank, endless; batch i comes from loader worker i % num_workers."""

    def __init__(self, urls: list[str], batch: int, seed: int, rank: int, world: int, num_workers: int,
                 shuffle_buffer: int, start_batch: int = 0) -> None:
        self.urls, self.batch, self.seed = urls, batch, seed
        self.rank, self.world, self.workers = rank, world, max(num_workers, 1)
        self.shuffle_buffer, self.start_batch = shuffle_buffer, start_batch

    def _shards(self, slot: int) -> Iterator[dict]:
        n, slots = len(self.urls), self.world * self.workers
        for epoch in itertools.count():
            order = list(range(n))
            random.Random(_seed(self.seed, epoch)).shuffle(order)
            mine = order[slot::slots] if n >= slots else [order[slot % n]]
            yield from ({"url": self.urls[i]} for i in mine)

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        # A resumed loader starts again at worker 0, so worker ids are rotated to continue the interleaving.
        worker = ((info.id if info else 0) + self.start_batch) % self.workers
        done = self.start_batch // self.workers + (worker < self.start_batch % self.workers)
        slot = self.rank * self.workers + worker
        samples = wds.tarfile_to_samples()(self._shards(slot))
        samples = wds.shuffle(self.shuffle_buffer, rng=random.Random(_seed(self.seed, self.rank, worker)))(samples)
        samples = itertools.islice(samples, done * self.batch, None)  # raw bytes: skipped samples are not decoded
        while True:
            yield _collate([decode_sample(s) for s in itertools.islice(samples, self.batch)])


def shard_batches(urls: list[str], cfg: DataConfig, batch: int, seed: int, rank: int, world: int,
                  start_batch: int, pin_memory: bool = False) -> Iterator[Batch]:
    stream = ShardStream(urls, batch, seed, rank, world, cfg.num_workers, cfg.shuffle_buffer, start_batch)
    # A private generator: creating the loader must not draw from the global RNG that resume restores.
    loader = wds.WebLoader(stream, batch_size=None, num_workers=cfg.num_workers, pin_memory=pin_memory,
                           generator=torch.Generator(), prefetch_factor=4 if cfg.num_workers else None)
    return iter(loader)


def mixture_centers(cfg: DataConfig) -> np.ndarray:
    """Mode centres of the 2-D target, (K, 2); the single origin for the seed's N(0, I)."""
    if cfg.dataset == "ring8":
        angles = 2 * math.pi * np.arange(8) / 8
        return cfg.radius * np.stack([np.cos(angles), np.sin(angles)], 1)
    if cfg.dataset == "grid25":
        ticks = cfg.spacing * (np.arange(5) - 2)
        return np.stack(np.meshgrid(ticks, ticks, indexing="ij"), -1).reshape(-1, 2)
    return np.zeros((1, 2))


def point_batches(cfg: DataConfig, batch: int, seed: int, rank: int, start_batch: int) -> Iterator[Batch]:
    centers = mixture_centers(cfg)
    std = 1.0 if cfg.dataset == "gaussian" else cfg.std
    for i in itertools.count(start_batch):
        rng = np.random.default_rng([seed, rank, i])
        labels = rng.integers(len(centers), size=batch)
        points = centers[labels] + std * rng.standard_normal((batch, 2))
        yield torch.from_numpy(points.astype(np.float32)), torch.from_numpy(labels)


def shard_urls(cache_dir: str | Path, manifest: dict, split: str = "train") -> list[str]:
    return [str(Path(cache_dir) / s["name"]) for s in manifest["splits"][split]["shards"]]
