"""Training images as an endless, deterministic, resumable stream of batches for one rank: streamed from shards
(`ShardBatches`) or drawn from the whole dataset held on the device (`CachedBatches`), then handed to the step on
the device with the next batch prefetched (`DeviceBatches`, which carries `points.py`'s 2-D batches the same way).

Images come from webdataset shards (read by `shards.py`; MNIST's are written on first use by `mnist_shards.py`).
Every rank x loader-worker pair is a "slot", and each slot reads its stream in chunks:

- `data.mode=epoch`: chunk e is the slot's share of epoch e. The shards are permuted with a seed all ranks share,
  laid end to end, and cut into `slots` contiguous ranges of equal sample count (within one), so every sample is
  read by exactly one slot per epoch and all ranks get the same number of batches. A range may start or end inside
  a shard; the slot then skips or stops reading that shard there. A slot's last batch of an epoch is completed with
  the first samples of its next epoch (the remainder rule: no sample is dropped or repeated within an epoch).
- `data.mode=resampled`: chunk k is `RESAMPLED_CHUNK` shards drawn with replacement by the slot's own RNG, seeded
  by (seed, chunk, rank, worker). Streams never end, whatever the shard count.

Samples of a chunk are shuffled with a buffer seeded by (seed, chunk, rank, worker), flushed at the chunk's end, and
decoded only after shuffling. A slot's position is (chunk, samples taken from it, samples skipped so far); the loop
saves every slot's position with each checkpoint, and a resumed slot re-reads its chunk as raw bytes up to there
without decoding any of it. Bad images and truncated shards are skipped with a warning (or stop the run with
`data.on_error=raise`); the skip count travels with the position.

With `data.device_cache` (MNIST, or any epoch-mode shard set that fits), the loader is skipped: the whole dataset is
decoded once into a uint8 tensor on the device and batches are gathered from it (`CachedBatches`). `data.limit=N`
always takes that path (on the host with `data.device_cache=false`): the N samples are decoded once and held.

This module knows the rank and world size only as numbers it is given; it does not touch the Accelerator.
"""

from __future__ import annotations

import contextlib
import itertools
import random
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from gan_dist import mnist
from gan_dist.config import DataConfig
from gan_dist.errors import UserError
from gan_dist.images import BadSample, decode_image, pixel_bound, sample_label
from gan_dist.mnist_shards import ensure_shards
from gan_dist.points import PointBatches
from gan_dist.shardformat import manifest_counts, read_index
from gan_dist.shards import ShardError, check_local, expand_urls, index_samples, is_remote, open_shard, read_indexed, \
    tar_samples
from gan_dist.signals import ignore_in_worker

RESAMPLED_CHUNK = 4  # shards per resampled chunk: a resumed worker re-reads at most this many
Batch = tuple[torch.Tensor, torch.Tensor]  # images (B, C, H, W) uint8; labels (B,)
Position = list[int]  # [chunk, samples taken from it, samples skipped so far]


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


@dataclass
class Source:
    """The shards of a run: URLs and, when a manifest lists them, each one's sample count."""

    urls: list[str]
    counts: list[int] | None


def open_source(cfg: DataConfig) -> Source:
    """The shards of `data.dataset` (MNIST's, written on first use, or `data.shards` with its manifest) as a
    Source; UserError naming the problem and the fix."""
    if cfg.dataset == "mnist":
        manifest = ensure_shards(cfg.mnist_dir, cfg.cache_dir, cfg.download)
        shards = manifest["splits"]["train"]["shards"]
        return Source([str(Path(cfg.cache_dir) / s["name"]) for s in shards], [s["num_samples"] for s in shards])
    urls = expand_urls(cfg.shards)
    if not urls:
        raise UserError("data.shards is empty; set it to shard URLs, e.g. data.shards=/data/train-{00000..00009}.tar")
    check_local(urls)
    # A stale offset index stops the run here, before training, rather than in the one rank that meets it.
    for url in (u for u in urls if not is_remote(u)):
        try:
            read_index(url.removeprefix("file:"))
        except ShardError as err:
            raise UserError(str(err)) from None
    manifests = [m for m in cfg.manifest.split("::") if m] if cfg.manifest else sorted({
        str(beside) for u in urls if not is_remote(u)
        if (beside := Path(u.removeprefix("file:")).parent / "manifest.json").is_file()})
    counts = manifest_counts(urls, manifests) if manifests else None
    if cfg.mode == "epoch" and counts is None:
        raise UserError(f"data.mode=epoch needs each shard's sample count, but no manifest.json was found for "
                        f"{urls[0]}; write one with `python scripts/make_shards.py --index SHARD_FOLDER`, point "
                        f"data.manifest at it, or use data.mode=resampled")
    return Source(urls, counts)


