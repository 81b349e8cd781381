"""Tests for gan_dist.data: the endless, deterministic, resumable shard stream and the 2-D mixture batches.

The shards are written here with webdataset.TarWriter: 5 shards of uneven sizes (7, 13, 10, 4, 9 samples), each
sample a 4x4 grayscale PNG whose every pixel equals the sample's global index (0..42), with class b"3". A batch's
images therefore name the samples in it.

Covers: decoding and scaling to [-1, 1] as in seed 000 (x / 127.5 - 1); determinism of the stream; resuming at
`start_batch=k` giving exactly batches k, k+1, ... of a fresh stream, in-process (with and without emulated loader
workers) and through `shard_batches` with 2 real worker processes; skipped samples never being decoded; 2 ranks x
2 workers all streaming forever, dealing each pass's shards out disjointly to the (rank, worker) slots, and
covering every sample; `point_batches` being deterministic per (seed, rank, batch), different across ranks,
resumable, and drawing around `mixture_centers` (ring8, grid25) or from N(0, I) (gaussian).

Run from the repo root:

    . .venv/bin/activate && python -m pytest tests/test_data.py -q
"""

from __future__ import annotations

import io
import itertools
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from gan_dist import data
from gan_dist.config import DataConfig
from gan_dist.data import ShardStream, mixture_centers, point_batches, shard_batches

SIZES = [7, 13, 10, 4, 9]
TOTAL = sum(SIZES)
BATCH = 4
BUFFER = 8


