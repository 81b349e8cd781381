"""Tests for gan_dist.mnist (IDX reading, download failure), gan_dist.mnist_shards (shard writing, the cache), the
shard-folder manifests of gan_dist.shardformat, and scripts/prepare_mnist.py.

Run from the repo root:

    . .venv/bin/activate && python -m pytest tests/test_mnist.py -q

The real-data tests read the MNIST files where tests/runs.py's MNIST says ($GAN_DIST_MNIST_DIR, ...). Converting
all 70,000 images takes several seconds, so it happens once per module, with the CLI run (which doubles as
the second conversion for the determinism check) going on alongside it.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from runs import MNIST

from gan_dist import mnist
from gan_dist.errors import UserError
from gan_dist.images import decode_image
from gan_dist.mnist import FILES, download_mnist, load_mnist, read_idx
from gan_dist.mnist_shards import SHARD_SIZE, ensure_shards, write_shards
from gan_dist.shardformat import read_manifest

REPO = Path(__file__).resolve().parents[1]
# Published per-class counts of the MNIST test split (also in shared/data/mnist/README.md).
TEST_LABEL_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def idx_bytes(array: np.ndarray) -> bytes:
    magic = 0x00000803 if array.ndim == 3 else 0x00000801
    return struct.pack(f">I{array.ndim}I", magic, *array.shape) + array.astype(np.uint8).tobytes()


def make_mnist(folder: Path, n_train: int = 23, n_test: int = 7, seed: int = 0) -> dict:
    """A small random MNIST folder; images gzipped and labels raw, since users have both."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split, n in (("train", n_train), ("test", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        images_name, labels_name = FILES[split]
        (folder / f"{images_name}.gz").write_bytes(gzip.compress(idx_bytes(images)))
        (folder / labels_name).write_bytes(idx_bytes(labels))
        arrays[split] = (images, labels)
    return arrays


