"""The order in which training samples are drawn, and where a resumed run goes on in it: pure functions of seeds,
counts and positions (no I/O, no processes), shared by the loader and the device cache in `data.py`.

Every rank x loader-worker pair is a "slot", and each slot reads its stream in chunks:

- `data.mode=epoch`: chunk e is the slot's share of epoch e. Epoch e's sample order is one all ranks share: the
  shards permuted with a seed (`shard_order`), laid end to end, and cut into windows of `data.shuffle_buffer`
  samples, each drawn in its own seeded order (`window_order`, `epoch_places`). That order is cut into `slots`
  contiguous parts of equal sample count (within one, `share`), so every sample is read by exactly one slot per
  epoch and all ranks get the same number of batches.
- `data.mode=resampled`: chunk k is `RESAMPLED_CHUNK` shards drawn with replacement by the slot's own RNG, seeded
  by (seed, chunk, rank, worker) (`draws`); its samples are drawn in windows of `data.shuffle_buffer`, each in its
  own seeded order (`drawn_order`). Streams never end, whatever the shard count.
- the device cache: epoch e is one permutation of all samples seeded by (seed, e), with per-sample flips drawn
  beside it (`cache_order`).

A slot's position is (chunk, places taken from it, samples skipped so far). A resumed slot on the same world size and
worker count goes on from its place. On another, in epoch mode, what the old slots had left of each epoch they had
begun is shared by the new slots (`continue_epochs`, `start_positions`; a checkpoint keeps it as spans, `Spans`
ranges of an epoch's order, until those epochs are read), so no sample is drawn twice or skipped. The device cache
keeps one position in its global stream, which any world size continues (`cache_position`).
"""

from __future__ import annotations

import bisect
import itertools
import random
from typing import Callable, Iterator

import numpy as np
import torch

RESAMPLED_CHUNK = 4  # shards per resampled chunk: a resumed worker re-reads at most this many
Position = list[int]  # [chunk, samples taken from it, samples skipped so far]
Spans = list[tuple[int, int]]  # [start, end) ranges of an epoch's sample order, in order