def chunk_plan(source: Source, mode: str, seed: int, chunk: int, rank: int, worker: int, slot: int,
               slots: int) -> list[tuple[int, int, int | None]]:
    """The shards chunk `chunk` of a slot reads, as (shard index, samples to skip first, samples to take)."""
    n = len(source.urls)
    if mode == "resampled":
        rng = random.Random(_seed(seed, chunk, rank, worker))
        return [(rng.randrange(n), 0, None) for _ in range(RESAMPLED_CHUNK)]
    order = list(range(n))
    random.Random(_seed(seed, chunk)).shuffle(order)
    total = sum(source.counts)
    lo, hi = slot * total // slots, (slot + 1) * total // slots
    plan, start = [], 0
    for i in order:
        a, b = max(lo, start), min(hi, start + source.counts[i])
        if a < b:
            plan.append((i, a - start, b - a))
        start += source.counts[i]
    return plan


def buffer_shuffle(items: Iterator[dict], size: int, rng: random.Random) -> Iterator[dict]:
    """Shuffle through a buffer of `size` items (webdataset's scheme), emptied in random order at the end."""
    buf: list[dict] = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        k = rng.randrange(size)
        yield buf[k]
        buf[k] = item
    rng.shuffle(buf)
    yield from buf


class FatalDataError(Exception):
    """A data fault that stops the run: a shard that cannot be opened, or any fault with data.on_error=raise."""


def class_of(sample: dict, cfg: DataConfig) -> int:
    """The sample's label; with data.classes set, a label outside 0..classes-1 (or none) makes it a bad sample."""
    label = sample_label(sample)
    if cfg.classes and not 0 <= label < cfg.classes:
        raise BadSample(f"cls {label} is not a class from 0 to {cfg.classes - 1} (data.classes={cfg.classes})"
                        if label >= 0 else f"no cls label, which data.classes={cfg.classes} asks of every sample")
    return label


def _say(msg: str) -> None:
    print(f"[gan-dist] {msg}", file=sys.stderr, flush=True)