@pytest.fixture(scope="module")
def urls(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("shards")
    out, index = [], 0
    for s, n in enumerate(SIZES):
        path = root / f"train-{s:05d}.tar"
        with wds.TarWriter(str(path)) as writer:
            for _ in range(n):
                png = io.BytesIO()
                Image.fromarray(np.full((4, 4), index, np.uint8), mode="L").save(png, format="PNG")
                writer.write({"__key__": f"sample_{index:05d}", "png": png.getvalue(), "cls": b"3"})
                index += 1
        out.append(str(path))
    return out


def ids(batch) -> list[int]:
    """The global sample indices of a batch, read back from the pixels."""
    images, _ = batch
    return [round(v) for v in ((images[:, 0, 0, 0] + 1) * 127.5).tolist()]


def take(iterator, n: int) -> list[list[int]]:
    return [ids(next(iterator)) for _ in range(n)]


def stream(urls, **kw) -> ShardStream:
    args = dict(batch=BATCH, seed=0, rank=0, world=1, num_workers=0, shuffle_buffer=BUFFER, start_batch=0)
    args.update(kw)
    return ShardStream(urls, **args)


def shard_of(index: int) -> int:
    return int(np.searchsorted(np.cumsum(SIZES), index, side="right"))


# ----------------------------------------------------------------------------------------------------------------
# Decoding


def test_batches_are_decoded_and_scaled_like_the_seed(urls):
    images, labels = next(iter(stream(urls)))
    assert images.shape == (BATCH, 1, 4, 4) and images.dtype == torch.float32
    assert labels.tolist() == [3] * BATCH
    for image in images:
        value = int(round((image[0, 0, 0].item() + 1) * 127.5))
        # seed 000: x_train.astype(float32) / 127.5 - 1, every pixel of the sample
        assert torch.equal(image, torch.full((1, 4, 4), np.float32(value) / np.float32(127.5) - 1))
        assert 0 <= value < TOTAL
    assert len(set(ids((images, labels)))) == BATCH, "no duplicates within one batch of the first pass"


def test_full_range_pixels_map_to_minus_one_and_one(tmp_path):
    path = tmp_path / "edge.tar"
    with wds.TarWriter(str(path)) as writer:
        for key, value in (("lo", 0), ("hi", 255)):
            png = io.BytesIO()
            Image.fromarray(np.full((2, 2), value, np.uint8), mode="L").save(png, format="PNG")
            writer.write({"__key__": key, "png": png.getvalue(), "cls": b"7"})
    images, labels = next(iter(ShardStream([str(path)], 2, 0, 0, 1, 0, 1)))
    assert sorted(images.flatten().unique().tolist()) == [-1.0, 1.0]
    assert labels.tolist() == [7, 7]


# ----------------------------------------------------------------------------------------------------------------
# Determinism and resume


def test_same_arguments_give_identical_batches(urls):
    for kw in ({}, {"seed": 3, "rank": 1, "world": 2, "num_workers": 2, "start_batch": 5}):
        a, b = iter(stream(urls, **kw)), iter(stream(urls, **kw))
        for _ in range(25):
            x, y = next(a), next(b)
            assert torch.equal(x[0], y[0]) and torch.equal(x[1], y[1])


def test_seed_changes_the_order(urls):
    assert take(iter(stream(urls, seed=0)), 10) != take(iter(stream(urls, seed=1)), 10)


@pytest.mark.parametrize("k", [1, 4, 11, 23])
def test_resume_in_process_continues_exactly(urls, k):
    fresh = take(iter(stream(urls)), k + 15)
    resumed = take(iter(stream(urls, start_batch=k)), 15)
    assert resumed == fresh[k:]


def _emulated_loader(monkeypatch, urls, workers: int, start_batch: int, n: int, rank: int = 0, world: int = 1):
    """What a DataLoader with `workers` processes yields: worker j's own iterator, round robin from worker 0."""
    current = SimpleNamespace(id=0)
    monkeypatch.setattr(data, "get_worker_info", lambda: SimpleNamespace(id=current.id, num_workers=workers))
    its = []
    firsts = []
    for j in range(workers):
        current.id = j
        it = iter(stream(urls, num_workers=workers, start_batch=start_batch, rank=rank, world=world))
        firsts.append(next(it))  # the generator reads its worker id on the first next()
        its.append(itertools.chain([firsts[-1]], it))
    out = [ids(next(its[i % workers])) for i in range(n)]
    monkeypatch.undo()
    return out


@pytest.mark.parametrize("workers", [2, 3])
def test_resume_with_loader_workers_continues_exactly(monkeypatch, urls, workers):
    fresh = _emulated_loader(monkeypatch, urls, workers, 0, 20)
    for k in range(1, 2 * workers + 2):
        assert _emulated_loader(monkeypatch, urls, workers, k, 20 - k) == fresh[k:], f"start_batch={k}"


def test_resume_through_shard_batches_with_two_worker_processes(urls):
    cfg = DataConfig(num_workers=2, shuffle_buffer=BUFFER)
    k, n = 5, 12
    fresh_it = shard_batches(urls, cfg, BATCH, seed=0, rank=1, world=2, start_batch=0)
    fresh = take(fresh_it, k + n)
    resumed_it = shard_batches(urls, cfg, BATCH, seed=0, rank=1, world=2, start_batch=k)
    resumed = take(resumed_it, n)
    del fresh_it, resumed_it
    assert resumed == fresh[k:]
    # the real loader interleaves exactly like the in-process emulation (same data for the same position)
    in_process = [take(iter(stream(urls, rank=1, world=2, num_workers=2, start_batch=w)), 1)[0] for w in (0, 1)]
    assert fresh[:2] == in_process


def test_skipped_samples_are_not_decoded(monkeypatch, urls):
    k, n = 6, 3
    skipped = set(itertools.chain.from_iterable(take(iter(stream(urls)), k)))
    decoded = []
    original = data.decode_sample

    def counting(sample):
        image, label = original(sample)
        decoded.append(int(image[0, 0, 0]))
        return image, label

    monkeypatch.setattr(data, "decode_sample", counting)
    it = iter(stream(urls, start_batch=k))
    yielded = [i for batch in take(it, n) for i in batch]
    assert len(decoded) == n * BATCH, "only the samples of the batches taken are decoded"
    assert decoded == yielded
    # The first pass holds each sample once, so the batches read after the skip are different samples.
    assert k * BATCH + n * BATCH <= TOTAL
    assert not skipped & set(decoded)


@pytest.mark.parametrize("workers", [0, 2])
def test_loading_does_not_touch_the_global_rngs(urls, workers):
    # Resume restores the global RNGs; building and reading the loader must not draw from them.
    import random

    def seed_all():
        torch.manual_seed(0)
        np.random.seed(0)
        random.seed(0)

    seed_all()
    expected = (torch.rand(3), np.random.rand(3), random.random())
    seed_all()
    it = shard_batches(urls, DataConfig(num_workers=workers, shuffle_buffer=BUFFER), BATCH, seed=0, rank=0,
                       world=1, start_batch=2)
    take(it, 4)
    del it
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]


