"""Tests for gan_dist.data (exact epochs and resampled streams over uneven shards, resume, faults), the shard reading
of gan_dist.shards behind it, and gan_dist.points (2-D mixtures). The order alone (no shards) is tests/test_order.py's.

The shards are written here: 5 shards of uneven sizes (7, 13, 10, 4, 9 samples, 43 in all) with a manifest, each
sample a 4x4 grayscale PNG whose every pixel equals the sample's global index, keyed `sample_{index}`. A batch's
images therefore name the samples in it. "Slot" = one rank x loader-worker pair; `ShardStream._batches(w)` is what
loader worker w of a rank yields, so ranks and workers can be checked in-process, and `ShardBatches` with
`num_workers=2` runs real worker processes.
"""

from __future__ import annotations

import functools
import http.server
import io
import itertools
import json
import math
import random
import subprocess
import tarfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from gan_dist import data
from gan_dist.config import DataConfig, PerfConfig
from gan_dist.data import ShardStream, Source, open_source, shard_batches, to_real
from gan_dist.errors import UserError
from gan_dist.order import RESAMPLED_CHUNK, cache_position, draws, start_positions
from gan_dist.points import PointBatches, mixture_centers
from gan_dist.shardformat import build_manifest, index_file, shard_entry, write_manifest, write_shard
from gan_dist.shards import FatalDataError, open_shard, tar_samples

SIZES = [7, 13, 10, 4, 9]
TOTAL = sum(SIZES)
BATCH = 4
BUFFER = 8


def png(value: int, size: int = 4) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.full((size, size), value, np.uint8), mode="L").save(out, format="PNG")
    return out.getvalue()