class ShardStream(IterableDataset):
    """Endless batches for one rank; batch i comes from logical worker i % workers (see `ShardBatches`)."""

    def __init__(self, source: Source, cfg: DataConfig, batch: int, seed: int, rank: int, world: int,
                 start_batch: int, positions: list[Position]) -> None:
        self.source, self.cfg, self.batch, self.seed = source, cfg, batch, seed
        self.rank, self.world, self.workers = rank, world, max(cfg.num_workers, 1)
        self.start_batch, self.positions = start_batch, positions
        self.quiet = False  # set while a resumed slot re-reads samples it had already taken
        self.skipped = 0
        self.indexes: dict[str, list | None] = {}  # url -> its samples' offsets (None: no index, streamed)

    def _skip(self, what: str, lost: int) -> None:
        if self.quiet:
            return
        self.skipped += lost
        if self.cfg.on_error == "raise":
            raise FatalDataError(what)
        _say(f"warning: rank {self.rank}: {what}; skipped {lost} sample(s) (data.on_error=raise stops instead)")

    def _indexed(self, url: str) -> list | None:
        """A local shard's samples from its offset index (checked against the shard once per run), or None."""
        if is_remote(url):
            return None
        if url not in self.indexes:
            try:
                members = read_index(url.removeprefix("file:"))
            except ShardError as err:
                raise FatalDataError(str(err)) from None
            self.indexes[url] = None if members is None else index_samples(members)
        return self.indexes[url]

    def _read(self, url: str, first: int, take: int | None, expected: int | None) -> Iterator[dict]:
        """Raw samples [first, first + take) of one shard (to its manifest count, or its end, when `take` is None).
        A fault skips the rest of the shard. The range that ends where the manifest says the shard ends reads on to
        its real end, so a shard holding fewer or more samples than its manifest lists is found and counted. A local
        shard with an offset index is read at its members' offsets, without parsing a tar header."""
        end = first + take if take is not None else expected
        at_end = expected is not None and end == expected
        # A member bigger than 4 bytes per pixel an image may have is no image this run would decode.
        cap = 4 * pixel_bound(self.cfg.resolution)
        indexed = self._indexed(url)
        if indexed is not None:
            seen = len(indexed)
            want = max(0, min(seen, end if end is not None else seen) - first)
            got = 0
            try:
                for sample in read_indexed(url.removeprefix("file:"), url, indexed[first:first + want], cap):
                    yield sample
                    got += 1
            except (ShardError, OSError) as err:
                self._skip(str(err), want - got)
                return
            self._check_count(url, seen, expected, first, end, got)
            return
        try:
            stream = open_shard(url, self.cfg.timeout_s, self.cfg.min_rate_kbs)
        except ShardError as err:
            raise FatalDataError(f"{err}; check data.shards") from None
        seen = got = 0
        try:
            for seen, sample in enumerate(tar_samples(stream, url, cap), start=1):
                if first < seen and (end is None or seen <= end):
                    yield sample
                    got += 1
                if end is not None and seen >= end and not at_end:
                    break
        except ShardError as err:
            if err.key is None and is_remote(url) and first == 0:
                raise FatalDataError(f"shard {url}: nothing could be read ({err.reason}); check data.shards "
                                     f"(and data.timeout_s for a slow source)") from None
            self._skip(str(err), max((end - first if end is not None else 0) - got, 1))
            return
        finally:
            try:
                stream.close()
            except OSError:
                pass  # a pipe: command closed early by us exits on SIGPIPE
        self._check_count(url, seen, expected, first, end, got)

    def _check_count(self, url: str, seen: int, expected: int | None, first: int, end: int | None, got: int) -> None:
        """A shard read through [first, end) that holds `seen` samples where its manifest lists `expected`: the
        samples its range lacks (or the shard has beyond the manifest, when the range ends at its end) are counted."""
        if expected is not None and seen != expected and (end == expected or seen < end):
            self._skip(f"shard {url} holds {seen} samples, its manifest lists {expected}",
                       end - first - got if seen < end else seen - expected)

    def _chunk(self, chunk: int, worker: int) -> Iterator[dict]:
        slot, slots = self.rank * self.workers + worker, self.world * self.workers
        plan = chunk_plan(self.source, self.cfg.mode, self.seed, chunk, self.rank, worker, slot, slots)
        counts = self.source.counts
        raw = itertools.chain.from_iterable(
            self._read(self.source.urls[i], first, take, counts[i] if counts else None) for i, first, take in plan)
        return buffer_shuffle(raw, self.cfg.shuffle_buffer, random.Random(_seed(self.seed, chunk, self.rank, worker)))

    def _decode(self, sample: dict, chunk: int) -> tuple[np.ndarray, int]:
        # The flip depends on the sample and epoch alone, so a resumed stream flips exactly as the original did.
        name = f"{self.seed}/{chunk}/{sample['__url__']}/{sample['__key__']}"
        flip = self.cfg.hflip and zlib.crc32(name.encode()) & 1
        return decode_image(sample, self.cfg.resolution, self.cfg.channels, bool(flip)), class_of(sample, self.cfg)

    def _batches(self, worker: int) -> Iterator[tuple]:
        chunk, offset, self.skipped = self.positions[worker]
        items, empty = [], 0
        for chunk in itertools.count(chunk):
            self.quiet = offset > 0
            taken = 0
            for taken, sample in enumerate(self._chunk(chunk, worker), start=1):
                self.quiet = taken < offset  # the next read happens while fetching sample `taken`
                if taken <= offset:
                    continue  # consumed before the checkpoint: raw bytes only, never decoded
                try:
                    items.append(self._decode(sample, chunk))
                except BadSample as err:
                    self._skip(f"sample '{sample['__key__']}' of shard {sample['__url__']}: {err}", 1)
                    continue
                if len(items) == self.batch:
                    images = torch.from_numpy(np.stack([im for im, _ in items])).permute(0, 3, 1, 2)
                    labels = torch.tensor([label for _, label in items])
                    # Plain ints: the main process reads the position without touching a tensor.
                    yield images, labels, (worker, chunk, taken, self.skipped)
                    items = []
            offset = 0
            empty = 0 if taken else empty + 1
            if empty == 100:  # rather than spin forever on shards that hold nothing
                raise FatalDataError(f"rank {self.rank}: 100 chunks in a row yielded no sample; check that the "
                                     f"shards in data.shards hold samples")

    def __iter__(self) -> Iterator[tuple | dict]:
        info = get_worker_info()
        # A resumed loader starts again at worker 0, so worker ids are rotated to continue the interleaving.
        worker = ((info.id if info else 0) + self.start_batch) % self.workers
        try:
            yield from self._batches(worker)
        except FatalDataError as err:
            # Handed to the main process as data, so it stops with this message rather than a worker traceback.
            yield {"error": str(err)}


