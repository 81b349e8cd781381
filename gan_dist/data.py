"""Training images as an endless, deterministic, resumable stream of batches for one rank: streamed from shards
(`ShardBatches`) or drawn from the whole dataset held on the device (`CachedBatches`), then handed to the step on
the device with the next batch prefetched (`DeviceBatches`, which carries `points.py`'s 2-D batches the same way).

Images come from webdataset shards (read by `shards.py`; MNIST's are written on first use by `mnist_shards.py`).
Every rank x loader-worker pair is a "slot", and each slot reads its stream in chunks:

- `data.mode=epoch`: chunk e is the slot's share of epoch e. Epoch e's sample order is one all ranks share: the
  shards permuted with a seed, laid end to end, and cut into windows of `data.shuffle_buffer` samples, each drawn
  in its own seeded order. That order is cut into `slots` contiguous parts of equal sample count (within one), so
  every sample is read by exactly one slot per epoch and all ranks get the same number of batches. A slot reads a
  window's samples at their offsets when the shard has an offset index, and otherwise streams the window's part
  of the shard and keeps what it needs. A slot's last batch of an epoch is completed with the first samples of its
  next epoch (the remainder rule: no sample is dropped or repeated within an epoch).
- `data.mode=resampled`: chunk k is `RESAMPLED_CHUNK` shards drawn with replacement by the slot's own RNG, seeded
  by (seed, chunk, rank, worker); its samples are drawn in windows of `data.shuffle_buffer`, each in its own seeded
  order. Streams never end, whatever the shard count.

Samples are decoded only once their place comes. A slot's position is (chunk, places taken from it, samples skipped
so far); the loop saves every slot's position with each checkpoint. A resumed slot on the same world size and worker
count goes on from its place (in epoch mode without reading what comes before it; a resampled chunk's windows are
re-read as raw bytes). On another, in epoch mode, what the old slots had left of each epoch they had begun is
shared by the new slots (`continue_epochs`, kept in the checkpoint as `spans` until those epochs are read), so no
sample is drawn twice or skipped. Bad images and truncated shards are skipped with a warning (or stop the run with
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
from typing import Callable, Generator, Iterator, NamedTuple

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


def draws(source: Source, seed: int, chunk: int, rank: int, worker: int) -> list[int]:
    """The shards resampled chunk `chunk` of a slot reads: `RESAMPLED_CHUNK` drawn with replacement by its own RNG."""
    rng = random.Random(_seed(seed, chunk, rank, worker))
    return [rng.randrange(len(source.urls)) for _ in range(RESAMPLED_CHUNK)]


def shard_order(source: Source, seed: int, epoch: int) -> list[int]:
    """The shards of epoch `epoch` in the order they are laid end to end: a permutation every rank shares."""
    order = list(range(len(source.urls)))
    random.Random(_seed(seed, epoch)).shuffle(order)
    return order


def window_order(seed: int, epoch: int, window: int, n: int) -> np.ndarray:
    """The order in which the `n` samples of one shuffle window of epoch `epoch` are drawn."""
    return np.random.default_rng(_seed(seed, epoch, window)).permutation(n)


Spans = list[tuple[int, int]]  # [start, end) ranges of an epoch's sample order, in order


def share(spans: Spans, slot: int, slots: int) -> Spans:
    """Slot `slot`'s part of `spans` laid end to end and cut into `slots` contiguous parts of equal count (within
    one)."""
    total = sum(b - a for a, b in spans)
    lo, hi, start, out = slot * total // slots, (slot + 1) * total // slots, 0, []
    for a, b in spans:
        x, y = max(lo, start), min(hi, start + b - a)
        if x < y:
            out.append((a + x - start, a + y - start))
        start += b - a
    return out


def drop(spans: Spans, n: int) -> Spans:
    """`spans` without their first `n` samples."""
    out = []
    for a, b in spans:
        if n < b - a:
            out.append((a + n, b))
        n = max(0, n - (b - a))
    return out


def merged(spans: Spans) -> Spans:
    out: Spans = []
    for a, b in sorted(spans):
        if out and out[-1][1] == a:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out


class FatalDataError(Exception):
    """A data fault that stops the run: a shard that cannot be opened, or any fault with data.on_error=raise."""


def class_of(sample: dict, cfg: DataConfig) -> int:
    """The sample's label; with data.classes set, a label outside 0..classes-1 (or none) makes it a bad sample."""
    label = sample_label(sample)
    if cfg.classes and not 0 <= label < cfg.classes:
        raise BadSample(f"cls {label} is not a class from 0 to {cfg.classes - 1} (data.classes={cfg.classes})"
                        if label >= 0 else f"no cls label, which data.classes={cfg.classes} asks of every sample")
    return label