def write_shards(root, sizes=SIZES, corrupt: set[int] = frozenset()) -> list[str]:
    """Shards with a manifest; samples whose index is in `corrupt` hold bytes that are not a PNG."""
    root.mkdir(parents=True, exist_ok=True)
    urls, index, listed = [], 0, []
    for s, n in enumerate(sizes):
        path = root / f"train-{s:05d}.tar"
        with wds.TarWriter(str(path)) as writer:
            for _ in range(n):
                image = b"not a png" if index in corrupt else png(index)
                writer.write({"__key__": f"sample_{index:05d}", "png": image, "cls": b"3"})
                index += 1
        urls.append(str(path))
        listed.append({"name": path.name, "num_samples": n, "sha256": ""})
    manifest = {"format": "gan-dist-shards/1", "dataset": "test", "splits": {"train": {"num_samples": index,
                                                                                       "shards": listed}}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return urls


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Source:
    return Source(write_shards(tmp_path_factory.mktemp("shards")), list(SIZES))


def cfg(**kw) -> DataConfig:
    args = dict(dataset="webdataset", shards="x", num_workers=0, shuffle_buffer=BUFFER, resolution=4, channels=1)
    args.update(kw)
    return DataConfig(**args)


def stream(source, rank=0, world=1, start_batch=0, positions=None, seed=0, spans=None, **kw) -> ShardStream:
    c = cfg(**kw)
    positions = positions or [[0, 0, 0]] * max(c.num_workers, 1)
    return ShardStream(source, c, BATCH, seed, rank, world, start_batch, positions, spans)


def ids(images: torch.Tensor) -> list[int]:
    """The global sample indices of a batch, read back from the pixels."""
    return images[:, 0, 0, 0].tolist()


def key_ids(samples) -> list[int]:
    return [int(s["__key__"].split("_")[1]) for s in samples]


def raw(s: ShardStream, chunk: int, worker: int) -> list[dict]:
    """The raw samples of one slot's chunk, in the order its batches take them."""
    return [sample for _, sample in s._chunk(chunk, worker)]


def rank_batches(s: ShardStream, n: int) -> list[list[int]]:
    """What a rank's loader hands out: batch i from logical worker i % workers."""
    its = [s._batches(w) for w in range(s.workers)]
    return [ids(next(its[i % s.workers])[0]) for i in range(n)]


# ----------------------------------------------------------------------------------------------------------------
# Decoding


def test_batches_are_uint8_and_scale_like_the_seed(source):
    images, labels, _ = next(stream(source)._batches(0))
    assert images.shape == (BATCH, 1, 4, 4) and images.dtype == torch.uint8
    assert labels.tolist() == [3] * BATCH
    real = to_real(images, torch.device("cpu"))
    # seed 000: x_train.astype(float32) / 127.5 - 1, every pixel
    assert torch.equal(real, images.float() / np.float32(127.5) - 1)
    assert to_real(torch.tensor([[0, 255]], dtype=torch.uint8), torch.device("cpu")).tolist() == [[-1.0, 1.0]]


def arrows(tmp_path) -> Source:
    """64 samples of one image with a left edge: flipped, it has a right edge."""
    arrow = np.zeros((4, 4), np.uint8)
    arrow[:, 0] = 255
    path = tmp_path / "train-00000.tar"
    with wds.TarWriter(str(path)) as writer:
        for i in range(64):
            out = io.BytesIO()
            Image.fromarray(arrow).save(out, format="PNG")
            writer.write({"__key__": f"s{i:03d}", "png": out.getvalue()})
    return Source([str(path)], [64])


def test_horizontal_flip_is_per_sample_and_deterministic(tmp_path):
    src = arrows(tmp_path)

    def right_edges(chunk_seed: int) -> list[bool]:
        s = stream(src, hflip=True, seed=chunk_seed)
        return [bool(im[0, 0, 3] == 255) for b in itertools.islice(s._batches(0), 16) for im in b[0]]

    flips = right_edges(0)
    assert 16 < sum(flips) < 48, "about half the samples are flipped"
    assert right_edges(0) == flips
    assert not any(bool(im[0, 0, 3] == 255) for im in next(stream(src)._batches(0))[0]), "no flips unless asked"


# ----------------------------------------------------------------------------------------------------------------
# Exact epochs


@pytest.mark.parametrize("world, workers, seed", [(2, 2, 0), (2, 2, 5), (1, 3, 1), (2, 1, 2)])
def test_epoch_mode_reads_every_sample_exactly_once_per_epoch(source, world, workers, seed):
    epochs = []
    for epoch in range(3):
        seen = []
        shares = []
        for rank in range(world):
            s = stream(source, rank=rank, world=world, num_workers=workers, seed=seed)
            for w in range(workers):
                share = key_ids(raw(s, epoch, w))
                shares.append(len(share))
                seen += share
        assert sorted(seen) == list(range(TOTAL)), f"epoch {epoch}: every sample exactly once"
        # Shares are equal within one sample, so every rank gets the same number of batches per epoch (+-1 sample).
        assert max(shares) - min(shares) <= 1
        epochs.append(seen)
    assert epochs[0] != epochs[1] != epochs[2], "each epoch is shuffled anew"


def test_a_shard_without_an_index_is_streamed_once_per_chunk(source, monkeypatch):
    """Its samples fall into several shuffle windows (8 samples each here): the windows go on from one open stream
    rather than read the shard again from its start for each."""
    opened = []

    def counting(url, *args):
        opened.append(url)
        return open_shard(url, *args)

    monkeypatch.setattr("gan_dist.shards.open_shard", counting)
    for world in (1, 2):
        seen = []
        for rank in range(world):
            opened.clear()
            seen += key_ids(raw(stream(source, rank=rank, world=world), 0, 0))
            assert opened and len(opened) == len(set(opened)), "each shard opened once by the slot that reads it"
        assert sorted(seen) == list(range(TOTAL))


def test_epoch_batches_carry_over_the_remainder_without_dropping_or_repeating(source):
    # Rank 1 of 2, two workers: each slot's batches are its epoch shares back to back, cut into batches of 4.
    s = stream(source, rank=1, world=2, num_workers=2)
    for w in range(2):
        expected = [i for e in range(4) for i in key_ids(raw(s, e, w))]
        got = [i for b in itertools.islice(s._batches(w), len(expected) // BATCH) for i in ids(b[0])]
        assert got == expected[:len(got)] and len(got) >= len(expected) - BATCH + 1


def test_two_ranks_two_worker_processes_cover_each_epoch_and_never_run_dry(source):
    # 43 samples over 4 slots: shares of 11, 11, 11, 10. 12 batches per rank span a little over two epochs.
    streams = [shard_batches(source, cfg(num_workers=2), BATCH, seed=0, rank=r, world=2) for r in range(2)]
    taken = [[ids(next(b)[0]) for _ in range(12)] for b in streams]
    state = [b.state() for b in streams]
    del streams
    assert all(len(t) == 12 for t in taken), "equal batch counts on both ranks"
    # Positions say how far each slot got: 24 samples each, two whole shares (10 or 11) and into epoch 2's.
    for st in state:
        assert st[:, 0].tolist() == [2, 2] and st[:, 2].tolist() == [0, 0]
    # Re-derive each slot's epochs from the in-process stream: the processes read exactly that.
    for rank in range(2):
        s = stream(source, rank=rank, world=2, num_workers=2)
        assert taken[rank] == rank_batches(s, 12)
    counts = np.bincount([i for t in taken for b in t for i in b], minlength=TOTAL)
    assert counts.min() >= 2 and counts.max() <= 3, "96 samples: every sample twice, none more than thrice"


def test_epoch_mode_refuses_fewer_shards_than_slots(source):
    with pytest.raises(UserError, match=r"5 shards \(43 samples\) for 3 ranks x 2 workers = 6.*mode=resampled"):
        shard_batches(source, cfg(num_workers=2), BATCH, seed=0, rank=0, world=3)


# ----------------------------------------------------------------------------------------------------------------
# Resampled


def test_resampled_streams_are_endless_seeded_per_slot_and_differ(tmp_path):
    one = Source(write_shards(tmp_path, sizes=[6]), [6])  # 1 shard for 2 ranks x 2 workers: never runs dry
    batches = {}
    for rank in range(2):
        s = stream(one, rank=rank, world=2, num_workers=2, mode="resampled")
        batches[rank] = rank_batches(s, 40)
        assert batches[rank] == rank_batches(stream(one, rank=rank, world=2, num_workers=2, mode="resampled"), 40)
    assert batches[0] != batches[1]
    # Each slot draws its own shards: (seed, chunk, rank, worker) seeds the draws.
    plans = [draws(50, 3, 0, r, w) for r in range(2) for w in range(2)]  # 50 shards
    assert all(len(p) == RESAMPLED_CHUNK for p in plans) and len({str(p) for p in plans}) == 4
    assert plans[0] == draws(50, 3, 0, 0, 0)


def test_resampled_draws_cover_all_shards(source):
    s = stream(source, rank=1, world=2, num_workers=2, mode="resampled")
    seen = {i for b in rank_batches(s, 60) for i in b}
    assert seen == set(range(TOTAL))


# ----------------------------------------------------------------------------------------------------------------
# Resume


@pytest.mark.parametrize("mode", ["epoch", "resampled"])
@pytest.mark.parametrize("workers", [0, 2])
def test_resume_from_saved_positions_continues_exactly(source, mode, workers):
    c = cfg(num_workers=workers, mode=mode)
    for k in (3, 7):  # mid-epoch: 7 batches of rank 1 are 28 samples of its 2 x 11-sample shares
        fresh = shard_batches(source, c, BATCH, seed=0, rank=1, world=2)
        head = [ids(next(fresh)[0]) for _ in range(k)]
        saved = fresh.state()
        tail = [ids(next(fresh)[0]) for _ in range(6)]
        del fresh
        assert head
        resumed = shard_batches(source, c, BATCH, seed=0, rank=1, world=2, start_batch=k, positions=saved.tolist())
        assert [ids(next(resumed)[0]) for _ in range(6)] == tail, f"k={k}"
        del resumed


def test_resume_decodes_none_of_the_skipped_samples(monkeypatch, source):
    k, n = 9, 3  # 36 samples into a 43-sample epoch, and on into the next
    s = stream(source)
    it = s._batches(0)
    for _ in range(k):
        position = list(next(it)[2][1:])
    decoded = []

    def counting(sample, *args):
        decoded.append(int(sample["__key__"].split("_")[1]))
        return original(sample, *args)

    original = data.decode_image
    monkeypatch.setattr(data, "decode_image", counting)
    resumed = stream(source, start_batch=k, positions=[position])._batches(0)
    yielded = [i for _ in range(n) for i in ids(next(resumed)[0])]
    assert decoded == yielded, "only the samples of the batches handed out are decoded"
    assert len(decoded) == n * BATCH


def draw_slots(source, layout, saved, spans, amounts, drawn, said) -> tuple[torch.Tensor, dict]:
    """Run `layout` (ranks, workers) from a checkpoint's rows `saved` (None: a fresh start) and `spans`: slot i
    takes `amounts[i]` samples (None: all of epochs 0 and 1 it has left), appended to `drawn[epoch]`. Returns the
    rows a checkpoint would then hold, and the spans the layout read."""
    world, workers = layout
    rows, used = [], {}
    for rank in range(world):
        positions, used = ([[0, 0, 0]] * workers, {}) if saved is None else start_positions(
            saved, "epoch", rank, world, workers, 0, said.append, spans=spans, total=TOTAL)
        s = stream(source, rank=rank, world=world, num_workers=workers, positions=positions, spans=used)
        for w in range(workers):
            want = amounts[len(rows)]
            (chunk, place, _), got = positions[w], 0
            while chunk < 2 and got != want:
                for place, sample in s._chunk(chunk, w, place):
                    drawn[chunk].append(key_ids([sample])[0])
                    got += 1
                    if got == want:
                        break
                else:
                    chunk, place = chunk + 1, 0
            rows.append([chunk, place, 0])
    return torch.tensor(rows), used


@pytest.mark.parametrize("layouts", [[(2, 2), (1, 1), (3, 1)], [(1, 1), (2, 2), (1, 3)], [(3, 1), (2, 1), (1, 2)]])
def test_the_loader_continues_its_epochs_on_another_world_size(source, layouts):
    """Three layouts (ranks, workers) in turn, each resumed from the last one's checkpoint rows with its slots at
    uneven places, some already into epoch 1: epochs 0 and 1 each hold every sample exactly once."""
    drawn, said = {0: [], 1: []}, []
    first, second, third = layouts
    amounts = [5, 12, 7, 0, 9, 3][:first[0] * first[1]]
    saved, spans = draw_slots(source, first, None, {}, amounts, drawn, said)
    done = len(drawn[0])
    saved, spans = draw_slots(source, second, saved, spans, [6, 2, 9, 4][:second[0] * second[1]], drawn, said)
    assert spans, "the second layout read what the first had left of its epochs"
    draw_slots(source, third, saved, spans, [None] * (third[0] * third[1]), drawn, said)
    assert sorted(drawn[0]) == list(range(TOTAL)) and sorted(drawn[1]) == list(range(TOTAL))
    assert said[0] == (f"data: continuing at sample {done} of epoch 0 with world size {second[0]} "
                       f"({second[0] * second[1]} rank x worker slots, the checkpoint's {first[0] * first[1]}): no "
                       "sample of the epoch is drawn twice or skipped")
    # The same slot count on another shape reads the same shares: the rows go on as they are, with nothing said.
    assert len(said) == second[0] + (third[0] if third[0] * third[1] != second[0] * second[1] else 0)


def test_the_loader_continues_an_epoch_after_a_slot_finished_it_exactly(source):
    """Every slot at the very end of its share of epoch 0: the next layout starts epoch 1 whole."""
    shares = [len(raw(stream(source, rank=r, world=2), 0, 0)) for r in range(2)]
    said = []
    positions, spans = start_positions(torch.tensor([[0, shares[0], 0], [0, shares[1], 3]]), "epoch", 0, 1, 1, 0,
                                       said.append, total=TOTAL)
    assert positions == [[1, 0, 3]] and spans == {}, "on to epoch 1, the skip count carried"
    assert said == ["data: continuing at sample 0 of epoch 1 with world size 1 (1 rank x worker slots, the "
                    "checkpoint's 2): no sample of the epoch is drawn twice or skipped"]


@pytest.mark.parametrize("workers", [0, 2])
def test_loading_does_not_touch_the_global_rngs(source, workers):
    # Resume restores the global RNGs; building and reading the loader must not draw from them.
    def seed_all():
        torch.manual_seed(0)
        np.random.seed(0)
        random.seed(0)

    seed_all()
    expected = (torch.rand(3), np.random.rand(3), random.random())
    seed_all()
    it = shard_batches(source, cfg(num_workers=workers, hflip=True), BATCH, seed=0, rank=0, world=1)
    [next(it) for _ in range(4)]
    del it
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]


# ----------------------------------------------------------------------------------------------------------------
# Faults


def test_bad_image_is_skipped_with_a_warning_naming_shard_and_key(tmp_path, capsys):
    urls = write_shards(tmp_path, sizes=[6, 6], corrupt={2})
    b = shard_batches(Source(urls, [6, 6]), cfg(), BATCH, seed=0, rank=0, world=1)
    seen = [i for _ in range(5) for i in ids(next(b)[0])]
    assert b.skipped >= 1 and 2 not in seen
    err = capsys.readouterr().err
    assert "sample 'sample_00002'" in err and "train-00000.tar" in err and "skipped 1 sample" in err


def test_bad_image_stops_the_run_with_on_error_raise(tmp_path):
    urls = write_shards(tmp_path, sizes=[6, 6], corrupt={2})
    b = shard_batches(Source(urls, [6, 6]), cfg(num_workers=2, on_error="raise"), BATCH, seed=0, rank=0, world=1)
    with pytest.raises(UserError, match=r"sample 'sample_00002' of shard .*train-00000.tar"):
        for _ in range(10):
            next(b)


def truncate(path, keep: float) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[: int(len(raw) * keep)])


def test_truncated_shard_is_skipped_and_counted_once_across_resume(tmp_path, capsys):
    urls = write_shards(tmp_path, sizes=[10, 10, 10, 10])
    truncate(tmp_path / "train-00002.tar", 0.5)  # about 5 of its 10 samples survive
    src = Source(urls, [10] * 4)
    s = stream(src)
    from_2 = [i for i in key_ids(raw(s, 0, 0)) if 20 <= i < 30]
    assert 3 <= len(from_2) <= 6 and sorted(from_2) == list(range(20, 20 + len(from_2))), "the intact head is read"
    lost = 10 - len(from_2)
    assert s.reader.skipped == lost
    assert "train-00002.tar: is truncated or corrupt" in capsys.readouterr().err
    b = shard_batches(src, cfg(), BATCH, seed=0, rank=0, world=1)
    first = [i for _ in range(10) for i in ids(next(b)[0])]  # epoch 0 (40 - lost samples) and into epoch 1
    assert b.skipped == lost and len(set(first[:40 - lost])) == 40 - lost
    # Resuming mid-epoch re-reads the truncated shard quietly: the skip is not counted twice.
    b = shard_batches(src, cfg(), BATCH, seed=0, rank=0, world=1)
    [next(b) for _ in range(3)]
    saved = b.state().tolist()
    resumed = shard_batches(src, cfg(), BATCH, seed=0, rank=0, world=1, start_batch=3, positions=saved)
    [next(resumed) for _ in range(6)]
    assert resumed.skipped == lost


def test_shards_without_samples_stop_the_run_instead_of_spinning(tmp_path):
    urls = write_shards(tmp_path, sizes=[0, 0])
    b = shard_batches(Source(urls, None), cfg(mode="resampled"), BATCH, seed=0, rank=0, world=1)
    with pytest.raises(UserError, match="100 chunks in a row yielded no sample"):
        next(b)
    with pytest.raises(UserError, match=r"2 shards \(0 samples\) for 1 ranks x 1 workers"):
        shard_batches(Source(urls, [0, 0]), cfg(), BATCH, seed=0, rank=0, world=1)


def test_missing_local_shard_fails_fast_naming_it(tmp_path):
    write_shards(tmp_path, sizes=[3, 3])
    with pytest.raises(UserError, match=r"shard .*train-00007.tar does not exist"):
        open_source(cfg(shards=str(tmp_path / "train-{00000..00001}.tar") + "::" + str(tmp_path / "train-00007.tar")))


def test_missing_pipe_shard_stops_the_run_naming_the_url(tmp_path):
    src = Source([f"pipe:cat {tmp_path}/nowhere.tar"], None)
    b = shard_batches(src, cfg(mode="resampled"), BATCH, seed=0, rank=0, world=1)
    with pytest.raises(UserError, match=r"pipe:cat .*nowhere.tar.*nothing could be read"):
        next(b)


# ----------------------------------------------------------------------------------------------------------------
# Offset indexes: shards written by write_shard (make_shards.py, MNIST's) carry one; the shards above are plain tars


def indexed_shards(root: Path, fmt: str, count: int = 4, size: int = 12) -> tuple[list[str], list[str]]:
    """`count` shards of `size` samples in `fmt` (png or npy) written by write_shard, with their offset indexes,
    and a copy of each without one (read by streaming)."""
    urls, copies = [], []
    for s in range(count):
        samples = []
        for i in range(s * size, (s + 1) * size):
            pixels = np.full((4, 4, 1), i, np.uint8)
            buf = io.BytesIO()
            np.save(buf, pixels)
            samples.append({"__key__": f"sample_{i:05d}", fmt: buf.getvalue() if fmt == "npy" else png(i),
                            "cls": b"3"})
        for folder, out in (("indexed", urls), ("streamed", copies)):
            (root / folder).mkdir(parents=True, exist_ok=True)
            path = root / folder / f"train-{s:05d}.tar"
            write_shard(path, samples)
            out.append(str(path))
        index_file(copies[-1]).unlink()
    return urls, copies


@pytest.mark.parametrize("fmt", ["png", "npy"])
def test_indexed_reads_equal_streamed_reads_byte_for_byte(tmp_path, fmt):
    urls, copies = indexed_shards(tmp_path, fmt)
    s = stream(Source(urls + copies, [12] * 8))
    assert s.reader.indexed(urls[0]) is not None and s.reader.indexed(copies[0]) is None
    for first, take in ((0, None), (3, 4), (11, None), (12, None)):
        a, b = (list(s.reader.read(u, first, None if take is None else first + take, 12)) for u in (urls[1], copies[1]))
        assert len(a) == (take or 12 - first) and [x.pop("__url__") for x in a + b] == [urls[1]] * len(a) + [
            copies[1]] * len(b)
        assert a == b, "the same keys and member bytes"
    # A whole loader run, 2 workers, shuffled, decoded, into a second epoch: the same batches.
    indexed, streamed = (shard_batches(Source(u, [12] * 4), cfg(num_workers=2), BATCH, seed=0, rank=0, world=1)
                         for u in (urls, copies))
    for _ in range(16):
        (x, y), (x2, y2) = next(indexed), next(streamed)
        assert torch.equal(x, x2) and torch.equal(y, y2)
    assert indexed.state().tolist() == streamed.state().tolist()


def test_a_shard_cut_after_its_index_was_checked_is_skipped_not_read_past(tmp_path, capsys):
    urls, _ = indexed_shards(tmp_path, "png", count=1)
    s = stream(Source(urls, [12]))
    assert len(list(s.reader.shard(urls[0], 12))) == 12  # the index is checked here, once per run
    Path(urls[0]).write_bytes(Path(urls[0]).read_bytes()[:4096])
    got = list(s.reader.shard(urls[0], 12))
    assert 0 < len(got) < 12 and s.reader.skipped == 12 - len(got)
    assert "is truncated (it ends before a member its index lists)" in capsys.readouterr().err


def rewrite_first_key(path: str) -> None:
    """The shard with its first member renamed (same length, so the same size), its header checksum made right."""
    raw = bytearray(Path(path).read_bytes())
    header = tarfile.TarInfo.frombuf(bytes(raw[:512]), "utf-8", "surrogateescape")
    header.name = header.name.replace("sample_00000", "sample_99999")
    raw[:512] = header.tobuf(tarfile.USTAR_FORMAT)
    Path(path).write_bytes(bytes(raw))


@pytest.mark.parametrize("damage, message", [
    (lambda url: Path(url).write_bytes(Path(url).read_bytes()[:-1024]), r"has \d+ bytes but its index "
                                                                        r"train-00000.tar.idx says \d+"),
    (rewrite_first_key, r"its first member is not sample_00000\.\w+ of \d+ bytes"),
    (lambda url: index_file(url).write_text('{"format": "gan-dist-index/1", "size"'),
     r"its index train-00000.tar.idx is unreadable or malformed"),
    (lambda url: index_file(url).write_text(json.dumps({"format": "gan-dist-index/1", "size": 10**9, "members": [
        ["sample_00000.png", 512, 10]]})), r"has \d+ bytes but its index"),
    (lambda url: index_file(url).write_text(json.dumps({"format": "gan-dist-index/1", "size": 1, "members": [
        ["sample_00000.png", 512, 10**9]]})), r"its index train-00000.tar.idx is unreadable or malformed")],
    ids=["truncated shard", "rewritten shard", "torn index", "index of another size", "offsets past the end"])
def test_a_stale_or_damaged_index_stops_the_run_naming_the_shard_with_on_error_raise(tmp_path, damage, message):
    urls, _ = indexed_shards(tmp_path, "png", count=1)
    damage(urls[0])
    with pytest.raises(UserError, match=f"shard {urls[0]}: {message}.*rebuild it with scripts/make_shards.py "
                                        f"--index {Path(urls[0]).parent}"):
        open_source(cfg(shards=urls[0], on_error="raise"))
    b = shard_batches(Source(urls, [12]), cfg(on_error="raise"), BATCH, seed=0, rank=0, world=1)
    with pytest.raises(UserError, match=f"shard {urls[0]}: {message}.*rebuild it with scripts/make_shards.py "
                                        f"--index {Path(urls[0]).parent}"):
        next(b)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_truncated_shard_with_a_stale_index_is_streamed_and_its_loss_counted_under_warn(tmp_path, capfd, workers):
    """data.on_error=warn (the default): the shard is read as its index's message advises, streamed without it;
    its intact head is trained on, its lost tail counted, and one warning names it with the count."""
    urls, copies = indexed_shards(tmp_path, "png")
    for url in (urls[2], copies[2]):
        truncate(Path(url), 0.5)
    source = open_source(cfg(shards="::".join(urls), mode="resampled"))  # no stop before training either
    stale, streamed = (shard_batches(Source(u, [12] * 4), cfg(num_workers=workers), BATCH, seed=0, rank=0, world=1)
                       for u in (urls, copies))
    assert source.urls == urls
    for _ in range(12):  # the whole first epoch and into the second: the same batches as the index-less copies
        (x, y), (x2, y2) = next(stale), next(streamed)
        assert torch.equal(x, x2) and torch.equal(y, y2)
    assert 0 < stale.skipped == streamed.skipped < 12
    said = [line for line in capfd.readouterr().err.splitlines() if urls[2] in line]
    assert len(said) == 1 and said[0].startswith("[gan-dist] warning: rank 0: shard ") and \
        f"skipped {stale.skipped} sample(s)" in said[0], said
    assert "streamed without its offset index (has " in said[0]
    assert "the shard changed after it was indexed" in said[0]


@pytest.mark.parametrize("damage", [
    lambda url: index_file(url).write_text("{"),
    lambda url: index_file(url).write_text(json.dumps(json.loads(index_file(url).read_text()) | {"size": 10**6}))],
    ids=["torn index", "index of another size"])
def test_an_intact_shard_with_a_stale_index_loses_nothing_under_warn(tmp_path, capsys, damage):
    urls, copies = indexed_shards(tmp_path, "png", count=2)
    damage(urls[0])
    stale, streamed = (shard_batches(Source(u, [12] * 2), cfg(), BATCH, seed=0, rank=0, world=1)
                       for u in (urls, copies))
    for _ in range(6):
        (x, y), (x2, y2) = next(stale), next(streamed)
        assert torch.equal(x, x2) and torch.equal(y, y2)
    assert stale.skipped == 0
    (said,) = [line for line in capsys.readouterr().err.splitlines() if urls[0] in line]
    assert "streamed without its offset index (" in said and "skipped" not in said


# ----------------------------------------------------------------------------------------------------------------
# Sources


def test_sources_brace_patterns_lists_folders_pipes_and_manifest(tmp_path):
    urls = write_shards(tmp_path / "s")
    pattern = str(tmp_path / "s" / "train-{00000..00004}.tar")
    for spec in (pattern, str(tmp_path / "s"), "::".join(urls)):
        src = open_source(cfg(shards=spec))
        assert src.urls == urls and src.counts == SIZES
    piped = open_source(cfg(shards="::".join(f"pipe:cat {u}" for u in urls), manifest=str(tmp_path / "s" /
                                                                                         "manifest.json")))
    assert piped.counts == SIZES
    s = stream(piped)
    assert sorted(key_ids(raw(s, 0, 0))) == list(range(TOTAL)), "pipe: shards read like local ones"
    (tmp_path / "s" / "manifest.json").unlink()
    with pytest.raises(UserError, match="make_shards.py --index"):
        open_source(cfg(shards=pattern))
    assert open_source(cfg(shards=pattern, mode="resampled")).counts is None


def test_http_shards_and_manifest_from_a_loopback_server(tmp_path):
    write_shards(tmp_path)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        src = open_source(cfg(shards=f"{base}/train-{{00000..00004}}.tar", manifest=f"{base}/manifest.json"))
        assert src.counts == SIZES
        assert sorted(key_ids(raw(stream(src), 0, 0))) == list(range(TOTAL))
        missing = shard_batches(Source([f"{base}/gone.tar"], None), cfg(mode="resampled"), BATCH, 0, 0, 1)
        with pytest.raises(UserError, match=r"shard http://127.0.0.1:\d+/gone.tar: cannot be opened \(HTTP Error 404"):
            next(missing)
    finally:
        server.shutdown()


class _Stalling(http.server.BaseHTTPRequestHandler):
    """Sends the first `server.head` bytes of a shard, then `server.trickle` more bytes one every 0.2 s, then
    nothing for a minute: a hung object store."""

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.server.body)))
        self.end_headers()
        self.wfile.write(self.server.body[:self.server.head])
        self.wfile.flush()
        for i in range(self.server.trickle):
            time.sleep(0.2)
            self.wfile.write(self.server.body[self.server.head + i:self.server.head + i + 1])
            self.wfile.flush()
        time.sleep(60)

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("head, trickle, message", [(0, 0, "stalled: no data for 1 s"),
                                                     (12000, 0, "stalled: no data for 1 s"),
                                                     (0, 1000, "too slow: 0.00 kB/s")])