def seed_of(*parts: int) -> int:
    """One 32-bit seed from several numbers (seed, epoch, ...), each tuple its own independent stream."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


def shard_order(shards: int, seed: int, epoch: int) -> list[int]:
    """The `shards` shards of epoch `epoch` in the order they are laid end to end: a permutation every rank
    shares."""
    order = list(range(shards))
    random.Random(seed_of(seed, epoch)).shuffle(order)
    return order


def window_order(seed: int, epoch: int, window: int, n: int) -> np.ndarray:
    """The order in which the `n` samples of one shuffle window of epoch `epoch` are drawn."""
    return np.random.default_rng(seed_of(seed, epoch, window)).permutation(n)


def epoch_places(seed: int, epoch: int, spans: Spans, size: int, total: int) -> Iterator[list[int]]:
    """The places (in epoch `epoch`'s shards laid end to end, `total` samples) that the positions `spans` of the
    epoch's order draw, in order: one list per shuffle window of `size` samples that the spans reach into."""
    for a, b in spans:
        for w in range(a // size, (b - 1) // size + 1):
            lo = w * size
            perm = window_order(seed, epoch, w, min(size, total - lo))
            yield (lo + perm[max(a, lo) - lo:min(b, lo + size) - lo]).tolist()


def share(spans: Spans, slot: int, slots: int) -> Spans:
    """Slot `slot`'s part of `spans` laid end to end and cut into `slots` contiguous parts of equal count (within
    one)."""
    return _part(spans, _ends(spans), slot, slots)


def _ends(spans: Spans) -> list[int]:
    return list(itertools.accumulate(b - a for a, b in spans))


def _part(spans: Spans, ends: list[int], slot: int, slots: int) -> Spans:
    """`share`, given where each of `spans` ends when they are laid end to end (`_ends`), so that `continue_epochs`
    lays them out once for every slot. Only the spans that reach into the slot's part are looked at: after a change
    of world size an epoch holds about one span per old slot, thousands on a big cluster."""
    total = ends[-1] if ends else 0
    lo, hi, out = slot * total // slots, (slot + 1) * total // slots, []
    for i in range(bisect.bisect_right(ends, lo), len(spans)):
        a, b = spans[i]
        start = ends[i] - (b - a)
        if start >= hi:
            break
        x, y = max(lo, start), min(hi, ends[i])
        if x < y:
            out.append((a + x - start, a + y - start))
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
    """`spans` sorted, those that touch joined into one."""
    out: Spans = []
    for a, b in sorted(spans):
        if out and out[-1][1] == a:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out


def slot_spans(left: dict[int, Spans], epoch: int, slot: int, slots: int, start: int, total: int) -> Spans:
    """What slot `slot` of `slots` reads of epoch `epoch` (`total` samples) from its place `start` on: its share
    of what is `left` of the epoch after a change of world size, or of the whole epoch."""
    return drop(share(left.get(epoch, [(0, total)]), slot, slots), start)


def draws(shards: int, seed: int, chunk: int, rank: int, worker: int) -> list[int]:
    """Which of the `shards` shards resampled chunk `chunk` of a slot reads: `RESAMPLED_CHUNK` drawn with
    replacement by its own RNG."""
    rng = random.Random(seed_of(seed, chunk, rank, worker))
    return [rng.randrange(shards) for _ in range(RESAMPLED_CHUNK)]


def drawn_order(seed: int, chunk: int, rank: int, worker: int, window: int, n: int) -> np.ndarray:
    """The order in which the `n` samples of shuffle window `window` of a slot's resampled chunk are drawn."""
    return np.random.default_rng(seed_of(seed, chunk, rank, worker, window)).permutation(n)


def cache_order(seed: int, epoch: int, n: int, hflip: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Epoch `epoch` of the device cache's `n` samples: their order, and with `hflip` which of them are flipped
    (drawn from the same generator, after the order), on the host."""
    rng = torch.Generator().manual_seed(seed_of(seed, epoch))
    order = torch.randperm(n, generator=rng)
    return order, torch.randint(0, 2, (n,), generator=rng, dtype=torch.bool) if hflip else None


def continue_epochs(saved: torch.Tensor, spans: dict[int, Spans], total: int) -> tuple[int, dict[int, Spans]]:
    """The epoch that slots of another layout continue from, and what is left of it and of the later epochs that
    the checkpoint's slots (its rows, each [chunk, places taken, skipped]) had begun or had left in part (`spans`):
    each slot's share of an epoch, less the places it had taken."""
    rows = saved.tolist()
    first, last = min(r[0] for r in rows), max([r[0] for r in rows] + list(spans))
    left = {}
    for e in range(first, last + 1):
        whole = spans.get(e, [(0, total)])
        ends = _ends(whole)
        parts = [part for s, (chunk, taken, _) in enumerate(rows) if chunk <= e
                 for part in drop(_part(whole, ends, s, len(rows)), taken if chunk == e else 0)]
        if parts:
            left[e] = merged(parts)
    return min(left, default=last + 1), left


def start_positions(saved: torch.Tensor, mode: str, rank: int, world: int, workers: int, epoch: int,
                    say: Callable[[str], None], same_layout: bool = True, spans: dict[int, Spans] | None = None,
                    total: int = 0) -> tuple[list[Position], dict[int, Spans]]:
    """Each logical worker's starting position, and the parts of epochs left to read (`slot_spans`' `left`). On
    the same world size and worker count, the saved ones. On another, in epoch mode (the dataset's `total`
    samples), the epochs the checkpoint's slots had begun are continued: this run's slots share what they had left,
    so no sample is drawn twice or skipped. Otherwise (resampled mode, or positions of the other data path:
    `same_layout` False) the start of epoch `epoch` or of fresh draws."""
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


def cache_position(saved: torch.Tensor, layout: str, world: int, epoch: int, say: Callable[[str], None]) -> Position:
    """Where the device cache continues. A checkpoint of the device cache holds one position in the global sample
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
    """Epochs' spans left to read as the (k, 3) rows [epoch, start, end] a checkpoint holds."""
    rows = [[e, a, b] for e, part in sorted(spans.items()) for a, b in part]
    return torch.tensor(rows, dtype=torch.int64).reshape(-1, 3)


def spans_of(rows: torch.Tensor) -> dict[int, Spans]:
    """The spans of a checkpoint's (k, 3) rows [epoch, start, end]: `spans_tensor` undone."""
    spans: dict[int, Spans] = {}
    for e, a, b in rows.tolist():
        spans.setdefault(e, []).append((a, b))
    return spans