def read_shard(path: Path) -> list[dict]:
    """Samples of one shard as the trainer's webdataset pipeline groups them."""
    from webdataset.tariterators import group_by_keys, tar_file_expander

    # Opened here rather than by wds.WebDataset, which leaves the file to the garbage collector.
    with open(path, "rb") as f:
        return list(group_by_keys(tar_file_expander([{"stream": f, "url": str(path)}])))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_user_error(excinfo: pytest.ExceptionInfo, *names: object) -> str:
    message = str(excinfo.value)
    for name in names:
        assert str(name) in message, f"{name} not named in: {message}"
    assert "\n" not in message
    return message


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    assert MNIST.is_dir(), f"real MNIST expected at {MNIST} (set GAN_DIST_MNIST_DIR)"
    root = tmp_path_factory.mktemp("real")
    cli = subprocess.Popen(
        [sys.executable, "scripts/prepare_mnist.py", "--src", str(MNIST), "--out", str(root / "cli")],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        start = time.perf_counter()
        manifest = write_shards(MNIST, root / "lib")
        seconds = time.perf_counter() - start
    finally:
        cli_out, cli_err = cli.communicate(timeout=600)
    print(f"\nwrite_shards on full MNIST: {seconds:.1f} s")
    return SimpleNamespace(
        root=root,
        dir=root / "lib",
        manifest=manifest,
        arrays=load_mnist(MNIST),
        cli=SimpleNamespace(dir=root / "cli", rc=cli.returncode, out=cli_out, err=cli_err),
    )


def test_real_mnist_manifest_counts_and_checksums(real):
    manifest = real.manifest
    assert read_manifest(real.dir) == manifest
    assert manifest["format"] == "gan-dist-shards/1"
    assert manifest["dataset"] == "mnist"
    assert manifest["image"] == {"height": 28, "width": 28, "channels": 1}
    assert manifest["num_classes"] == 10
    for split, total, shard_count in (("train", 60000, 120), ("test", 10000, 20)):
        info = manifest["splits"][split]
        assert info["num_samples"] == total
        assert sum(s["num_samples"] for s in info["shards"]) == total
        assert [s["name"] for s in info["shards"]] == [f"{split}-{i:05d}.tar" for i in range(shard_count)]
        for shard in info["shards"]:
            assert sha256(real.dir / shard["name"]) == shard["sha256"]
    assert sorted(p.name for p in real.dir.iterdir()) == sorted(
        ["manifest.json"] + [name for info in manifest["splits"].values() for s in info["shards"]
                             for name in (s["name"], s["name"] + ".idx")]
    ), "the manifest, and each shard with its offset index"
    # The temp folder was renamed into place, not left beside it.
    assert sorted(p.name for p in real.root.iterdir()) == ["cli", "lib"]


def test_real_shard_decodes_to_exact_source_pixels_and_labels(real):
    images, labels = real.arrays["train"]
    samples = read_shard(real.dir / "train-00003.tar")
    assert len(samples) == SHARD_SIZE
    for offset, sample in enumerate(samples):
        index = 3 * SHARD_SIZE + offset
        assert sample["__key__"] == f"train_{index:05d}"
        pixels = decode_image(sample, 28, 1)
        assert pixels.shape == (28, 28, 1) and pixels.dtype == np.uint8
        np.testing.assert_array_equal(pixels[:, :, 0], images[index])
        assert sample["cls"] == str(labels[index]).encode()


def test_cli_converts_real_mnist_byte_identically(real):
    assert real.cli.rc == 0, real.cli.err
    assert "Traceback" not in real.cli.err
    summary = real.cli.out.strip().splitlines()
    assert len(summary) == 1
    assert "60000" in summary[0] and "10000" in summary[0] and str(real.cli.dir) in summary[0]
    # Same input, separate process and folder: the same bytes, so checksums are stable across rebuilds.
    assert read_manifest(real.cli.dir) == real.manifest


def test_gzip_and_raw_idx_read_the_same(tmp_path):
    for name in FILES["test"]:
        gz = MNIST / f"{name}.gz"
        raw = tmp_path / name
        raw.write_bytes(gzip.decompress(gz.read_bytes()))
        # Named without .gz but gzipped: detection goes by content, not by name.
        misnamed = tmp_path / f"{name}.bin"
        shutil.copy(gz, misnamed)
        from_gz, from_raw, from_misnamed = read_idx(gz), read_idx(raw), read_idx(misnamed)
        assert from_gz.dtype == np.uint8
        np.testing.assert_array_equal(from_gz, from_raw)
        np.testing.assert_array_equal(from_gz, from_misnamed)
    images, labels = read_idx(MNIST / "t10k-images-idx3-ubyte.gz"), read_idx(MNIST / "t10k-labels-idx1-ubyte.gz")
    assert images.shape == (10000, 28, 28) and labels.shape == (10000,)
    assert np.bincount(labels, minlength=10).tolist() == TEST_LABEL_COUNTS


GOOD_IMAGES = idx_bytes(np.arange(3 * 28 * 28, dtype=np.uint32).reshape(3, 28, 28) % 256)


def _corrupt_gzip() -> bytes:
    data = bytearray(gzip.compress(GOOD_IMAGES))
    data[len(data) // 2] ^= 0xFF
    return bytes(data)


@pytest.mark.parametrize(
    "content, expected",
    [
        pytest.param(struct.pack(">I", 0x00000804) + GOOD_IMAGES[4:], "bad magic 0x00000804", id="bad-magic"),
        pytest.param(b"<html>Not Found</html>", "bad magic", id="html-page"),
        pytest.param(GOOD_IMAGES[:-100], "truncated", id="truncated-payload"),
        pytest.param(GOOD_IMAGES[:10], "truncated", id="truncated-header"),
        pytest.param(GOOD_IMAGES + b"\0" * 5, "5 bytes more", id="over-long-payload"),
        pytest.param(gzip.compress(GOOD_IMAGES)[:-40], "gzip", id="truncated-gzip"),
        pytest.param(_corrupt_gzip(), "gzip", id="corrupt-gzip"),
        pytest.param(b"", "too short", id="empty"),
    ],
)
def test_read_idx_rejects_broken_files_naming_them(tmp_path, content, expected):
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(content)
    with pytest.raises(UserError) as excinfo:
        read_idx(path)
    assert_user_error(excinfo, path, expected, "data.mnist_dir")


def test_load_mnist_rejects_image_label_count_mismatch(tmp_path):
    make_mnist(tmp_path)
    labels = tmp_path / FILES["train"][1]
    labels.write_bytes(idx_bytes(np.zeros(22, dtype=np.uint8)))
    with pytest.raises(UserError) as excinfo:
        load_mnist(tmp_path)
    assert_user_error(excinfo, tmp_path / f"{FILES['train'][0]}.gz", labels, "23", "22")


def test_load_mnist_rejects_labels_outside_0_to_9(tmp_path):
    make_mnist(tmp_path)
    labels = tmp_path / FILES["test"][1]
    labels.write_bytes(idx_bytes(np.array([1, 2, 10, 3, 4, 5, 6], dtype=np.uint8)))
    with pytest.raises(UserError) as excinfo:
        load_mnist(tmp_path)
    assert_user_error(excinfo, labels, "10")


def test_load_mnist_accepts_subsets_and_mixed_gzip_raw(tmp_path):
    arrays = make_mnist(tmp_path, n_train=5, n_test=3)
    loaded = load_mnist(tmp_path)
    for split in ("train", "test"):
        for got, want in zip(loaded[split], arrays[split]):
            np.testing.assert_array_equal(got, want)


def test_missing_folder_names_it_and_the_fix(tmp_path):
    missing = tmp_path / "no-such-mnist"
    with pytest.raises(UserError) as excinfo:
        load_mnist(missing)
    assert_user_error(excinfo, missing, "data.mnist_dir", "--src")


def test_missing_file_names_it_and_the_folder(tmp_path):
    make_mnist(tmp_path)
    (tmp_path / FILES["test"][1]).unlink()
    with pytest.raises(UserError) as excinfo:
        load_mnist(tmp_path)
    message = assert_user_error(excinfo, tmp_path, FILES["test"][1], "data.mnist_dir")
    assert FILES["train"][0] not in message


def test_download_failure_is_a_fast_user_error_leaving_nothing_behind(tmp_path, monkeypatch):
    monkeypatch.setattr(mnist, "MIRRORS", ["http://127.0.0.1:9/"])
    dest = tmp_path / "raw"
    start = time.perf_counter()
    with pytest.raises(UserError) as excinfo:
        download_mnist(dest, timeout=2.0)
    assert time.perf_counter() - start < 5
    assert_user_error(excinfo, "127.0.0.1:9", dest, "data.mnist_dir", "--src")
    assert list(dest.iterdir()) == []

    # The run-time entry point goes the same way when the data folder is empty...
    with pytest.raises(UserError) as excinfo:
        ensure_shards(dest, tmp_path / "cache")
    assert_user_error(excinfo, "127.0.0.1:9")
    # ...and with downloads off, says which files are missing instead of trying.
    with pytest.raises(UserError) as excinfo:
        ensure_shards(dest, tmp_path / "cache", download=False)
    assert_user_error(excinfo, dest, FILES["train"][0])
    assert not (tmp_path / "cache").exists()


def test_shards_split_at_shard_size_with_a_smaller_last_one(tmp_path):
    arrays = make_mnist(tmp_path / "src", n_train=23, n_test=7)
    manifest = write_shards(tmp_path / "src", tmp_path / "out", shard_size=10)
    assert [s["num_samples"] for s in manifest["splits"]["train"]["shards"]] == [10, 10, 3]
    assert [s["num_samples"] for s in manifest["splits"]["test"]["shards"]] == [7]
    assert json.loads((tmp_path / "out" / "manifest.json").read_text()) == manifest

    images, labels = arrays["train"]
    shards = manifest["splits"]["train"]["shards"]
    samples = [s for shard in shards for s in read_shard(tmp_path / "out" / shard["name"])]
    assert [s["__key__"] for s in samples] == [f"train_{i:05d}" for i in range(23)]
    np.testing.assert_array_equal(np.stack([decode_image(s, 28, 1)[:, :, 0] for s in samples]), images)
    assert [int(s["cls"]) for s in samples] == labels.tolist()


def test_write_shards_refuses_finished_output_but_replaces_empty_or_broken(tmp_path):
    make_mnist(tmp_path / "src")
    out = tmp_path / "out"
    out.mkdir()  # e.g. created by a config or a mount point
    first = write_shards(tmp_path / "src", out, shard_size=10)

    with pytest.raises(UserError) as excinfo:
        write_shards(tmp_path / "src", out, shard_size=10)
    assert_user_error(excinfo, out, "already exists")

    (out / "train-00001.tar").unlink()  # an interrupted copy or a cleanup gone wrong
    assert write_shards(tmp_path / "src", out, shard_size=10) == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


def test_write_shards_never_deletes_a_folder_of_other_files(tmp_path):
    make_mnist(tmp_path / "src")
    out = tmp_path / "home"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    with pytest.raises(UserError) as excinfo:
        write_shards(tmp_path / "src", out)
    assert_user_error(excinfo, out, "thesis.tex")
    assert (out / "thesis.tex").read_text() == "precious"


def test_read_manifest_absent_broken_or_incomplete(tmp_path):
    assert read_manifest(tmp_path / "nothing-here") is None
    make_mnist(tmp_path / "src")
    out = tmp_path / "out"
    write_shards(tmp_path / "src", out, shard_size=10)

    (out / "test-00000.tar").unlink()
    with pytest.raises(UserError) as excinfo:
        read_manifest(out)
    assert_user_error(excinfo, out, "test-00000.tar", "delete")

    (out / "manifest.json").write_text('{"format": "gan-dist-shards/1", "splits": ')
    with pytest.raises(UserError) as excinfo:
        read_manifest(out)
    assert_user_error(excinfo, out, "manifest.json", "delete")


def test_ensure_shards_builds_once_then_reuses_the_cache(tmp_path):
    make_mnist(tmp_path / "src")
    built = ensure_shards(tmp_path / "src", tmp_path / "cache", download=False)
    assert built["splits"]["train"]["num_samples"] == 23
    # Later runs need only the cache, not the source files.
    shutil.rmtree(tmp_path / "src")
    assert ensure_shards(tmp_path / "src", tmp_path / "cache", download=False) == built


def test_a_cache_written_before_offset_indexes_gets_them_and_keeps_its_shards(tmp_path):
    make_mnist(tmp_path / "src")
    write_shards(tmp_path / "src", tmp_path / "out", shard_size=10)
    indexes = sorted((tmp_path / "out").glob("*.idx"))
    assert [p.name for p in indexes] == ["test-00000.tar.idx", "train-00000.tar.idx", "train-00001.tar.idx",
                                         "train-00002.tar.idx"]
    before = {p.name: p.read_bytes() for p in indexes}
    shards = {p.name: sha256(p) for p in (tmp_path / "out").glob("*.tar")}
    for p in indexes:
        p.unlink()
    ensure_shards(tmp_path / "src", tmp_path / "out", download=False)
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").glob("*.idx")} == before
    assert {p.name: sha256(p) for p in (tmp_path / "out").glob("*.tar")} == shards


def test_cli_missing_src_prints_one_line_error_without_traceback(tmp_path):
    missing = tmp_path / "nope"
    result = subprocess.run(
        [sys.executable, "scripts/prepare_mnist.py", "--src", str(missing), "--out", str(tmp_path / "out")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(missing) in lines[0]
    assert not (tmp_path / "out").exists()