def test_stalled_or_slow_http_shard_fails_within_the_timeout_naming_it(tmp_path, capsys, head, trickle, message):
    (url,) = write_shards(tmp_path, sizes=[20])
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Stalling)
    server.body, server.head, server.trickle, server.daemon_threads = Path(url).read_bytes(), head, trickle, True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    remote = f"http://127.0.0.1:{server.server_address[1]}/train-00000.tar"
    start = time.monotonic()
    try:
        s = stream(Source([remote], [20]), mode="resampled", timeout_s=1.0, min_rate_kbs=0.1)
        if head == 0:  # nothing arrives: the run stops, naming the URL and the stall
            with pytest.raises(FatalDataError, match=f"shard {remote}: nothing could be read .*{message}"):
                list(s.reader.shard(remote, 20))
        else:  # a stall mid-shard: the samples before it are kept, the rest skipped and counted
            got = list(s.reader.shard(remote, 20))
            assert 0 < len(got) < 20 and s.reader.skipped == 20 - len(got)
            assert f"shard {remote}: {message}" in capsys.readouterr().err
    finally:
        server.shutdown()
    assert time.monotonic() - start < 10


def test_a_reader_that_pauses_is_not_taken_for_a_slow_source(tmp_path):
    """A loader worker whose queue is full stops reading for a while; only time spent waiting on the source counts."""
    (url,) = write_shards(tmp_path, sizes=[20])
    with open_shard(f"pipe:cat {url}", timeout_s=0.5, min_rate_kbs=1000) as stream:
        first = stream.read(512)
        time.sleep(1.5)
        rest = b"".join(iter(lambda: stream.read(1 << 16), b""))
    assert first + rest == Path(url).read_bytes()


