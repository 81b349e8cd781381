"""Tests for gan_dist.writer and scripts/make_shards.py: image folder -> webdataset shards, and indexing shards.

The image folder `pets` has class folders `cat` and `dog` (plus `dog/puppies`, which belongs to `dog`) with 25
readable images: PNG, JPEG (`.jpg` and `.JPEG`) and WebP, mostly 16x16 RGB, some 8x12 grayscale, one 96x96 noise
PNG too big for a 30 kB shard. Beside them: a PNG of garbage bytes, a truncated JPEG (which PIL's `verify()` alone
lets through), and a text file.

Run from the repo root:

    . .venv/bin/activate && python -m pytest tests/test_make_shards.py -q
"""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from gan_dist.errors import UserError
from gan_dist.shardformat import IMAGE_EXTS, read_manifest_file
from gan_dist.shards import open_shard, tar_samples
from gan_dist.writer import index_shards, make_shards

REPO = Path(__file__).resolve().parents[1]
SCRIPT = str(REPO / "scripts" / "make_shards.py")
CORRUPT = ["cat/broken.png", "dog/truncated.jpg"]
MAX_COUNT = 6


def encode(array: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def pets(tmp_path_factory) -> tuple[Path, list[str]]:
    """The image folder and its readable images' relative paths."""
    root = tmp_path_factory.mktemp("src") / "pets"
    rng = np.random.default_rng(0)

    def noise(*shape: int) -> np.ndarray:
        return rng.integers(0, 256, shape, dtype=np.uint8)

    files = {f"cat/{i}.png": encode(noise(16, 16, 3), "PNG") for i in range(7)}
    files |= {f"cat/{i}.jpg": encode(noise(16, 16, 3), "JPEG") for i in range(3)}
    files |= {"cat/w.webp": encode(noise(16, 16, 3), "WEBP"), "cat/big.png": encode(noise(96, 96, 3), "PNG")}
    files |= {f"dog/{i}.png": encode(noise(8, 12), "PNG") for i in range(6)}
    files |= {f"dog/{i}.JPEG": encode(noise(16, 16, 3), "JPEG") for i in range(5)}
    files |= {f"dog/puppies/{i}.png": encode(noise(8, 12), "PNG") for i in range(2)}
    good = sorted(files)
    files["cat/broken.png"] = b"not a png at all"
    files["dog/truncated.jpg"] = encode(noise(64, 64, 3), "JPEG")[:3000]
    files["notes.txt"] = b"collected in 2023"
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root, good


@pytest.fixture(scope="module")
def cli(pets, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """One run of the script: the output folder and the finished process."""
    out = tmp_path_factory.mktemp("cli") / "pets-shards"
    proc = subprocess.run([sys.executable, SCRIPT, "--src", str(pets[0]), "--out", str(out),
                           "--max-count", str(MAX_COUNT), "--workers", "2"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return out, proc


def read_shards(out: Path) -> dict[str, list[dict]]:
    """Every shard's samples, by file name."""
    shards = {}
    for path in sorted(out.glob("*.tar")):
        with open_shard(str(path)) as stream:
            shards[path.name] = list(tar_samples(stream, str(path)))
    return shards


def image_member(sample: dict) -> str:
    (ext,) = [e for e in IMAGE_EXTS if e in sample]
    return ext


def test_every_readable_image_is_stored_once_unchanged(pets, cli):
    root, good = pets
    samples = [s for shard in read_shards(cli[0]).values() for s in shard]
    paths = [json.loads(s["json"])["path"] for s in samples]
    assert sorted(paths) == good  # each exactly once, nothing unreadable
    for sample, path in zip(samples, paths, strict=True):
        suffix = path.rsplit(".", 1)[1].lower()
        ext = image_member(sample)
        assert ext == ("jpg" if suffix == "jpeg" else suffix)
        assert sample[ext] == (root / path).read_bytes()
    keys = [s["__key__"] for s in samples]
    assert len(set(keys)) == len(keys) and all(k.isdigit() and len(k) == 8 for k in keys)


def test_class_index_is_position_of_the_first_level_folder(cli):
    manifest = json.loads((cli[0] / "manifest.json").read_text())
    assert manifest["classes"] == ["cat", "dog"] and manifest["num_classes"] == 2
    samples = [s for shard in read_shards(cli[0]).values() for s in shard]
    for s in samples:
        assert int(s["cls"]) == manifest["classes"].index(json.loads(s["json"])["path"].split("/")[0])
    assert sum(int(s["cls"]) == 1 for s in samples) == 13  # dog/puppies/* count as dog


def test_manifest_matches_the_shard_files(pets, cli):
    out = cli[0]
    manifest = read_manifest_file(str(out / "manifest.json"))
    shards = read_shards(out)
    split = manifest["splits"]["train"]
    assert [s["name"] for s in split["shards"]] == sorted(shards) == [f"train-{i:05d}.tar" for i in range(len(shards))]
    for entry in split["shards"]:
        assert entry["num_samples"] == len(shards[entry["name"]])
        assert entry["sha256"] == hashlib.sha256((out / entry["name"]).read_bytes()).hexdigest()
    assert split["num_samples"] == len(pets[1])
    assert manifest["dataset"] == "pets"
    assert manifest["image"] == {"height": 16, "width": 16, "channels": 3, "uniform": False}


def test_unreadable_images_are_skipped_with_a_warning_naming_them(pets, cli):
    _, proc = cli
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == len(CORRUPT)
    for rel in CORRUPT:
        assert sum(str(pets[0] / rel) in line for line in warnings) == 1
    assert "skipped 2 unreadable images" in proc.stdout and "ignored 1 other file" in proc.stdout


def test_max_count_bounds_every_shard_and_shards_mix_classes(cli):
    shards = read_shards(cli[0])
    assert all(1 <= len(s) <= MAX_COUNT for s in shards.values())
    assert max(len(s) for s in shards.values()) == MAX_COUNT
    assert any(len({s["cls"] for s in shard}) == 2 for shard in shards.values())


def test_max_size_bounds_every_shard_but_a_single_oversize_sample(pets, tmp_path):
    limit_mb = 0.03
    manifest = make_shards(pets[0], tmp_path / "out", max_size_mb=limit_mb, workers=2)
    shards = read_shards(tmp_path / "out")
    for name, samples in shards.items():
        if len(samples) > 1:
            assert (tmp_path / "out" / name).stat().st_size <= limit_mb * 1e6
    (big,) = [s for s in shards.values() if any(json.loads(x["json"])["path"] == "cat/big.png" for x in s)]
    assert len(big) == 1
    assert max(len(s) for s in shards.values()) > 1  # the limit packs samples, not one per shard
    assert manifest["splits"]["train"]["num_samples"] == len(pets[1])


def test_same_input_gives_byte_identical_shards(pets, cli, tmp_path):
    make_shards(pets[0], tmp_path / "again", max_count=MAX_COUNT, workers=1)
    first = {p.name: p.read_bytes() for p in cli[0].iterdir()}
    assert first == {p.name: p.read_bytes() for p in (tmp_path / "again").iterdir()}
    make_shards(pets[0], tmp_path / "reseeded", max_count=MAX_COUNT, workers=1, seed=1)
    assert (tmp_path / "reseeded" / "train-00000.tar").read_bytes() != first["train-00000.tar"]


def test_refuses_a_non_empty_output_folder(pets, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match=f"{out} already exists and is not an empty folder"):
        make_shards(pets[0], out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_nothing_is_left_behind_when_no_image_is_readable(tmp_path):
    src = tmp_path / "junk"
    src.mkdir()
    (src / "a.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(UserError, match=f"no image in {src} could be read"):
        make_shards(src, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk"]  # no output, no temp folder


def test_flat_folder_has_no_classes_and_an_empty_out_folder_is_used(tmp_path):
    src, out = tmp_path / "flat", tmp_path / "out"
    src.mkdir()
    out.mkdir()
    for i in range(3):
        (src / f"{i}.png").write_bytes(encode(np.full((5, 7), i, np.uint8), "PNG"))
    manifest = make_shards(src, out, workers=1)
    assert manifest["classes"] == [] and manifest["num_classes"] == 0
    assert manifest["image"] == {"height": 5, "width": 7, "channels": 1, "uniform": True}
    (samples,) = read_shards(out).values()
    assert len(samples) == 3 and not any("cls" in s for s in samples)


def test_images_both_at_the_top_and_in_sub_folders_are_refused(tmp_path):
    src = tmp_path / "mixed"
    (src / "cat").mkdir(parents=True)
    (src / "top.png").write_bytes(encode(np.zeros((4, 4), np.uint8), "PNG"))
    (src / "cat" / "a.png").write_bytes(encode(np.zeros((4, 4), np.uint8), "PNG"))
    with pytest.raises(UserError, match=r"both directly in it \(top.png\) and in sub-folders \(cat/a.png\)"):
        make_shards(src, tmp_path / "out")


def test_cli_missing_src_prints_one_error_line_and_exits_2(tmp_path):
    missing = tmp_path / "nowhere"
    proc = subprocess.run([sys.executable, SCRIPT, "--src", str(missing), "--out", str(tmp_path / "out")],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        f"error: image folder {missing} does not exist; give --src the folder that holds the images"]
    assert not (tmp_path / "out").exists()


def write_foreign(folder: Path, sizes: list[int], labels: list[int]) -> list[Path]:
    """Shards as another tool writes them: plain TarWriter, keys with no index, `jpg` + `cls`."""
    folder.mkdir(parents=True, exist_ok=True)
    paths, n, rng = [], 0, np.random.default_rng(1)
    for i, size in enumerate(sizes):
        paths.append(folder / f"part-{i}.tar")
        with wds.TarWriter(str(paths[-1]), encoder=False) as writer:
            for _ in range(size):
                jpg = encode(rng.integers(0, 256, (10, 20, 3), np.uint8), "JPEG")
                writer.write({"__key__": f"img_{n:04d}", "jpg": jpg, "cls": str(labels[n % len(labels)]).encode()})
                n += 1
    return paths


def test_index_counts_foreign_shards_and_replaces_the_manifest(tmp_path):
    folder = tmp_path / "laion"
    paths = write_foreign(folder, [5, 3], labels=[0, 3, 1])
    (folder / "manifest.json").write_text("stale")
    proc = subprocess.run([sys.executable, SCRIPT, "--index", str(folder), "--workers", "2"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    manifest = read_manifest_file(str(folder / "manifest.json"))
    assert manifest["splits"]["train"] == {"num_samples": 8, "shards": [
        {"name": p.name, "num_samples": n, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
        for p, n in zip(paths, [5, 3], strict=True)]}
    assert manifest["dataset"] == "laion"
    assert manifest["image"] == {"height": 10, "width": 20, "channels": 3, "uniform": True}
    # Integer labels: position in `classes` is the label, and num_classes covers label 2 though no sample has it.
    assert manifest["classes"] == ["0", "1", "2", "3"] and manifest["num_classes"] == 4
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", "part-0.tar", "part-0.tar.idx", "part-1.tar",
                                                       "part-1.tar.idx"], "the manifest and an offset index per shard"


def test_index_names_a_truncated_shard_and_keeps_the_old_manifest(tmp_path):
    folder = tmp_path / "shards"
    _, bad = write_foreign(folder, [2, 6], labels=[0])
    bad.write_bytes(bad.read_bytes()[:4000])
    (folder / "manifest.json").write_text("old")
    with pytest.raises(UserError, match=f"shard {bad}: is truncated or corrupt.*re-write this shard or remove it"):
        index_shards(folder, workers=2)
    assert (folder / "manifest.json").read_text() == "old"


def test_index_without_tars_is_refused(tmp_path):
    with pytest.raises(UserError, match=f"shard folder {tmp_path} holds no .tar files"):
        index_shards(tmp_path)


def test_npy_format_stores_each_image_as_training_decodes_it(pets, tmp_path):
    """--format npy: every readable image once, as the uint8 array decode_image gives at that resolution, and a
    manifest of that shape; the index of such shards finds the same."""
    from gan_dist.images import decode_image

    src, good = pets
    out = tmp_path / "npy"
    proc = subprocess.run([sys.executable, SCRIPT, "--src", str(src), "--out", str(out), "--format", "npy",
                           "--resolution", "8", "--channels", "3", "--max-count", str(MAX_COUNT)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    samples = [s for shard in read_shards(out).values() for s in shard]
    assert sorted(json.loads(s["json"])["path"] for s in samples) == good
    for s in samples:
        rel = json.loads(s["json"])["path"]
        ext = rel.rpartition(".")[2].lower().replace("jpeg", "jpg")
        expected = decode_image({ext: (src / rel).read_bytes()}, 8, 3)
        assert np.array_equal(np.load(io.BytesIO(s["npy"]), allow_pickle=False), expected), rel
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["image"] == {"height": 8, "width": 8, "channels": 3, "uniform": True}
    assert index_shards(out)["image"] == manifest["image"]


@pytest.mark.parametrize("args, message", [
    (["--format", "npy"], "--format npy needs --resolution"),
    (["--resolution", "8"], "--resolution and --channels go with --format npy"),
])
def test_npy_options_are_checked_in_one_line(pets, tmp_path, args, message):
    proc = subprocess.run([sys.executable, SCRIPT, "--src", str(pets[0]), "--out", str(tmp_path / "o"), *args],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr
