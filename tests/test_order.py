"""Tests for gan_dist.order: the sample order alone, with no shard read. A cluster far bigger than this machine
(thousands of loader slots over 10,000 shards) is simulated by the order functions the loader calls, resized twice
within an epoch from checkpoints as the loader continues them; every sample of the epoch is drawn exactly once.

Run: python -m pytest tests/test_order.py -q   (a few seconds)
"""

from __future__ import annotations

import numpy as np
import torch

from gan_dist.order import Spans, cache_position, epoch_places, shard_order, slot_spans, spans_of, spans_tensor, \
    start_positions

TOTAL = 43  # the sample count of test_data.py's shards


def test_start_positions_keep_their_own_layout_and_restart_what_they_cannot_continue():
    said = []
    saved = torch.tensor([[3, 5, 1], [3, 7, 0], [4, 1, 2], [3, 9, 0]])
    spans = {3: [(0, 20)]}
    assert start_positions(saved, "epoch", 1, 2, 2, 3, said.append, spans=spans, total=TOTAL) == (
        [[4, 1, 2], [3, 9, 0]], spans)
    assert not said
    assert start_positions(saved, "resampled", 0, 3, 1, 3, said.append) == ([[5, 0, 0]], {})
    assert start_positions(saved, "epoch", 0, 1, 2, 3, said.append, same_layout=False, total=TOTAL) == (
        [[3, 0, 0]] * 2, {})
    assert "restarting at the start of chunk 5 (draw)" in said[0] and "the other data path" in said[1]
    assert start_positions(torch.empty(0, 3), "epoch", 0, 2, 2, 0, said.append) == ([[0, 0, 0]] * 2, {})


def test_a_loader_checkpoint_restarts_the_device_cache_epoch():
    said = []
    saved = torch.tensor([[3, 5, 1], [3, 7, 0]])  # two loader slots' positions: not the cache's stream
    assert cache_position(saved, "stream", 2, 3, said.append) == [3, 0, 0]
    assert "the positions of the other data path" in said[0]


def head(spans: Spans, n: int) -> Spans:
    """The first `n` samples of `spans`: what a slot that takes `n` of them has drawn."""
    out = []
    for a, b in spans:
        if n <= 0:
            break
        out.append((a, min(b, a + n)))
        n -= b - a
    return out