def test_stalled_pipe_command_fails_within_the_timeout_and_is_killed(tmp_path):
    s = stream(Source(["pipe:sleep 30"], None), mode="resampled", timeout_s=1.0)
    start = time.monotonic()
    with pytest.raises(FatalDataError, match="shard pipe:sleep 30: nothing could be read .*stalled"):
        list(s.reader.shard("pipe:sleep 30", None))
    assert time.monotonic() - start < 5
    assert subprocess.run(["pgrep", "-f", "^sleep 30$"], capture_output=True).stdout == b"", "the command was killed"


def test_shards_unlike_their_manifest_are_named_and_counted(tmp_path, capsys):
    urls = write_shards(tmp_path, sizes=[6, 6])
    # The manifest says 8 and 4: shard 0 is short by 2, shard 1 has 2 samples more than listed.
    src = Source(urls, [8, 4])
    got = key_ids(raw(stream(src), 0, 0))
    err = capsys.readouterr().err
    assert f"shard {urls[0]} holds 6 samples, its manifest lists 8; skipped 2 sample(s)" in err
    assert f"shard {urls[1]} holds 6 samples, its manifest lists 4; skipped 2 sample(s)" in err
    assert sorted(got) == list(range(10)), "every listed sample that exists is read once, the extra ones are not"
    with pytest.raises(FatalDataError, match="holds 6 samples, its manifest lists 8"):
        list(stream(src, on_error="raise")._chunk(0, 0))