class Read(NamedTuple):
    """How a shard's read ended: samples yielded, the fault that ended it early (or the manifest count it does not
    match), and samples it holds beyond that count."""

    got: int
    fault: str | None
    extra: int


def collect(reading: Generator[dict, None, Read]) -> tuple[list[dict], Read]:
    samples = []
    while True:
        try:
            samples.append(next(reading))
        except StopIteration as stop:
            return samples, stop.value


class _Forward:
    """A shard without an offset index, streamed once and forward across the windows of one chunk that need it
    (it cannot be read at an offset): `take` hands out the samples at rising indices as the windows ask."""

    def __init__(self, reading: Generator[dict, None, Read]) -> None:
        self.reading, self.at, self.read = reading, 0, None  # `at`: the index of the next sample the stream yields

    def take(self, keep: list[int], to_end: bool) -> tuple[list[dict], Read]:
        """The samples at the sorted indices `keep` (none before `at`), the first of them up to a fault; with
        `to_end`, the stream is read through, so that samples beyond the manifest's count are found."""
        wanted, out = set(keep), []
        while self.read is None and (self.at <= keep[-1] or to_end):
            try:
                sample = next(self.reading)
            except StopIteration as stop:
                self.read = stop.value
                break
            if self.at in wanted:
                out.append(sample)
            self.at += 1
        return out, self.read or Read(len(out), None, 0)


def _say(msg: str) -> None:
    print(f"[gan-dist] {msg}", file=sys.stderr, flush=True)