class Cluster:
    """Epochs 0 and 1 of a dataset of shards with `counts` samples, read by layouts of ranks x workers in turn,
    each from the last one's checkpoint; `drawn[e]` collects the spans of epoch e's order that slots drew."""

    def __init__(self, counts: np.ndarray, seed: int, rng: np.random.Generator) -> None:
        self.counts, self.total, self.seed, self.rng = counts, int(counts.sum()), seed, rng
        self.buffer = 1000  # data.shuffle_buffer
        self.drawn: dict[int, Spans] = {0: [], 1: []}
        self.rows, self.spans, self.said = torch.empty(0, 3, dtype=torch.int64), spans_tensor({}), []
        self.bad = 0  # samples the slots skipped as bad, all layouts together

    def take(self, left: dict, position: list[int], slot: int, slots: int, n: int | None) -> list[int]:
        """Slot `slot` goes on from `position` and takes `n` samples (None: all it has of epochs 0 and 1), chunk
        after chunk as the loader does; returns its position then, as its batches carry it."""
        (chunk, place, skipped) = position
        while chunk < 2 and n != 0:
            spans = slot_spans(left, chunk, slot, slots, place, self.total)
            have = sum(b - a for a, b in spans)
            k = have if n is None else min(n, have)
            self.drawn[chunk] += head(spans, k)
            place, n = place + k, None if n is None else n - k
            if n != 0:
                chunk, place = chunk + 1, 0
        return [chunk, place, skipped]

    def run(self, world: int, workers: int, finish: bool = False) -> None:
        """`world` ranks of `workers` slots continue from the checkpoint; each slot takes a random amount (up to a
        little over its share, so that some are into epoch 1), or with `finish` all it has left of epochs 0 and 1.
        Then a checkpoint: every slot's row, and the spans the layout read."""
        ranks = [0, 1, world - 1]  # every rank computes the same from the checkpoint; three of them stand for all
        starts = {r: start_positions(self.rows, "epoch", r, world, workers, 0, self.said.append,
                                     spans=spans_of(self.spans), total=self.total) for r in ranks}
        left = starts[0][1]
        assert all(starts[r][1] == left for r in ranks)
        carried = [p[2] for r in ranks for p in starts[r][0]]
        assert carried == [int(self.rows[:, 2].sum())] + [0] * (len(carried) - 1), "one slot carries the skip count"
        rows, slots, chunk = [], world * workers, starts[0][0][0][0]
        share = sum(b - a for a, b in left.get(chunk, [(0, self.total)])) // slots  # a slot's, within one
        for slot in range(slots):
            rank, worker = divmod(slot, workers)
            n = None if finish else int(self.rng.integers(0, share * 4 // 3 + 1))
            rows.append(self.take(left, starts[min(rank, 1)][0][worker], slot, slots, n))
            bad = int(self.rng.integers(0, 3))
            rows[-1][2] += bad
            self.bad += bad
        self.rows, self.spans = torch.tensor(rows, dtype=torch.int64), spans_tensor(left)

    def samples(self, epoch: int) -> np.ndarray:
        """The global index of each sample drawn in `epoch`: its shard's start plus its index in the shard, from the
        places the drawn spans of the epoch's order name in the shards laid end to end."""
        places = np.array([p for part in self.drawn[epoch] for window in
                           epoch_places(self.seed, epoch, [part], self.buffer, self.total) for p in window])
        order = np.array(shard_order(len(self.counts), self.seed, epoch))
        ends = np.cumsum(self.counts[order])
        laid = np.searchsorted(ends, places, side="right")
        shard = order[laid]
        starts = np.cumsum(self.counts) - self.counts
        return starts[shard] + places - (ends[laid] - self.counts[shard])


def test_a_cluster_resized_twice_within_an_epoch_draws_every_sample_of_it_once():
    """256 ranks x 8 workers over 10,000 shards of 1 to 199 samples (about a million), resized to 192 ranks part way
    through epoch 0, then to 512 ranks, which read epochs 0 and 1 to their end: each epoch holds every sample once."""
    rng = np.random.default_rng(0)
    cluster = Cluster(rng.integers(1, 200, 10_000), seed=7, rng=rng)
    cluster.run(256, 8)
    assert cluster.drawn[1], "some slots of the first layout are into epoch 1"
    done = sum(b - a for a, b in cluster.drawn[0])
    cluster.run(192, 8)
    assert cluster.said[0].startswith(f"data: continuing at sample {done} of epoch 0 with world size 192 (1536 rank x "
                                      f"worker slots, the checkpoint's 2048)")
    assert len(spans_of(cluster.spans)) == 2, "the second layout read what the first had left of epochs 0 and 1"
    assert sum(b - a for a, b in cluster.drawn[0]) < cluster.total, "the second layout stopped within epoch 0"
    cluster.run(512, 8, finish=True)
    assert "with world size 512 (4096 rank x worker slots, the checkpoint's 1536)" in cluster.said[-1]
    for epoch in (0, 1):
        drawn = sorted(cluster.drawn[epoch])
        assert sum(b - a for a, b in drawn) == cluster.total, f"epoch {epoch}: as many samples drawn as it holds"
        assert all(a < b == c for (a, b), (c, _) in zip(drawn, drawn[1:])), f"epoch {epoch}: no gap, no overlap"
        assert drawn[0][0] == 0 and drawn[-1][1] == cluster.total
        assert np.array_equal(np.bincount(cluster.samples(epoch), minlength=cluster.total),
                              np.ones(cluster.total, np.int64)), f"epoch {epoch}: every sample once"
    assert int(cluster.rows[:, 2].sum()) == cluster.bad, "the skip count is carried across both changes"