def test_manifests_match_shards_by_full_path_not_file_name(tmp_path):
    a, b = write_shards(tmp_path / "a", sizes=[3]), write_shards(tmp_path / "b", sizes=[5])
    assert Path(a[0]).name == Path(b[0]).name
    src = open_source(cfg(shards=f"{a[0]}::{b[0]}"))
    assert src.counts == [3, 5], "each folder's own manifest counts its own shard"
    with pytest.raises(UserError, match=f"shard {b[0]} is not listed in the manifest {tmp_path / 'a'}"):
        open_source(cfg(shards=f"{a[0]}::{b[0]}", manifest=str(tmp_path / "a" / "manifest.json")))


def test_oversized_members_are_not_read_and_their_sample_is_skipped(tmp_path, capsys):
    path = tmp_path / "bomb.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for key, payload in (("a", png(1)), ("b", b"\0" * (1 << 22)), ("c", png(2))):
            info = tarfile.TarInfo(f"{key}.png")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    with open(path, "rb") as f:
        samples = list(tar_samples(f, str(path), max_member_bytes=1 << 20))
    assert [s["__key__"] for s in samples] == ["a", "b", "c"] and "png" not in samples[1]
    assert "has 4194304 bytes, over the cap of 1048576" in samples[1]["__error__"]