class ShardStream(IterableDataset):
    """Endless batches for one rank; batch i comes from logical worker i % workers (see `ShardBatches`). `spans`
    holds, for the epochs that the slots of an earlier world size had partly read, the parts of each epoch's order
    left to read (`continue_epochs`); every other epoch is read whole."""

    def __init__(self, source: Source, cfg: DataConfig, batch: int, seed: int, rank: int, world: int,
                 start_batch: int, positions: list[Position], spans: dict[int, Spans] | None = None) -> None:
        self.source, self.cfg, self.batch, self.seed = source, cfg, batch, seed
        self.rank, self.world, self.workers = rank, world, max(cfg.num_workers, 1)
        self.start_batch, self.positions, self.spans = start_batch, positions, spans or {}
        self.skipped = 0
        self.indexes: dict[str, list | None] = {}  # url -> its samples' offsets (None: no index, streamed)

    def _warn(self, what: str, lost: int) -> None:
        if self.cfg.on_error == "raise":
            raise FatalDataError(what)
        _say(f"warning: rank {self.rank}: {what}; skipped {lost} sample(s) (data.on_error=raise stops instead)")

    def _skip(self, what: str, lost: int) -> None:
        self._warn(what, lost)
        self.skipped += lost

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

    def _read(self, url: str, first: int, end: int | None, expected: int | None,
              keep: list[int] | None = None) -> Generator[dict, None, Read]:
        """Raw samples [first, end) of one shard in order (to its end when `end` is None). A fault ends the read
        early, so what it yields is always the first of the samples asked for. A local shard with an offset index
        is read at its members' offsets, without parsing a tar header, and only at the sorted indices `keep` when
        given; others are streamed whole (`_gather` takes what it needs from them through `_Forward`). A range
        that ends where the manifest says the shard ends reads on to its real end, so a shard holding more samples
        than its manifest lists is found."""
        cap = 4 * pixel_bound(self.cfg.resolution)  # no image this run decodes has a bigger member
        indexed = self._indexed(url)
        if indexed is not None:
            seen = len(indexed)
            stop = min(seen, end if end is not None else seen)
            picked = range(first, stop) if keep is None else [j for j in keep if j < stop]
            got = 0
            try:
                for sample in read_indexed(url.removeprefix("file:"), url, [indexed[j] for j in picked], cap):
                    yield sample
                    got += 1
            except (ShardError, OSError) as err:
                return Read(got, str(err), 0)
            return Read(got, *self._mismatch(url, seen, expected, end))
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
                if end is not None and seen >= end and end != expected:
                    break
        except ShardError as err:
            if err.key is None and is_remote(url) and first == 0:
                raise FatalDataError(f"shard {url}: nothing could be read ({err.reason}); check data.shards "
                                     f"(and data.timeout_s for a slow source)") from None
            return Read(got, str(err), 0)
        finally:
            try:
                stream.close()
            except OSError:
                pass  # a pipe: command closed early by us exits on SIGPIPE
        return Read(got, *self._mismatch(url, seen, expected, end))

    @staticmethod
    def _mismatch(url: str, seen: int, expected: int | None, end: int | None) -> tuple[str | None, int]:
        """For a shard read through `end` that holds `seen` samples where its manifest lists `expected`: what is
        wrong, when the read wanted samples it lacks or read on past the manifest's count; and how many samples it
        holds beyond that count."""
        if expected is None or end is None or not (seen < min(expected, end) or seen > expected == end):
            return None, 0
        return f"shard {url} holds {seen} samples, its manifest lists {expected}", max(seen - expected, 0)

    def _shard(self, url: str, expected: int | None, loud: Callable[[], bool] = lambda: True) -> Iterator[dict]:
        """Every sample of one shard in order; the samples a fault loses are skipped and counted when `loud()`."""
        read = yield from self._read(url, 0, expected, expected)
        lost = (max(expected - read.got, 0) if expected is not None else 0) + read.extra
        if read.fault and loud():
            self._skip(read.fault, max(lost, 1))

    def _gather(self, order: list[int], ends: np.ndarray, wanted: list[int],
                streams: dict[int, _Forward]) -> tuple[dict[int, dict], dict[int, int]]:
        """The samples at places `wanted` of an epoch whose shards are laid end to end in `order` (ending at
        `ends`), by place; and the samples lost at each place (a fault, or a shard's samples beyond its manifest,
        counted at its last listed place), warned about here and counted as the stream passes them. Shards without
        an offset index go on from their open stream in `streams` (by place in `order`); those the windows have
        passed are closed."""
        counts = self.source.counts
        by_shard: dict[int, list[int]] = {}
        for place, laid in zip(wanted, np.searchsorted(ends, wanted, side="right").tolist()):
            by_shard.setdefault(laid, []).append(place)
        for passed in [laid for laid in streams if laid < min(by_shard)]:
            streams.pop(passed).reading.close()
        got, lost = {}, {}
        for laid, places in sorted(by_shard.items()):
            i = order[laid]
            base = int(ends[laid]) - counts[i]
            keep = sorted(p - base for p in places)
            url = self.source.urls[i]
            if self._indexed(url) is not None:
                samples, read = collect(self._read(url, keep[0], keep[-1] + 1, counts[i], keep))
            else:
                if laid not in streams or streams[laid].at > keep[0]:
                    streams[laid] = _Forward(self._read(url, 0, counts[i], counts[i]))
                samples, read = streams[laid].take(keep, keep[-1] == counts[i] - 1)
            got.update((base + j, sample) for j, sample in zip(keep, samples))
            missing = [base + j for j in keep[len(samples):]]
            lost.update((place, 1) for place in missing)
            extra = read.extra if keep[-1] == counts[i] - 1 else 0
            if extra:
                lost[base + keep[-1]] = lost.get(base + keep[-1], 0) + extra
            if missing or extra:
                self._warn(read.fault, len(missing) + extra)
        return got, lost

    def _epoch(self, chunk: int, slot: int, slots: int, start: int) -> Iterator[tuple[int, dict]]:
        """Slot `slot`'s share of epoch `chunk` from its place `start` on, as (place in the share, 1-based; raw
        sample). The epoch's order: its shards laid end to end (`shard_order`), cut into windows of
        `data.shuffle_buffer` samples, each drawn in its own order (`window_order`)."""
        counts, size = self.source.counts, self.cfg.shuffle_buffer
        total, order = sum(counts), shard_order(self.source, self.seed, chunk)
        ends = np.cumsum([counts[i] for i in order])
        spans = drop(share(self.spans.get(chunk, [(0, total)]), slot, slots), start)
        k, streams = start, {}
        try:
            for a, b in spans:
                for w in range(a // size, (b - 1) // size + 1):
                    lo = w * size
                    perm = window_order(self.seed, chunk, w, min(size, total - lo))
                    wanted = (lo + perm[max(a, lo) - lo:min(b, lo + size) - lo]).tolist()
                    got, lost = self._gather(order, ends, wanted, streams)
                    for place in wanted:
                        k += 1
                        self.skipped += lost.get(place, 0)
                        if place in got:
                            yield k, got[place]
        finally:
            for stream in streams.values():
                stream.reading.close()

    def _drawn(self, chunk: int, worker: int, start: int) -> Iterator[tuple[int, dict]]:
        """A resampled chunk from its place `start` on, as (place, 1-based; raw sample): its shards' samples in
        windows of `data.shuffle_buffer`, each drawn in its own order. The windows begun before `start` are read
        again (their places are not known otherwise), without counting their faults a second time."""
        size, counts = self.cfg.shuffle_buffer, self.source.counts
        read, read_before = 0, -(-start // size) * size
        raw = itertools.chain.from_iterable(
            self._shard(self.source.urls[i], counts[i] if counts else None, lambda: read >= read_before)
            for i in draws(self.source, self.seed, chunk, self.rank, worker))
        for w in itertools.count():
            window = list(itertools.islice(raw, size))
            if not window:
                return
            if read + len(window) > start:
                perm = np.random.default_rng(_seed(self.seed, chunk, self.rank, worker, w)).permutation(len(window))
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
        chunk, offset, self.skipped = self.positions[worker]
        items, empty = [], 0
        for chunk in itertools.count(chunk):
            taken = offset
            # Samples before `offset` were handed out before the checkpoint: they are not read again.
            for taken, sample in self._chunk(chunk, worker, offset):
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
    return start_positions(saved, "epoch", 0, world, 1, epoch, say, same_layout=layout != "stream")[0][0]


def spans_tensor(spans: dict[int, Spans]) -> torch.Tensor:
    """`ShardStream.spans` as the (k, 3) rows [epoch, start, end] a checkpoint holds."""
    rows = [[e, a, b] for e, part in sorted(spans.items()) for a, b in part]
    return torch.tensor(rows, dtype=torch.int64).reshape(-1, 3)


def spans_of(rows: torch.Tensor) -> dict[int, Spans]:
    spans: dict[int, Spans] = {}
    for e, a, b in rows.tolist():
        spans.setdefault(e, []).append((a, b))
    return spans


def continue_epochs(saved: torch.Tensor, spans: dict[int, Spans], total: int) -> tuple[int, dict[int, Spans]]:
    """The epoch that slots of another layout continue from, and what is left of it and of the later epochs that
    the checkpoint's slots (its rows, each [chunk, places taken, skipped]) had begun or had left in part (`spans`):
    each slot's share of an epoch, less the places it had taken."""
    rows = saved.tolist()
    first, last = min(r[0] for r in rows), max([r[0] for r in rows] + list(spans))
    left = {}
    for e in range(first, last + 1):
        parts = [part for s, (chunk, taken, _) in enumerate(rows) if chunk <= e
                 for part in drop(share(spans.get(e, [(0, total)]), s, len(rows)), taken if chunk == e else 0)]
        if parts:
            left[e] = merged(parts)
    return min(left, default=last + 1), left


def start_positions(saved: torch.Tensor, mode: str, rank: int, world: int, workers: int, epoch: int,
                    say: Callable[[str], None], same_layout: bool = True, spans: dict[int, Spans] | None = None,
                    total: int = 0) -> tuple[list[Position], dict[int, Spans]]:
    """Each logical worker's starting position, and the parts of epochs left to read (`ShardStream.spans`). On the
    same world size and worker count, the saved ones. On another, in epoch mode (the dataset's `total` samples),
    the epochs the checkpoint's slots had begun are continued: this run's slots share what they had left, so no
    sample is drawn twice or skipped. Otherwise (resampled mode, or positions of the other data path: `same_layout`
    False) the start of epoch `epoch` or of fresh draws."""
    spans = spans or {}
    if saved.numel() == 0:
        return [[0, 0, 0] for _ in range(workers)], {}
    if same_layout and saved.shape[0] == world * workers:
        return saved[rank * workers:(rank + 1) * workers].tolist(), spans
    if same_layout and mode == "epoch" and total and all(0 <= a < b <= total for s in spans.values() for a, b in s):
        chunk, left = continue_epochs(saved, spans, total)
        done = total - sum(b - a for a, b in left.get(chunk, [(0, total)]))
        say(f"data: continuing at sample {done} of epoch {chunk} with world size {world} ({world * workers} rank x "
            f"worker slots, the checkpoint's {saved.shape[0]}): no sample of the epoch is drawn twice or skipped")
        skipped = int(saved[:, 2].sum()) if rank == 0 else 0  # the run's count so far, carried by one slot
        return [[chunk, 0, skipped if w == 0 else 0] for w in range(workers)], left
    chunk = epoch if mode == "epoch" or not same_layout else int(saved[:, 0].max()) + 1
    held = f"positions for {saved.shape[0]} rank x worker slots, this run has {world * workers}" if same_layout \
        else "the positions of the other data path (the device cache's or the loader's)"
    say(f"data: the checkpoint holds {held}; restarting at the start of chunk {chunk} "
        f"({'epoch' if mode == 'epoch' else 'draw'}). Exact resume needs the same world size, data.num_workers and "
        "data.device_cache.")
    return [[chunk, 0, 0] for _ in range(workers)], {}


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
            for index, sample in enumerate(reader._shard(url, count), start=start):
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
                 prefetch: bool = True, channels_last: bool = False, stand_in: Batch | None = None) -> None:
        self.batches, self.device, self.epoch_size = batches, device, batches.epoch_size
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