class ShardBatches:
    """The main process's side of a ShardStream: batches in order, and every logical worker's position."""

    def __init__(self, stream: ShardStream, pin_memory: bool = False) -> None:
        workers = stream.cfg.num_workers
        # A private generator: creating the loader must not draw from the global RNG that resume restores.
        loader = wds.WebLoader(stream, batch_size=None, num_workers=workers, pin_memory=pin_memory,
                               generator=torch.Generator(), prefetch_factor=4 if workers else None,
                               worker_init_fn=ignore_in_worker if workers else None)
        self.loader = iter(loader)
        self.positions = [list(p) for p in stream.positions]
        counts = stream.source.counts
        self.epoch_size = sum(counts) if stream.cfg.mode == "epoch" and counts else 0  # samples per epoch

    def __iter__(self) -> ShardBatches:
        return self

    def __next__(self) -> Batch:
        item = next(self.loader)
        if isinstance(item, dict):
            raise UserError(item["error"])
        images, labels, (worker, *position) = item
        self.positions[worker] = position
        return images, labels

    def state(self) -> torch.Tensor:
        """(workers, 3) int64: each logical worker's [chunk, taken, skipped] after the last batch handed out."""
        return torch.tensor(self.positions, dtype=torch.int64)

    @property
    def skipped(self) -> int:
        return sum(p[2] for p in self.positions)


def cache_position(saved: torch.Tensor, layout: str, world: int, epoch: int, say: Callable[[str], None]) -> Position:
    """Where `CachedBatches` continues. A checkpoint of the device cache holds one position in the global sample
    stream (the same row from every rank), which any world size continues exactly: every rank then takes its share of
    each global batch from there, so no sample is drawn twice or skipped. After a checkpoint of the loader, whose
    per-slot positions it cannot continue, the start of epoch `epoch`."""
    if saved.numel() and layout == "cache":
        epoch, index, skipped = saved[0].tolist()
        if len(saved) != world:
            say(f"data: continuing at sample {index} of epoch {epoch} with world size {world} (the checkpoint's was "
                f"{len(saved)}): no sample of the epoch is drawn twice or skipped")
        return [epoch, index, skipped]
    return start_positions(saved, "epoch", 0, world, 1, epoch, say, same_layout=layout != "stream")[0]


def start_positions(saved: torch.Tensor, mode: str, rank: int, world: int, workers: int, epoch: int,
                    say: Callable[[str], None], same_layout: bool = True) -> list[Position]:
    """Each logical worker's starting position: its saved one when the run resumes on the same world size and
    worker count; otherwise (or when the checkpoint's positions are of the other layout, `same_layout` False) the
    start of epoch `epoch` (epoch mode) or of fresh draws (resampled mode)."""
    if saved.numel() and saved.shape[0] == world * workers and same_layout:
        return saved[rank * workers:(rank + 1) * workers].tolist()
    if saved.numel() == 0:
        return [[0, 0, 0] for _ in range(workers)]
    chunk = epoch if mode == "epoch" or not same_layout else int(saved[:, 0].max()) + 1
    held = f"positions for {saved.shape[0]} rank x worker slots, this run has {world * workers}" if same_layout \
        else "the positions of the other data path (the device cache's or the loader's)"
    say(f"data: the checkpoint holds {held}; restarting at the start of chunk {chunk} "
        f"({'epoch' if mode == 'epoch' else 'draw'}). Exact resume needs the same world size, data.num_workers and "
        "data.device_cache.")
    return [[chunk, 0, 0] for _ in range(workers)]