# ----------------------------------------------------------------------------------------------------------------
# Ranks x workers: endless, disjoint within a pass, covering


def first_pass(s: ShardStream, slot: int, slots: int) -> list[str]:
    # Dealing 5 shards out to 4 slots: slot s gets shards s, s + 4, ... of the pass's permutation (at least one).
    count = max(len(range(slot, len(s.urls), slots)), 1)
    return list(itertools.islice((d["url"] for d in s._shards(slot)), count))


@pytest.mark.parametrize("world, workers, seed", [(2, 2, 0), (2, 2, 7), (1, 3, 1), (2, 1, 2)])
def test_each_pass_deals_shards_out_disjointly(urls, world, workers, seed):
    slots = world * workers
    s = stream(urls, world=world, num_workers=workers, seed=seed)
    passes = [first_pass(s, slot, slots) for slot in range(slots)]
    flat = [u for p in passes for u in p]
    assert len(flat) == len(set(flat)), f"two slots read the same shard in the first pass: {passes}"
    assert sorted(flat) == sorted(urls), "every shard is read in the first pass"
    assert max(map(len, passes)) - min(map(len, passes)) <= 1


def test_slots_read_different_shards_in_later_passes(urls):
    s = stream(urls, world=2, num_workers=2)
    seen = {u for u in itertools.islice((d["url"] for d in s._shards(1)), 20)}
    assert len(seen) > 1, "a slot must not read the same shard in every pass"


def test_more_slots_than_shards_still_streams(urls):
    # 3 ranks x 2 workers = 6 slots for 5 shards: every slot still gets data
    s = stream(urls, world=3, num_workers=2)
    for slot in range(6):
        assert list(itertools.islice(s._shards(slot), 3))
    for rank in range(3):
        it = iter(stream(urls, world=3, num_workers=2, rank=rank))
        assert len(take(it, 12)) == 12


def test_two_ranks_two_workers_stream_forever_and_cover_everything(urls):
    cfg = DataConfig(num_workers=2, shuffle_buffer=BUFFER)
    n = 50  # 200 samples per rank, ~4.7 passes over the 43 samples
    per_rank = []
    for rank in range(2):
        it = shard_batches(urls, cfg, BATCH, seed=0, rank=rank, world=2, start_batch=0)
        batches = take(it, n)  # StopIteration here would fail the test
        del it
        assert all(len(b) == BATCH for b in batches)
        per_rank.append(batches)
    assert per_rank[0] != per_rank[1], "ranks must read different data"
    seen = {i for batches in per_rank for b in batches for i in b}
    assert seen == set(range(TOTAL))
    # every shard feeds both ranks over several passes (the deal changes from pass to pass)
    for batches in per_rank:
        assert {shard_of(i) for b in batches for i in b} == set(range(len(SIZES)))