# ----------------------------------------------------------------------------------------------------------------
# 2-D mixtures


def points(cfg_: DataConfig, n: int, seed=0, rank=0, start_batch=0, count=1):
    return list(itertools.islice(PointBatches(cfg_, n, seed, rank, start_batch), count))


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
    c = DataConfig(dataset="ring8", std=0.02)
    a, b = points(c, 16, seed=1, count=5), points(c, 16, seed=1, count=5)
    for (pa, la), (pb, lb) in zip(a, b):
        assert torch.equal(pa, pb) and torch.equal(la, lb)
        assert pa.shape == (16, 2) and pa.dtype == torch.float32
    assert not torch.equal(a[0][0], a[1][0]), "consecutive batches differ"
    assert not torch.equal(a[0][0], points(c, 16, seed=1, rank=1)[0][0])
    assert not torch.equal(a[0][0], points(c, 16, seed=2)[0][0])


def test_point_batches_do_not_touch_the_global_rng_and_resume_exactly():
    c = DataConfig(dataset="grid25")
    torch.manual_seed(0)
    np.random.seed(0)
    fresh = points(c, 8, rank=1, count=10)
    t, n = torch.rand(1), np.random.rand()
    torch.manual_seed(0)
    np.random.seed(0)
    assert torch.equal(t, torch.rand(1)) and n == np.random.rand()
    for (pa, la), (pb, lb) in zip(fresh[7:], points(c, 8, rank=1, start_batch=7, count=3)):
        assert torch.equal(pa, pb) and torch.equal(la, lb)


@pytest.mark.parametrize("dataset, std", [("ring8", 0.02), ("grid25", 0.05)])
def test_mixture_points_lie_near_their_centres(dataset, std):
    c = DataConfig(dataset=dataset, std=std)
    centers = mixture_centers(c)
    (pts, labels), = points(c, 4000)
    p = pts.numpy().astype(np.float64)
    dist = np.linalg.norm(p[:, None, :] - centers[None], axis=2)
    assert (dist.min(axis=1) < 5 * std).all()
    # the label is the mode the point was drawn from, i.e. its nearest centre
    assert np.array_equal(dist.argmin(axis=1), labels.numpy())
    counts = np.bincount(labels.numpy(), minlength=len(centers))
    expected = 4000 / len(centers)
    assert counts.min() > 0.6 * expected and counts.max() < 1.4 * expected
    assert (p - centers[labels.numpy()]).std() == pytest.approx(std, rel=0.1)


def test_gaussian_is_standard_normal():
    (pts, labels), = points(DataConfig(dataset="gaussian"), 8000)
    p = pts.numpy().astype(np.float64)
    assert np.abs(p.mean(axis=0)).max() < 0.05  # standard error ~0.011
    assert np.abs(p.std(axis=0) - 1).max() < 0.05
    assert abs(np.corrcoef(p.T)[0, 1]) < 0.05
    assert labels.unique().tolist() == [0]


# ----------------------------------------------------------------------------------------------------------------
# Device-resident data (data.device_cache)


def cached(source, rank=0, world=1, position=(0, 0, 0), seed=0, batch=BATCH, **kw) -> data.CachedBatches:
    images, labels, skipped = data.decode_dataset(source, cfg(**kw))
    return data.CachedBatches(torch.from_numpy(images), torch.from_numpy(labels), cfg(**kw), batch, seed, rank,
                              world, list(position), skipped)


def test_device_cache_decodes_every_sample_in_shard_order(source):
    images, labels, skipped = data.decode_dataset(source, cfg())
    assert images.shape == (TOTAL, 1, 4, 4) and images.dtype == np.uint8 and skipped == 0
    assert images[:, 0, 0, 0].tolist() == list(range(TOTAL)) and labels.tolist() == [3] * TOTAL


