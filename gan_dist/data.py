"""Training images as an endless, deterministic, resumable stream of batches for one rank: decoded and batched from
shards (`ShardStream`, `ShardBatches`) or drawn from the whole dataset held on the device (`CachedBatches`), then
handed to the step on the device with the next batch prefetched (`DeviceBatches`, which carries `points.py`'s 2-D
batches the same way). `open_batches` opens them for a run, continuing at a checkpoint's `DataState`.

Images come from webdataset shards (read by `shards.ShardReader`, which also counts what faults lose; MNIST's are
written on first use by `mnist_shards.py`). The order they are drawn in, and where a resumed run goes on in it, is
`order.py`'s: every rank x loader-worker pair is a "slot" that reads its stream in chunks, an epoch's share
(`data.mode=epoch`) or a few shards drawn with replacement (`data.mode=resampled`). A slot's last batch of an epoch
is completed with the first samples of its next epoch (the remainder rule: no sample is dropped or repeated within
an epoch).

Samples are decoded only once their place comes. A slot's position is (chunk, places taken from it, samples skipped
so far); each batch carries its slot's, and every checkpoint keeps all of them (`DataState.pos`). A resumed slot on
the same world size and worker count goes on from its place (in epoch mode without reading what comes before it; a
resampled chunk's windows are re-read as raw bytes). On another, in epoch mode, the new slots share what the old
ones had left (`order.continue_epochs`, kept as `DataState.spans` until those epochs are read). Bad images are
skipped with a warning (or stop the run with `data.on_error=raise`); the skip count travels with the position.

With `data.device_cache` (MNIST, Stacked MNIST always, or any epoch-mode shard set that fits), the loader is
skipped: the whole dataset is decoded once into a uint8 tensor on the device and batches are gathered from it
(`CachedBatches`). `data.limit=N` always takes that path (on the host with `data.device_cache=false`): the N samples
are decoded once and held.

This module knows the rank and world size only as numbers it is given; it does not touch the Accelerator.
"""

from __future__ import annotations

import contextlib
import itertools
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from gan_dist import mnist, stacked
from gan_dist.config import IMAGE_DATASETS, DataConfig, PerfConfig
from gan_dist.errors import UserError
from gan_dist.images import BadSample, decode_image, pixel_bound, sample_label
from gan_dist.mnist_shards import ensure_shards
from gan_dist.order import Position, Spans, cache_order, cache_position, draws, drawn_order, epoch_places, \
    shard_order, slot_spans, spans_of, spans_tensor, start_positions
from gan_dist.points import PointBatches
from gan_dist.shardformat import manifest_counts, read_index
from gan_dist.shards import FatalDataError, Laid, ShardError, ShardReader, check_local, expand_urls, is_remote
from gan_dist.signals import ignore_in_worker

Batch = tuple[torch.Tensor, torch.Tensor]  # images (B, C, H, W) uint8; labels (B,)
T = TypeVar("T")


@dataclass
class Source:
    """The shards of a run: URLs and, when a manifest lists them, each one's sample count."""

    urls: list[str]
    counts: list[int] | None


def open_source(cfg: DataConfig) -> Source:
    """The shards of `data.dataset` (MNIST's, written on first use, or `data.shards` with its manifest) as a
    Source; UserError naming the problem and the fix."""
    if cfg.dataset == "stacked_mnist":  # composed from MNIST's training digits on the device: no shards
        if cfg.download and not mnist.files_present(cfg.mnist_dir):
            mnist.download_mnist(cfg.mnist_dir)
        return Source([], [stacked.TRIPLES])
    if cfg.dataset == "mnist":
        manifest = ensure_shards(cfg.mnist_dir, cfg.cache_dir, cfg.download)
        shards = manifest["splits"]["train"]["shards"]
        return Source([str(Path(cfg.cache_dir) / s["name"]) for s in shards], [s["num_samples"] for s in shards])
    urls = expand_urls(cfg.shards)
    if not urls:
        raise UserError("data.shards is empty; set it to shard URLs, e.g. data.shards=/data/train-{00000..00009}.tar")
    check_local(urls)
    # With data.on_error=raise, a stale offset index stops the run here, before training, rather than in the one
    # rank that meets it; with warn, the shard's reader streams it without its index.
    for url in (u for u in urls if not is_remote(u) and cfg.on_error == "raise"):
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