def test_first_batches_of_different_slots_come_from_their_own_shards(urls):
    # Within the first pass a slot's samples come only from the shards dealt to it.
    slots, checked = 4, 0
    for rank in range(2):
        for worker in range(2):
            slot = rank * 2 + worker
            # start_batch=worker emulates loader worker `worker` in-process; a small buffer reads ahead little
            s = stream(urls, world=2, num_workers=2, rank=rank, start_batch=worker, shuffle_buffer=2)
            mine = {urls.index(u) for u in first_pass(s, slot, slots)}
            size = sum(SIZES[i] for i in mine)
            # take only as many samples as the first pass of this slot holds, minus what the buffer may read ahead
            usable = max((size - 2) // BATCH, 0)
            got = take(iter(s), usable)
            assert all(shard_of(i) in mine for b in got for i in b), (slot, mine, got)
            checked += usable
    assert checked >= 5, "the shard sizes leave too little to check"


# ----------------------------------------------------------------------------------------------------------------
# 2-D mixtures


def test_mixture_centers_geometry():
    ring = mixture_centers(DataConfig(dataset="ring8", radius=2.0))
    expected = {(round(2 * math.cos(a), 6), round(2 * math.sin(a), 6)) for a in (k * math.pi / 4 for k in range(8))}
    assert ring.shape == (8, 2)
    assert {(round(x, 6) + 0.0, round(y, 6) + 0.0) for x, y in ring} == {(x + 0.0, y + 0.0) for x, y in expected}
    grid = mixture_centers(DataConfig(dataset="grid25", spacing=2.0))
    assert grid.shape == (25, 2)
    assert {tuple(p) for p in grid.tolist()} == set(itertools.product([-4.0, -2.0, 0.0, 2.0, 4.0], repeat=2))
    assert mixture_centers(DataConfig(dataset="gaussian")).tolist() == [[0.0, 0.0]]


def test_point_batches_deterministic_per_seed_rank_and_index():
    cfg = DataConfig(dataset="ring8", std=0.02)
    a = list(itertools.islice(point_batches(cfg, 16, seed=1, rank=0, start_batch=0), 5))
    b = list(itertools.islice(point_batches(cfg, 16, seed=1, rank=0, start_batch=0), 5))
    for (pa, la), (pb, lb) in zip(a, b):
        assert torch.equal(pa, pb) and torch.equal(la, lb)
        assert pa.shape == (16, 2) and pa.dtype == torch.float32
    assert not torch.equal(a[0][0], a[1][0]), "consecutive batches differ"
    other_rank = next(point_batches(cfg, 16, seed=1, rank=1, start_batch=0))
    other_seed = next(point_batches(cfg, 16, seed=2, rank=0, start_batch=0))
    assert not torch.equal(a[0][0], other_rank[0])
    assert not torch.equal(a[0][0], other_seed[0])


def test_point_batches_do_not_touch_the_global_rng():
    cfg = DataConfig(dataset="grid25")
    torch.manual_seed(0)
    np.random.seed(0)
    next(point_batches(cfg, 8, seed=0, rank=0, start_batch=0))
    t, n = torch.rand(1), np.random.rand()
    torch.manual_seed(0)
    np.random.seed(0)
    assert torch.equal(t, torch.rand(1)) and n == np.random.rand()


def test_point_batches_resume_exactly():
    cfg = DataConfig(dataset="grid25")
    fresh = list(itertools.islice(point_batches(cfg, 8, seed=0, rank=1, start_batch=0), 10))
    resumed = list(itertools.islice(point_batches(cfg, 8, seed=0, rank=1, start_batch=7), 3))
    for (pa, la), (pb, lb) in zip(fresh[7:], resumed):
        assert torch.equal(pa, pb) and torch.equal(la, lb)


@pytest.mark.parametrize("dataset, std", [("ring8", 0.02), ("grid25", 0.05)])
def test_mixture_points_lie_near_their_centres(dataset, std):
    cfg = DataConfig(dataset=dataset, std=std)
    centers = mixture_centers(cfg)
    points, labels = next(point_batches(cfg, 4000, seed=0, rank=0, start_batch=0))
    p = points.numpy().astype(np.float64)
    dist = np.linalg.norm(p[:, None, :] - centers[None], axis=2)
    assert (dist.min(axis=1) < 5 * std).all()
    # the label is the mode the point was drawn from, i.e. its nearest centre
    assert np.array_equal(dist.argmin(axis=1), labels.numpy())
    # every mode is used, about equally often
    counts = np.bincount(labels.numpy(), minlength=len(centers))
    expected = 4000 / len(centers)
    assert counts.min() > 0.6 * expected and counts.max() < 1.4 * expected
    # spread around each mode is the configured std
    offsets = p - centers[labels.numpy()]
    assert offsets.std() == pytest.approx(std, rel=0.1)


def test_gaussian_is_standard_normal():
    points, labels = next(point_batches(DataConfig(dataset="gaussian"), 8000, seed=0, rank=0, start_batch=0))
    p = points.numpy().astype(np.float64)
    assert np.abs(p.mean(axis=0)).max() < 0.05  # standard error ~0.011
    assert np.abs(p.std(axis=0) - 1).max() < 0.05
    assert abs(np.corrcoef(p.T)[0, 1]) < 0.05
    assert labels.unique().tolist() == [0]