@pytest.mark.parametrize("world, batch", [(2, 4), (3, 5), (1, 43), (2, 20)])
def test_device_cache_ranks_cover_each_epoch_exactly_once_in_equal_batches(source, world, batch):
    ranks = [cached(source, rank=r, world=world, batch=batch) for r in range(world)]
    steps = 3 * TOTAL // (world * batch)
    stream = []  # the global stream: each step, rank 0's batch, then rank 1's, ...
    for _ in range(steps):
        parts = [ids(next(b)[0]) for b in ranks]
        assert all(len(p) == batch for p in parts)
        stream += sum(parts, [])
    epochs = [stream[e * TOTAL:(e + 1) * TOTAL] for e in range(len(stream) // TOTAL)]
    # Every sample exactly once per epoch, so ranks never share one within an epoch.
    assert len(epochs) >= 2 and all(sorted(e) == list(range(TOTAL)) for e in epochs), "each epoch exactly once"
    assert epochs[0] != epochs[1] != epochs[0][::-1], "each epoch is shuffled anew"
    assert [ids(next(cached(source, rank=r, world=world, batch=batch))[0]) for r in range(world)] == [
        stream[r * batch:(r + 1) * batch] for r in range(world)], "the order is seeded: the same every time"


def test_device_cache_resumes_exactly_from_its_saved_position(source):
    first = cached(source, rank=1, world=2)
    for _ in range(7):  # past the end of the first epoch (43 samples, 8 per step)
        next(first)
    position = first.state()
    assert position.tolist() == [[56 // TOTAL, 56 % TOTAL, 0]]
    resumed = cached(source, rank=1, world=2, position=position[0].tolist())
    for _ in range(12):
        assert ids(next(first)[0]) == ids(next(resumed)[0])


@pytest.mark.parametrize("before, after", [(2, 1), (1, 2), (2, 3)])
def test_device_cache_continues_its_epoch_on_another_world_size(source, before, after):
    """The same global batch (12) over `before` ranks, then over `after` from the checkpoint's rows: the epoch (43
    samples) ends with every sample drawn once, and the next epoch starts where an unbroken run's does."""
    batch = 12
    ranks = [cached(source, rank=r, world=before, batch=batch // before) for r in range(before)]
    drawn = [i for _ in range(2) for b in ranks for i in ids(next(b)[0])]
    saved = torch.cat([b.state() for b in ranks])  # what a checkpoint gathers: one row per rank
    said = []
    position = cache_position(saved, "cache", after, 0, said.append)
    assert said == [f"data: continuing at sample 24 of epoch 0 with world size {after} (the checkpoint's was "
                    f"{before}): no sample of the epoch is drawn twice or skipped"]
    ranks = [cached(source, rank=r, world=after, batch=batch // after, position=position) for r in range(after)]
    drawn += [i for _ in range(4) for b in ranks for i in ids(next(b)[0])]
    unbroken = cached(source, world=1, batch=batch)
    assert sorted(drawn[:TOTAL]) == list(range(TOTAL)), "every sample of the epoch once"
    assert drawn == [i for _ in range(6) for i in ids(next(unbroken)[0])], "the global stream of an unbroken run"


@pytest.fixture(scope="module")
def stamped(tmp_path_factory) -> Path:
    """640 MNIST-sized npy samples in 8 indexed shards, each image stamped with its index (so all differ)."""
    root = tmp_path_factory.mktemp("stamped")
    entries = []
    for s in range(8):
        samples = []
        for i in range(s * 80, (s + 1) * 80):
            pixels = np.zeros((28, 28, 1), np.uint8)
            pixels[0, :2, 0] = i % 256, i // 256
            buf = io.BytesIO()
            np.save(buf, pixels)
            samples.append({"__key__": f"sample_{i:05d}", "npy": buf.getvalue(), "cls": str(i % 10).encode()})
        count, digest = write_shard(root / f"train-{s:05d}.tar", samples)
        entries.append(shard_entry(f"train-{s:05d}.tar", count, digest))
    write_manifest(root, build_manifest("stamped", {"height": 28, "width": 28, "channels": 1}, {"train": entries}, 10))
    return root


@pytest.fixture(scope="module")
def drawn(shards, stamped, tmp_path_factory):
    """`drawn(path, *stages)`: the samples a real run on 640 samples (20 steps of 32 per epoch) draws, counted by
    their pixels, and what it says, as (processes, steps to train to) stages; each unbroken run once per module.
    The device cache (data.limit=640 of MNIST) or the loader (2 workers per process)."""
    from runs import launch  # noqa: PLC0415
    done = {}

    def run(path: str, *stages: tuple[int, int]) -> tuple[Counter, str]:
        if (path, stages) in done:
            return done[path, stages]
        data_args = ("data.limit=640",) if path == "device_cache" else (
            "data.dataset=webdataset", f"data.shards={stamped}", "data.device_cache=false", "data.num_workers=2",
            "data.shuffle_buffer=100")
        out = tmp_path_factory.mktemp("drawn")
        said = ""
        for nproc, steps in stages:
            said += launch(out / "run", shards, nproc, *data_args, f"train.steps={steps}", "ckpt.every=10",
                           "eval.every=0", "wandb.mode=disabled", script=("tests/record_batches.py", str(out)))
        done[path, stages] = Counter(line for f in out.glob("rank*.txt") for line in f.read_text().split()), said
        return done[path, stages]

    return run


@pytest.mark.slow
@pytest.mark.parametrize("path", ["device_cache", "loader"])
@pytest.mark.parametrize("before, after", [(2, 1), (1, 2)])
def test_a_run_resumed_on_another_world_size_draws_each_sample_of_its_epoch_once(drawn, path, before, after):
    """Stopped after 10 steps on `before` processes and continued on `after`: the epoch holds every sample once, as
    the same steps of one unbroken run do."""
    (resized, said), (unbroken, _) = drawn(path, (before, 10), (after, 20)), drawn(path, (1, 20))
    assert sum(resized.values()) == 640 and len(resized) == 640 and resized == unbroken, "every sample once"
    assert "continuing at sample 320 of epoch 0 with world size" in said and "restarting" not in said


def test_device_cache_flips_per_sample_and_epoch_deterministically(tmp_path):
    src = arrows(tmp_path)

    def right_edges(**kw) -> list[bool]:
        b = cached(src, batch=16, **kw)
        return [bool(im[0, 0, 3] == 255) for _ in range(8) for im in next(b)[0]]

    flips = right_edges(hflip=True)
    assert 0.3 < sum(flips[:64]) / 64 < 0.7 and flips[:64] != flips[64:], "about half, drawn anew each epoch"
    assert right_edges(hflip=True) == flips and not any(right_edges())


def test_device_cache_skips_bad_samples_and_counts_them(tmp_path, capsys):
    urls = write_shards(tmp_path / "bad", sizes=[5, 5], corrupt={2, 7})
    with wds.TarWriter(str(tmp_path / "bad" / "train-00002.tar")) as writer:  # a good image with a bad label
        writer.write({"__key__": "sample_00010", "png": png(10), "cls": b"-1"})
    b = cached(Source([*urls, str(tmp_path / "bad" / "train-00002.tar")], [5, 5, 1]), batch=2)
    assert b.n == 8 and len(b.labels) == 8 and b.skipped == 3 and b.state()[0, 2] == 3
    assert sorted(ids(b.images)) == [0, 1, 3, 4, 5, 6, 8, 9]
    assert capsys.readouterr().err.count("warning:") == 3


def test_device_cache_mnist_idx_files_equal_their_shards(shards):
    """The IDX fast path gives the pixels and labels that decoding MNIST's own shards gives."""
    from conftest import MNIST
    first = json.loads((shards / "manifest.json").read_text())["splits"]["train"]["shards"][0]
    src = Source([str(shards / first["name"])], [first["num_samples"]])
    from_shard = data.decode_dataset(src, cfg(resolution=28))
    from_idx = data.decode_dataset(src, cfg(dataset="mnist", resolution=28, mnist_dir=str(MNIST)))
    n = first["num_samples"]
    assert np.array_equal(from_shard[0], from_idx[0][:n]) and np.array_equal(from_shard[1], from_idx[1][:n])


@pytest.mark.parametrize("setting, mode, counts, wanted", [
    ("auto", "epoch", [60000], True), ("auto", "epoch", [10**7], False), (True, "epoch", [10**7], True),
    (False, "epoch", [10], False), ("auto", "resampled", [10], False), ("auto", "epoch", None, False)])
def test_device_cache_auto_holds_what_fits(setting, mode, counts, wanted):
    c = cfg(device_cache=setting, mode=mode, resolution=28)
    assert data.wants_device_cache(c, Source(["a.tar"], counts)) is wanted


def test_labels_outside_data_classes_are_bad_samples_in_the_cache_and_the_loader(tmp_path, capsys):
    # write_shards labels every sample 3; one more shard holds class 1. With data.classes=2 (a conditional run's
    # embedding has rows 0 and 1 only) the 3s are skipped and counted, never handed to the networks.
    urls = write_shards(tmp_path / "s", sizes=[4])
    with wds.TarWriter(str(tmp_path / "s" / "train-00001.tar")) as writer:
        for i in (4, 5):
            writer.write({"__key__": f"sample_{i:05d}", "png": png(i), "cls": b"1"})
    src = Source([*urls, str(tmp_path / "s" / "train-00001.tar")], [4, 2])
    b = cached(src, batch=2, classes=2)
    assert b.n == 2 and b.labels.tolist() == [1, 1] and b.skipped == 4
    assert "cls 3 is not a class from 0 to 1 (data.classes=2)" in capsys.readouterr().err
    labels = next(iter(stream(src, classes=2, mode="resampled")))[1]
    assert set(np.asarray(labels).tolist()) == {1}
    assert cached(src, batch=2).n == 6  # without data.classes every label is taken as it is


# ----------------------------------------------------------------------------------------------------------------
# A fixed subset (data.limit)


def test_data_limit_trains_on_one_fixed_subset_on_any_world_size(source):
    keep = data.limited(TOTAL, 10)
    assert len(set(keep.tolist())) == 10 and keep.tolist() == data.limited(TOTAL, 10).tolist()
    assert set(keep.tolist()) < set(data.limited(TOTAL, 20).tolist())  # a larger subset holds the smaller one
    assert keep.tolist() != list(range(10))  # drawn from the whole dataset, not its first shard
    for world in (1, 2):  # one epoch of 10 samples, read by 1 or 2 ranks
        ranks = [cached(source, rank=r, world=world, batch=10 // world, limit=10) for r in range(world)]
        epoch = sum((ids(next(b)[0]) for b in ranks), [])  # sample i's pixels are i
        assert sorted(epoch) == keep.tolist(), f"world {world}"
    assert data.limited(TOTAL, 0) is None


def test_data_limit_takes_the_same_mnist_images_from_idx_files_and_shards(shards):
    from conftest import MNIST
    first = json.loads((shards / "manifest.json").read_text())["splits"]["train"]["shards"][0]
    src = Source([str(shards / first["name"])], [first["num_samples"]])
    from_shard = data.decode_dataset(src, cfg(resolution=28, limit=50))
    from_idx = data.decode_dataset(src, cfg(dataset="mnist", resolution=28, mnist_dir=str(MNIST), limit=50))
    assert from_shard[0].shape == (50, 1, 28, 28)
    assert np.array_equal(from_shard[0], from_idx[0]) and np.array_equal(from_shard[1], from_idx[1])


def test_data_limit_above_the_dataset_is_one_error_naming_both_counts(source):
    with pytest.raises(UserError, match=f"data.limit=100 is more than the {TOTAL} samples the dataset holds"):
        data.decode_dataset(source, cfg(limit=100))


# ----------------------------------------------------------------------------------------------------------------
# The loop's side: open_batches and the DataState a checkpoint keeps


def real_ids(real: torch.Tensor) -> list[int]:
    """The global sample indices of a batch on the device, read back from its pixels scaled to [-1, 1]."""
    return ((real[:, 0, 0, 0] + 1) * 127.5).round().long().tolist()


@pytest.mark.parametrize("cache", [True, False])
def test_open_batches_counts_its_batches_and_goes_on_from_its_state(source, cache):
    """A rank's batches count themselves; their state opened again goes on as the unbroken batches do; on another
    world size it continues the epoch, and on the other data path it restarts the epoch."""
    c = cfg(shards=str(Path(source.urls[0]).parent), device_cache=cache)
    said = []

    def opened(saved: data.DataState, world: int = 1, rank: int = 0) -> data.DeviceBatches:
        return data.open_batches(c, PerfConfig(), batch=4, seed=0, rank=rank, world=world, device=torch.device("cpu"),
                                 saved=saved, nimg=20, first=lambda fn: fn(), say=said.append)

    unbroken = opened(data.DataState.fresh())
    [next(unbroken) for _ in range(5)]
    state = unbroken.state()
    assert (state.layout, state.batches, state.spans.shape) == ("cache" if cache else "stream", 5, (0, 3))
    assert state.pos.tolist() == [[0, 20, 0]], "one row: the cache's global position, or the one loader slot's"
    resumed = opened(state)
    assert [real_ids(next(resumed)[0]) for _ in range(6)] == [real_ids(next(unbroken)[0]) for _ in range(6)]
    assert resumed.state().batches == unbroken.state().batches == 11
    assert not [line for line in said if "checkpoint" in line], "the same world size goes on with nothing said"
    assert torch.equal(resumed.state().pos, unbroken.state().pos)
    two = [opened(state, world=2, rank=r) for r in range(2)]
    assert said[-1].startswith("data: continuing at sample 20 of epoch 0 with world size 2")
    # The loader's slots share what the checkpoint's one slot had left of epoch 0, kept until it is read.
    assert all(b.state().spans.tolist() == ([] if cache else [[0, 20, TOTAL]]) and b.state().batches == 5
               for b in two)
    other = opened(data.DataState(state.pos, state.spans, "stream" if cache else "cache", 5))
    assert "the positions of the other data path" in said[-1] and other.state().layout == state.layout
    assert other.state().pos.tolist() == [[0, 0, 0]], "the start of epoch 0 (nimg=20 is within it)"


def test_open_batches_of_points_keep_the_state_they_were_opened_with():
    saved = data.DataState(torch.tensor([[5, 0, 0]]), torch.tensor([[0, 3, 9]]), "stream", 5)
    batches = data.open_batches(DataConfig(dataset="ring8"), PerfConfig(), batch=8, seed=0, rank=0, world=1,
                                device=torch.device("cpu"), saved=saved, nimg=80, first=lambda fn: fn(),
                                say=print)
    first = next(batches)[0]
    assert torch.equal(first, next(iter(PointBatches(DataConfig(dataset="ring8"), 8, 0, 0, 5)))[0])
    state = batches.state()
    assert state.pos.tolist() == [[6, 0, 0]] and state.batches == 6
    assert state.spans.tolist() == [[0, 3, 9]] and state.layout == "stream", "a 2-D run leaves them as they were"