def shard_batches(source: Source, cfg: DataConfig, batch: int, seed: int, rank: int, world: int,
                  start_batch: int = 0, positions: list[Position] | None = None,
                  pin_memory: bool = False) -> ShardBatches:
    workers = max(cfg.num_workers, 1)
    if cfg.mode == "epoch" and min(len(source.urls), sum(source.counts)) < world * workers:
        raise UserError(f"data.mode=epoch needs at least one shard per rank x loader worker, but there are "
                        f"{len(source.urls)} shards ({sum(source.counts)} samples) for {world} ranks x {workers} "
                        f"workers = {world * workers}; "
                        f"write more, smaller shards (scripts/make_shards.py --max-count N), lower "
                        f"data.num_workers, or use data.mode=resampled")
    positions = positions or [[0, 0, 0] for _ in range(workers)]
    return ShardBatches(ShardStream(source, cfg, batch, seed, rank, world, start_batch, positions), pin_memory)


DEVICE_CACHE_AUTO_BYTES = 1 << 30  # data.device_cache=auto holds a dataset on the device up to this decoded size


def wants_device_cache(cfg: DataConfig, source: Source) -> bool:
    """Whether this run's images are decoded once and held on the device (`data.device_cache`)."""
    if cfg.device_cache is False or cfg.mode != "epoch" or not source.counts:
        return False
    held = min(cfg.limit or sum(source.counts), sum(source.counts))
    return cfg.device_cache is True or held * cfg.channels * cfg.resolution ** 2 <= DEVICE_CACHE_AUTO_BYTES


LIMIT_SEED = 0  # the one order data.limit takes its first N samples from, whatever the run's seed


def limited(total: int, limit: int) -> np.ndarray | None:
    """The dataset indices `data.limit` keeps, sorted: the first `limit` of one fixed permutation of `total`
    (numpy's legacy RandomState, whose stream never changes between versions), so every run, seed and world size
    trains on the same subset; None for the whole dataset."""
    if not limit:
        return None
    if limit > total:
        raise UserError(f"data.limit={limit} is more than the {total} samples the dataset holds; lower it, or set "
                        "data.limit=0 for all of them")
    return np.sort(np.random.RandomState(LIMIT_SEED).permutation(total)[:limit])


def decode_dataset(source: Source, cfg: DataConfig) -> tuple[np.ndarray, np.ndarray, int]:
    """Every sample of `source` (or the `data.limit` of them) as uint8 images (N, C, H, W) and int64 labels (N,), in
    shard order, and the count of bad samples skipped. MNIST at its own 28x28 grayscale comes straight from its IDX
    files. A sample's index is its shard's start (from the manifest's counts) plus its place in the shard."""
    keep = limited(sum(source.counts), cfg.limit)
    if cfg.dataset == "mnist" and (cfg.resolution, cfg.channels) == (28, 1) and mnist.files_present(cfg.mnist_dir):
        images, labels = mnist.load_mnist(cfg.mnist_dir)["train"]
        images, labels = (images, labels) if keep is None else (images[keep], labels[keep])
        return images[:, None], labels.astype(np.int64), 0
    wanted = None if keep is None else set(keep.tolist())
    reader = ShardStream(source, cfg, 1, 0, 0, 1, 0, [[0, 0, 0]])
    images, labels, start = [], [], 0
    try:
        for url, count in zip(source.urls, source.counts):
            for index, sample in enumerate(reader._read(url, 0, None, count), start=start):
                if wanted is not None and index not in wanted:
                    continue
                try:
                    image, label = decode_image(sample, cfg.resolution, cfg.channels), class_of(sample, cfg)
                except BadSample as err:
                    reader._skip(f"sample '{sample['__key__']}' of shard {sample['__url__']}: {err}", 1)
                    continue
                images.append(image)
                labels.append(label)
            start += count
    except FatalDataError as err:
        raise UserError(str(err)) from None
    if not images:
        raise UserError(f"the shards in data.shards hold no readable image ({reader.skipped} skipped); check them")
    return np.ascontiguousarray(np.stack(images).transpose(0, 3, 1, 2)), np.array(labels, dtype=np.int64), \
        reader.skipped