def class_of(sample: dict, cfg: DataConfig) -> int:
    """The sample's label; with data.classes set, a label outside 0..classes-1 (or none) makes it a bad sample."""
    label = sample_label(sample)
    if cfg.classes and not 0 <= label < cfg.classes:
        raise BadSample(f"cls {label} is not a class from 0 to {cfg.classes - 1} (data.classes={cfg.classes})"
                        if label >= 0 else f"no cls label, which data.classes={cfg.classes} asks of every sample")
    return label


def shard_reader(source: Source, cfg: DataConfig, rank: int) -> ShardReader:
    """Rank `rank`'s reader of `source`, with this run's fault policy, member cap and remote watchdog."""
    return ShardReader(source.urls, source.counts, rank=rank, on_error=cfg.on_error,
                       cap=4 * pixel_bound(cfg.resolution),  # no image this run decodes has a bigger member
                       timeout_s=cfg.timeout_s, min_rate_kbs=cfg.min_rate_kbs, index=read_index)


class ShardStream(IterableDataset):
    """Endless batches for one rank; batch i comes from logical worker i % workers (see `ShardBatches`). Each
    logical worker reads its chunks in `order.py`'s order through `reader` (which counts the samples skipped), and
    decodes and batches them. `spans` holds, for the epochs that the slots of an earlier world size had partly read,
    the parts of each epoch's order left to read (`order.continue_epochs`); every other epoch is read whole."""

    def __init__(self, source: Source, cfg: DataConfig, batch: int, seed: int, rank: int, world: int,
                 start_batch: int, positions: list[Position], spans: dict[int, Spans] | None = None) -> None:
        self.source, self.cfg, self.batch, self.seed = source, cfg, batch, seed
        self.rank, self.world, self.workers = rank, world, max(cfg.num_workers, 1)
        self.start_batch, self.positions, self.spans = start_batch, positions, spans or {}
        self.reader = shard_reader(source, cfg, rank)

    def _epoch(self, chunk: int, slot: int, slots: int, start: int) -> Iterator[tuple[int, dict]]:
        """Slot `slot`'s share of epoch `chunk` from its place `start` on, as (place in the share, 1-based; raw
        sample), read at the places `order.epoch_places` draws; the samples a fault lost are counted as their
        places pass."""
        total = sum(self.source.counts)
        spans = slot_spans(self.spans, chunk, slot, slots, start, total)
        laid, k = Laid(self.reader, shard_order(len(self.source.urls), self.seed, chunk)), start
        try:
            for wanted in epoch_places(self.seed, chunk, spans, self.cfg.shuffle_buffer, total):
                got, lost = laid.gather(wanted)
                for place in wanted:
                    k += 1
                    self.reader.skipped += lost.get(place, 0)
                    if place in got:
                        yield k, got[place]
        finally:
            laid.close()

    def _drawn(self, chunk: int, worker: int, start: int) -> Iterator[tuple[int, dict]]:
        """A resampled chunk from its place `start` on, as (place, 1-based; raw sample): its shards' samples in
        windows of `data.shuffle_buffer`, each drawn in its own order. The windows begun before `start` are read
        again (their places are not known otherwise), without counting their faults a second time."""
        size, counts = self.cfg.shuffle_buffer, self.source.counts
        read, read_before = 0, -(-start // size) * size
        raw = itertools.chain.from_iterable(
            self.reader.shard(self.source.urls[i], counts[i] if counts else None, lambda: read >= read_before)
            for i in draws(len(self.source.urls), self.seed, chunk, self.rank, worker))
        for w in itertools.count():
            window = list(itertools.islice(raw, size))
            if not window:
                return
            if read + len(window) > start:
                perm = drawn_order(self.seed, chunk, self.rank, worker, w, len(window))
                for k, j in enumerate(perm.tolist(), start=read + 1):
                    if k > start:
                        yield k, window[j]
            read += len(window)

    def _chunk(self, chunk: int, worker: int, start: int = 0) -> Iterator[tuple[int, dict]]:
        if self.cfg.mode == "resampled":
            return self._drawn(chunk, worker, start)
        return self._epoch(chunk, self.rank * self.workers + worker, self.world * self.workers, start)

    def _decode(self, sample: dict, chunk: int) -> tuple[np.ndarray, int]:
        # The flip depends on the sample and epoch alone, so a resumed stream flips exactly as the original did.
        name = f"{self.seed}/{chunk}/{sample['__url__']}/{sample['__key__']}"
        flip = self.cfg.hflip and zlib.crc32(name.encode()) & 1
        return decode_image(sample, self.cfg.resolution, self.cfg.channels, bool(flip)), class_of(sample, self.cfg)

    def _batches(self, worker: int) -> Iterator[tuple]:
        chunk, offset, self.reader.skipped = self.positions[worker]
        items, empty = [], 0
        for chunk in itertools.count(chunk):
            taken = offset
            # Samples before `offset` were handed out before the checkpoint: they are not read again.
            for taken, sample in self._chunk(chunk, worker, offset):
                try:
                    items.append(self._decode(sample, chunk))
                except BadSample as err:
                    self.reader.skip(f"sample '{sample['__key__']}' of shard {sample['__url__']}: {err}", 1)
                    continue
                if len(items) == self.batch:
                    images = torch.from_numpy(np.stack([im for im, _ in items])).permute(0, 3, 1, 2)
                    labels = torch.tensor([label for _, label in items])
                    # Plain ints: the main process reads the position without touching a tensor.
                    yield images, labels, (worker, chunk, taken, self.reader.skipped)
                    items = []
            empty = 0 if taken > offset else empty + 1
            offset = 0
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

    def close(self) -> None:
        """Stop the loader's worker processes now (closing the loader's generator ends its DataLoader iterator,
        which shuts its workers down), not whenever the last reference goes: at interpreter exit that shutdown is
        skipped, and multiprocessing's SIGTERM to the workers is ignored (`ignore_in_worker`)."""
        self.loader.close()

    @property
    def skipped(self) -> int:
        return sum(p[2] for p in self.positions)


def shard_batches(source: Source, cfg: DataConfig, batch: int, seed: int, rank: int, world: int,
                  start_batch: int = 0, positions: list[Position] | None = None, spans: dict[int, Spans] | None = None,
                  pin_memory: bool = False) -> ShardBatches:
    workers = max(cfg.num_workers, 1)
    if cfg.mode == "epoch" and min(len(source.urls), sum(source.counts)) < world * workers:
        raise UserError(f"data.mode=epoch needs at least one shard per rank x loader worker, but there are "
                        f"{len(source.urls)} shards ({sum(source.counts)} samples) for {world} ranks x {workers} "
                        f"workers = {world * workers}; "
                        f"write more, smaller shards (scripts/make_shards.py --max-count N), lower "
                        f"data.num_workers, or use data.mode=resampled")
    positions = positions or [[0, 0, 0] for _ in range(workers)]
    stream = ShardStream(source, cfg, batch, seed, rank, world, start_batch, positions, spans)
    return ShardBatches(stream, pin_memory)


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


def decode_dataset(source: Source, cfg: DataConfig) -> tuple[np.ndarray | stacked.StackedImages, np.ndarray, int]:
    """Every sample of `source` (or the `data.limit` of them) as uint8 images (N, C, H, W) and int64 labels (N,), in
    shard order, and the count of bad samples skipped. MNIST at its own 28x28 grayscale comes straight from its IDX
    files, Stacked MNIST is composed from them. A sample's index is its shard's start (from the manifest's counts)
    plus its place in the shard."""
    keep = limited(sum(source.counts), cfg.limit)
    if cfg.dataset == "stacked_mnist":
        images, labels = stacked.stacked(*mnist.load_mnist(cfg.mnist_dir)["train"], keep)
        return images, labels.astype(np.int64), 0
    if cfg.dataset == "mnist" and (cfg.resolution, cfg.channels) == (28, 1) and mnist.files_present(cfg.mnist_dir):
        images, labels = mnist.load_mnist(cfg.mnist_dir)["train"]
        images, labels = (images, labels) if keep is None else (images[keep], labels[keep])
        return images[:, None], labels.astype(np.int64), 0
    wanted = None if keep is None else set(keep.tolist())
    reader = shard_reader(source, cfg, 0)
    images, labels, start = [], [], 0
    try:
        for url, count in zip(source.urls, source.counts):
            for index, sample in enumerate(reader.shard(url, count), start=start):
                if wanted is not None and index not in wanted:
                    continue
                try:
                    image, label = decode_image(sample, cfg.resolution, cfg.channels), class_of(sample, cfg)
                except BadSample as err:
                    reader.skip(f"sample '{sample['__key__']}' of shard {sample['__url__']}: {err}", 1)
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
            order, flips = cache_order(self.seed, epoch, self.n, self.hflip)
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


@dataclass
class DataState:
    """What a checkpoint keeps of the data, in the checkpoint's existing fields (the file format is unchanged)."""

    pos: torch.Tensor  # (rows, 3) int64 [chunk, taken, skipped]: on save, this rank's own rows (the checkpointer
    #                    gathers them over ranks); on load, every rank's rows (the gathered tensor)
    spans: torch.Tensor  # (n, 3) int64 [epoch, start, end]: the parts of epochs left to the loader's slots after a
    #                      resume on another world size (`order.spans_tensor`)
    layout: str  # what pos holds: "cache" (one global position), "stream" (one per loader slot), or "" (neither)
    batches: int  # micro-batches this rank has taken from its stream

    @staticmethod
    def fresh() -> DataState:
        """A run's start: no positions or spans, no layout, no batch taken."""
        return DataState(torch.empty(0, 3, dtype=torch.int64), torch.empty(0, 3, dtype=torch.int64), "", 0)


class DeviceBatches:
    """A rank's real batches on its device, as D sees them (see `to_real`), NHWC with `channels_last`.

    With `prefetch`, the next batch is fetched as soon as one is handed out, and its host-to-device copy (from the
    loader's pinned memory, on a side CUDA stream) overlaps the step that uses the current one. `state()` and
    `skipped` describe the batches handed out, not the one fetched ahead, so a checkpoint still resumes exactly:
    the source's positions, the `spans` and `layout` its opening decided, and the micro-batches handed out, counted
    on from `taken`."""

    def __init__(self, batches: PointBatches | ShardBatches | CachedBatches, device: torch.device,
                 prefetch: bool = True, channels_last: bool = False, stand_in: Batch | None = None, *,
                 taken: int = 0, spans: torch.Tensor | None = None, layout: str = "") -> None:
        self.batches, self.device, self.epoch_size = batches, device, batches.epoch_size
        self.taken, self.layout = taken, layout
        self.spans = torch.empty(0, 3, dtype=torch.int64) if spans is None else spans
        # With several ranks, a data fault here (a UserError from the loader) is kept in `failed` and `stand_in`
        # (a blank batch) is handed out instead: the other ranks wait in the step's collectives, so this rank
        # goes on with them until they all agree, at the next stop vote, to stop.
        self.stand_in, self.failed = stand_in, None
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.stream = torch.cuda.Stream(device) if prefetch and device.type == "cuda" else None
        self.prefetch = prefetch
        if prefetch:
            # A snapshot per batch: the source's own position runs one batch ahead of what was handed out.
            self.position = batches.state()
            self.ahead = self._fetch(), batches.state()

    def _fetch(self) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            images, labels = next(self.batches) if self.failed is None else self.stand_in
        except UserError as err:
            if self.stand_in is None:
                raise
            self.failed = str(err)
            images, labels = self.stand_in
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
            batch = self._fetch()
        else:
            batch, self.position = self.ahead
            if self.stream:
                # The step waits for the copy, and the allocator must not reuse the side stream's memory under it.
                torch.cuda.current_stream(self.device).wait_stream(self.stream)
                for t in batch:
                    t.record_stream(torch.cuda.current_stream(self.device))
            self.ahead = self._fetch(), self.batches.state()
        self.taken += 1
        return batch

    def close(self) -> None:
        """End the source's loader workers, if it has any (a second call does nothing)."""
        close = getattr(self.batches, "close", None)
        if close is not None:
            close()

    def positions(self) -> torch.Tensor:
        """(rows, 3) int64: the source's positions after the last batch handed out."""
        return self.position if self.prefetch else self.batches.state()

    def state(self) -> DataState:
        """What a checkpoint keeps of this rank's data, with this rank's own positions."""
        return DataState(self.positions(), self.spans, self.layout, self.taken)

    @property
    def skipped(self) -> int:
        return int(self.positions()[:, 2].sum())


def to_real(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A batch on `device` as the float input D sees: uint8 images scaled to [-1, 1] (x / 127.5 - 1, as seed 000)."""
    batch = batch.to(device, non_blocking=True)
    return batch.float().div_(127.5).sub_(1.0) if batch.dtype == torch.uint8 else batch


def open_batches(cfg: DataConfig, perf: PerfConfig, *, batch: int, seed: int, rank: int, world: int,
                 device: torch.device, saved: DataState, nimg: int,
                 first: Callable[[Callable[[], T]], T], say: Callable[[str], None]) -> DeviceBatches:
    """This rank's real batches of `batch` images on its device, continuing at the data state `saved` (a
    checkpoint's, or `DataState.fresh()`) of a run that has seen `nimg` images. `first(fn)` runs `fn` on each
    node's main process before the node's other ranks; `say` prints a line once per run."""
    if cfg.dataset not in IMAGE_DATASETS:
        return DeviceBatches(PointBatches(cfg, batch, seed, rank, saved.batches), device, perf.prefetch,
                             taken=saved.batches, spans=saved.spans, layout=saved.layout)
    # Each node's main process writes MNIST's shards on first use while the other ranks wait.
    source = first(lambda: open_source(cfg))
    epoch = nimg // (cfg.limit or sum(source.counts)) if source.counts else 0
    # data.limit's few samples are held too: on the host when the device cache is turned off.
    cached = wants_device_cache(cfg, source) or cfg.limit > 0 or cfg.dataset == "stacked_mnist"
    held_on = device if cached and cfg.device_cache is not False else torch.device("cpu")
    if cached:
        try:
            images, labels, skipped = decode_dataset(source, cfg)
            held = images.to(held_on) if isinstance(images, stacked.StackedImages) else \
                torch.from_numpy(images).to(held_on), torch.from_numpy(labels).to(held_on)
        except (MemoryError, torch.cuda.OutOfMemoryError):
            raise UserError(f"data.device_cache={cfg.device_cache}: the decoded dataset does not fit in "
                            f"{device.type} memory; use data.device_cache=false (the loader)") from None
        subset = f"data.limit={cfg.limit} of {sum(source.counts)}: " if cfg.limit else ""
        say(f"data: {subset}{len(images)} images ({images.nbytes / 2**20:.0f} MB) decoded once and held on "
            f"{held_on.type} (data.device_cache={cfg.device_cache})")
        position = cache_position(saved.pos, saved.layout, world, epoch, say)
        batches = CachedBatches(*held, cfg, batch, seed, rank, world, position, skipped)
        return DeviceBatches(batches, device, prefetch=held_on != device and perf.prefetch,
                             channels_last=perf.channels_last, taken=saved.batches, spans=spans_tensor({}),
                             layout="cache")
    stand_in = (torch.zeros(batch, cfg.channels, cfg.resolution, cfg.resolution, dtype=torch.uint8),
                torch.zeros(batch, dtype=torch.int64)) if world > 1 else None
    positions, spans = start_positions(saved.pos, cfg.mode, rank, world, max(cfg.num_workers, 1), epoch, say,
                                       same_layout=saved.layout != "cache", spans=spans_of(saved.spans),
                                       total=sum(source.counts or []))
    batches = shard_batches(source, cfg, batch, seed, rank, world, saved.batches, positions, spans,
                            pin_memory=device.type == "cuda" and perf.prefetch)
    return DeviceBatches(batches, device, perf.prefetch, perf.channels_last, stand_in, taken=saved.batches,
                         spans=spans_tensor(spans), layout="stream")