class CachedBatches:
    """A rank's batches drawn from the whole dataset held on its device (`data.device_cache`), with no loader.

    Epoch e is a permutation of all N samples seeded by (seed, e), with per-sample flips drawn beside it; the epochs
    laid end to end are one stream. Each step takes the stream's next world x batch samples and rank r the r-th
    batch of them: ranks are disjoint, batches equal, and an epoch's last batch is completed with the next epoch's
    first samples (nothing dropped or repeated within an epoch). The position, shared by every rank, is the stream
    index of the next step, saved as [epoch, index in it, samples skipped while decoding]. Every index and image
    stays on the device: a batch is one gather, no host sync."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, cfg: DataConfig, batch: int, seed: int,
                 rank: int, world: int, position: Position, skipped: int = 0) -> None:
        self.images, self.labels, self.n = images, labels, len(images)
        self.batch, self.seed, self.rank, self.world, self.hflip = batch, seed, rank, world, cfg.hflip
        self.next = position[0] * self.n + position[1]
        self.skipped, self.epoch_size = skipped, self.n
        self.orders: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def _order(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        if epoch not in self.orders:
            rng = torch.Generator().manual_seed(_seed(self.seed, epoch))
            order = torch.randperm(self.n, generator=rng)
            flips = torch.randint(0, 2, (self.n,), generator=rng, dtype=torch.bool) if self.hflip else None
            self.orders = {e: o for e, o in self.orders.items() if e >= epoch - 1}
            self.orders[epoch] = (_to_device(order, self.images.device),
                                  None if flips is None else _to_device(flips, self.images.device))
        return self.orders[epoch]

    def __iter__(self) -> CachedBatches:
        return self

    def __next__(self) -> Batch:
        index, flips = [], []
        at, end = self.next + self.rank * self.batch, self.next + (self.rank + 1) * self.batch
        while at < end:
            epoch, i = divmod(at, self.n)
            take = min(end - at, self.n - i)
            order, flip = self._order(epoch)
            index.append(order[i:i + take])
            flips.append(None if flip is None else flip[index[-1]])
            at += take
        index = torch.cat(index) if len(index) > 1 else index[0]
        images = self.images[index]
        if self.hflip:
            flip = torch.cat(flips) if len(flips) > 1 else flips[0]
            images = torch.where(flip[:, None, None, None], images.flip(3), images)
        self.next += self.world * self.batch
        return images, self.labels[index]

    def state(self) -> torch.Tensor:
        return torch.tensor([[*divmod(self.next, self.n), self.skipped]], dtype=torch.int64)


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    # From pinned memory the copy is queued like a kernel; from pageable memory it would wait for the device.
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)


class DeviceBatches:
    """A rank's real batches on its device, as D sees them (see `to_real`), NHWC with `channels_last`.

    With `prefetch`, the next batch is fetched as soon as one is handed out, and its host-to-device copy (from the
    loader's pinned memory, on a side CUDA stream) overlaps the step that uses the current one. `state()` and
    `skipped` describe the batches handed out, not the one fetched ahead, so a checkpoint still resumes exactly."""

    def __init__(self, batches: PointBatches | ShardBatches | CachedBatches, device: torch.device,
                 prefetch: bool = True, channels_last: bool = False) -> None:
        self.batches, self.device, self.epoch_size = batches, device, batches.epoch_size
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.stream = torch.cuda.Stream(device) if prefetch and device.type == "cuda" else None
        self.prefetch = prefetch
        if prefetch:
            # A snapshot per batch: the source's own position runs one batch ahead of what was handed out.
            self.position = batches.state()
            self.ahead = self._fetch(), batches.state()

    def _fetch(self) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = next(self.batches)
        with torch.cuda.stream(self.stream) if self.stream else contextlib.nullcontext():
            real = to_real(images, self.device)
            if real.ndim == 4:
                real = real.contiguous(memory_format=self.memory_format)
            labels = labels.to(self.device, non_blocking=True)
        return real, labels

    def __iter__(self) -> DeviceBatches:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(real, labels) on the device."""
        if not self.prefetch:
            return self._fetch()
        batch, self.position = self.ahead
        if self.stream:
            # The step waits for the copy, and the allocator must not reuse the side stream's memory under it.
            torch.cuda.current_stream(self.device).wait_stream(self.stream)
            for t in batch:
                t.record_stream(torch.cuda.current_stream(self.device))
        self.ahead = self._fetch(), self.batches.state()
        return batch

    def state(self) -> torch.Tensor:
        return self.position if self.prefetch else self.batches.state()

    @property
    def skipped(self) -> int:
        return int(self.state()[:, 2].sum())


def to_real(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A batch on `device` as the float input D sees: uint8 images scaled to [-1, 1] (x / 127.5 - 1, as seed 000)."""
    batch = batch.to(device, non_blocking=True)
    return batch.float().div_(127.5).sub_(1.0) if batch.dtype == torch.uint8 else batch
