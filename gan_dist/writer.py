"""Writing shards from an image folder (`make_shards`) and indexing shards written elsewhere (`index_shards`).

Both leave a `manifest.json` (`shardformat.py`'s, with `classes` and `image.uniform` beside what MNIST's has) next to
the shards, and both are what `scripts/make_shards.py` runs.

`make_shards` reads `FOLDER/*.png|jpg|jpeg|webp` (no classes) or `FOLDER/<class>/**/*` (classes are the sorted names
of the first-level folders that hold images; a class index is its position in that list). The file list is sorted,
then shuffled with `seed`, so every shard mixes the classes and the same input always gives the same shards. Shard
boundaries are planned from file sizes alone; worker processes then each write whole shards. A sample is the image
file's bytes as they are (`jpeg` stored as `jpg`), `cls` (the class index) when there are classes, and `json`
(`{"path": ...}`, the source path relative to FOLDER). Every image is fully decoded before it is written; one that
fails is skipped with a warning. Output goes to a temp folder beside `out` that is renamed into place at the end.

Warnings go to stderr and a one-paragraph summary to stdout. webdataset is imported only when writing, because
importing it pulls in torch.
"""

from __future__ import annotations

import io
import json
import os
import random
import re
import shutil
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from multiprocessing import Pool
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from gan_dist.errors import UserError
from gan_dist.files import sha256_file
from gan_dist.images import decode_image, npy_image
from gan_dist.shardformat import IMAGE_EXTS, build_manifest, index_file, member_bytes, shard_entry, tar_bytes, \
    write_index, write_manifest, write_shard
from gan_dist.shards import ShardError, open_shard, tar_samples

DEFAULT_MAX_COUNT = 1000
MB = 1_000_000
GRAY_MODES = ("L", "LA", "1", "I", "I;16", "F")
_SPLIT_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
_EXTS = "/".join(f".{e}" for e in IMAGE_EXTS)


class _Item(NamedTuple):
    rel: str  # path relative to the source folder, with "/"
    cls: int | None
    size: int  # tar bytes of the whole sample


class _Written(NamedTuple):
    shard: int
    num_samples: int
    shapes: Counter  # (height, width, channels) -> images
    skipped: list[str]
    sha256: str


class _Scanned(NamedTuple):
    name: str
    num_samples: int
    shapes: Counter
    classes: set[str]
    sha256: str


def make_shards(src: str | Path, out: str | Path, max_count: int | None = None, max_size_mb: float | None = None,
                workers: int | None = None, seed: int = 0, split: str = "train", progress: bool = False,
                npy: tuple[int, int] | None = None) -> dict:
    """Write the images under `src` as shards `{split}-NNNNN.tar` and manifest.json into `out`; returns the manifest.
    With `npy` = (resolution, channels), each image is stored decoded, resized and cropped as training reads it: a
    uint8 (resolution, resolution, channels) array (`npy` member), so a loader worker only copies bytes."""
    src, out = Path(src), Path(out)
    if max_count is None and max_size_mb is None:
        max_count = DEFAULT_MAX_COUNT
    _check_options(max_count, max_size_mb, split)
    _check_workers(workers)
    _check_out(out)
    rels, classes, ignored = _list_images(src)
    items = _shuffled_items(src, rels, classes, seed, npy)
    bounds = _plan(items, max_count, None if max_size_mb is None else int(max_size_mb * MB))

    import webdataset  # noqa: F401, PLC0415 - imported before the pool forks, so workers need not import torch again

    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    results: list[_Written] = []
    try:
        tmp.mkdir(parents=True)
        jobs = [(str(src), str(tmp), i, start, items[start:stop], npy) for i, (start, stop) in enumerate(bounds)]
        with tqdm(total=len(items), unit="img", disable=not progress) as bar:
            for result in _imap(_write_shard, jobs, workers):
                results.append(result)
                bar.update(len(jobs[result.shard][4]))
                for line in result.skipped:
                    bar.write(f"warning: skipped unreadable image {line}", file=sys.stderr)
        manifest = _finish(tmp, src, classes, split, results)
        os.rename(tmp, out)
    except OSError as err:
        raise UserError(f"cannot write shards to {out} ({err}); check that its parent folder is writable and has "
                        f"free space") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _print_summary(manifest, out, sum(len(r.skipped) for r in results), ignored)
    return manifest


def index_shards(folder: str | Path, workers: int | None = None, progress: bool = False) -> dict:
    """Write `folder/manifest.json` for the `*.tar` shards in `folder` (split `train`); returns the manifest."""
    folder = Path(folder)
    _check_workers(workers)
    if not folder.is_dir():
        raise UserError(f"shard folder {folder} does not exist; give --index the folder that holds the .tar shards")
    tars = sorted(folder.glob("*.tar"))
    if not tars:
        raise UserError(f"shard folder {folder} holds no .tar files; give --index the folder that holds the shards")
    results = []
    with tqdm(total=len(tars), unit="shard", disable=not progress) as bar:
        for result in _imap(_scan_shard, [str(t) for t in tars], workers):
            results.append(result)
            bar.update()
    results.sort()
    shapes = sum((r.shapes for r in results), Counter())
    if not shapes:
        raise UserError(f"the shards in {folder} hold no {_EXTS} images; index shards of images only")
    classes = _index_classes(set().union(*(r.classes for r in results)))
    shards = [shard_entry(r.name, r.num_samples, r.sha256) for r in results]
    manifest = _manifest(_dataset_name(folder), shapes, classes, {"train": shards})
    try:
        write_manifest(folder, manifest)
    except OSError as err:
        raise UserError(f"cannot write {folder / 'manifest.json'} ({err}); check that the folder is writable") from None
    total = manifest["splits"]["train"]["num_samples"]
    print(f"Indexed {total} samples in {len(shards)} shards in {folder}; {_describe(manifest)}; "
          f"wrote {folder / 'manifest.json'}.")
    return manifest


def _check_options(max_count: int | None, max_size_mb: float | None, split: str) -> None:
    if max_count is not None and max_count < 1:
        raise UserError(f"--max-count must be at least 1 sample per shard, got {max_count}")
    if max_size_mb is not None and not max_size_mb > 0:
        raise UserError(f"--max-size must be a positive number of MB per shard, got {max_size_mb}")
    if not _SPLIT_NAME.match(split):
        raise UserError(f"--split {split!r} is not a valid split name; use letters, digits, '_' and '-' only")


def _check_workers(workers: int | None) -> None:
    if workers is not None and workers < 1:
        raise UserError(f"--workers must be at least 1, got {workers}")


def _check_out(out: Path) -> None:
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise UserError(f"shard output {out} already exists and is not an empty folder; choose a new --out folder "
                        f"or delete {out} first")


def _image_ext(name: str) -> str | None:
    ext = name.rpartition(".")[2].lower() if "." in name else ""
    if ext not in IMAGE_EXTS:
        return None
    return "jpg" if ext == "jpeg" else ext


def _list_images(src: Path) -> tuple[list[str], list[str], int]:
    """Sorted relative image paths, the class names, and how many other files were ignored."""
    if not src.is_dir():
        raise UserError(f"image folder {src} does not exist; give --src the folder that holds the images")
    rels, ignored = [], 0
    # Links followed: class folders are often symlinks into a larger data set.
    for root, dirs, files in os.walk(src, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith(".")]  # .git, .ipynb_checkpoints: never a class
        for name in files:
            if _image_ext(name):
                rels.append(Path(root, name).relative_to(src).as_posix())
            else:
                ignored += 1
    if not rels:
        raise UserError(f"image folder {src} holds no {_EXTS} images, neither directly nor in class sub-folders")
    rels.sort()
    top = [r for r in rels if "/" not in r]
    nested = [r for r in rels if "/" in r]
    if top and nested:
        raise UserError(f"image folder {src} has images both directly in it ({top[0]}) and in sub-folders "
                        f"({nested[0]}); put all of them in class sub-folders, or all directly in {src}")
    return rels, sorted({r.split("/", 1)[0] for r in nested}), ignored


def _extras(rel: str, cls: int | None) -> dict[str, bytes]:
    extras = {"json": json.dumps({"path": rel}).encode()}
    if cls is not None:
        extras["cls"] = str(cls).encode("ascii")
    return extras


def _shuffled_items(src: Path, rels: list[str], classes: list[str], seed: int,
                    npy: tuple[int, int] | None) -> list[_Item]:
    index = {name: i for i, name in enumerate(classes)}
    items = []
    for rel in rels:
        cls = index[rel.split("/", 1)[0]] if classes else None
        try:
            size = len(as_npy(np.zeros((npy[0], npy[0], npy[1]), np.uint8))) if npy else os.stat(src / rel).st_size
        except OSError:
            size = 0  # a broken link: the writer reports it as unreadable and skips it
        extras = sum(member_bytes(len(data)) for data in _extras(rel, cls).values())
        items.append(_Item(rel, cls, member_bytes(size) + extras))
    random.Random(seed).shuffle(items)
    return items


def _plan(items: list[_Item], max_count: int | None, max_bytes: int | None) -> list[tuple[int, int]]:
    """Shard boundaries [start, stop): a shard closes when the next sample would break either limit."""
    bounds, start, used = [], 0, 0
    for i, item in enumerate(items):
        full = max_count is not None and i - start >= max_count
        too_big = max_bytes is not None and tar_bytes(used + item.size) > max_bytes
        if i > start and (full or too_big):
            bounds.append((start, i))
            start, used = i, 0
        used += item.size
    bounds.append((start, len(items)))
    return bounds


def _check_image(data: bytes) -> tuple[int, int, int]:
    """(height, width, channels) of an image that decodes completely; raises whatever PIL raises otherwise."""
    with Image.open(io.BytesIO(data)) as img:
        img.verify()
    # verify() checks PNG checksums but decodes nothing, so a truncated JPEG passes it; load() does not.
    with Image.open(io.BytesIO(data)) as img:
        shape = (img.height, img.width, 1 if img.mode in GRAY_MODES else 3)
        img.load()
    return shape


def as_npy(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, array, allow_pickle=False)
    return out.getvalue()


def _write_shard(job: tuple[str, str, int, int, list[_Item], tuple[int, int] | None]) -> _Written:
    src, tmp, shard, first, items, npy = job
    shapes, skipped = Counter(), []

    def samples() -> Iterator[dict]:
        for key, item in enumerate(items, first):
            try:
                data = Path(src, item.rel).read_bytes()
                shape = _check_image(data)
                if npy:
                    ext = _image_ext(item.rel)
                    data, shape = as_npy(decode_image({ext: data}, *npy)), (npy[0], npy[0], npy[1])
                shapes[shape] += 1
            # PIL's decoders raise assorted types on corrupt data (OSError, SyntaxError, struct.error, bomb errors...).
            except Exception as err:  # noqa: BLE001
                skipped.append(f"{Path(src, item.rel)} ({_reason(err)})")
                continue
            member = "npy" if npy else _image_ext(item.rel)
            yield {"__key__": f"{key:08d}", member: data, **_extras(item.rel, item.cls)}

    count, digest = write_shard(Path(tmp, f"{shard:05d}.part"), samples())
    return _Written(shard, count, shapes, skipped, digest)


def _scan_shard(url: str) -> _Scanned:
    shapes, classes, count = Counter(), set(), 0
    try:
        with open_shard(url) as stream:
            for sample in tar_samples(stream, url):
                count += 1
                if "cls" in sample:
                    classes.add(sample["cls"].decode("utf-8", "replace").strip())
                ext = next((e for e in ("npy", *IMAGE_EXTS) if e in sample), None)
                if ext is not None:
                    shapes[_header_shape(sample[ext], url, sample["__key__"], ext)] += 1
    except ShardError as err:
        # Raised as UserError here: ShardError's constructor does not survive the pickling back to the parent.
        raise UserError(f"{err}; re-write this shard or remove it from the folder, then index again") from None
    write_index(Path(url))
    return _Scanned(Path(url).name, count, shapes, classes, sha256_file(Path(url)))


def _header_shape(data: bytes, url: str, key: str, ext: str) -> tuple[int, int, int]:
    try:
        if ext == "npy":
            return npy_image(data).shape
        with Image.open(io.BytesIO(data)) as img:  # parses the header only
            return img.height, img.width, 1 if img.mode in GRAY_MODES else 3
    except Exception as err:  # noqa: BLE001 - as in _write_shard
        raise UserError(f"shard {url}: sample '{key}' holds an unreadable image ({_reason(err)}); re-write this "
                        f"shard or remove it from the folder, then index again") from None


def _reason(err: Exception) -> str:
    # PIL's own message names an anonymous BytesIO object; the caller names the file.
    if isinstance(err, UnidentifiedImageError):
        return "not an image PIL can identify"
    return f"{type(err).__name__}: {err}"


def _index_classes(values: set[str]) -> list[str]:
    # The trainer takes int(cls) as the label, so integer classes are listed as 0..max: a class's position in the
    # list is its label, and num_classes covers every label even when some are absent from these shards.
    if values and all(v.isascii() and v.isdecimal() for v in values):
        return [str(i) for i in range(max(map(int, values)) + 1)]
    return sorted(values)


def _imap(fn: Callable, jobs: list, workers: int | None) -> Iterator:
    """`fn` over `jobs` in worker processes, results as they finish."""
    with Pool(min(workers or min(8, os.cpu_count() or 1), len(jobs))) as pool:
        yield from pool.imap_unordered(fn, jobs)


def _finish(tmp: Path, src: Path, classes: list[str], split: str, results: list[_Written]) -> dict:
    """Name the non-empty shards in order (a shard of only unreadable images is dropped) and write the manifest."""
    kept = [r for r in sorted(results) if r.num_samples]
    if not kept:
        raise UserError(f"no image in {src} could be read (see the warnings above); nothing was written")
    shards = []
    for i, r in enumerate(kept):
        name = f"{split}-{i:05d}.tar"
        os.rename(tmp / f"{r.shard:05d}.part", tmp / name)
        os.rename(index_file(tmp / f"{r.shard:05d}.part"), index_file(tmp / name))
        shards.append(shard_entry(name, r.num_samples, r.sha256))
    for r in results:
        if not r.num_samples:
            Path(tmp, f"{r.shard:05d}.part").unlink()
            index_file(Path(tmp, f"{r.shard:05d}.part")).unlink(missing_ok=True)
    manifest = _manifest(_dataset_name(src), sum((r.shapes for r in kept), Counter()), classes, {split: shards})
    write_manifest(tmp, manifest)
    return manifest


def _dataset_name(folder: Path) -> str:
    return folder.resolve().name


def _manifest(dataset: str, shapes: Counter, classes: list[str], splits: dict[str, list[dict]]) -> dict:
    (height, width, channels), _ = max(shapes.items(), key=lambda kv: (kv[1], kv[0]))  # ties: deterministically
    image = {"height": height, "width": width, "channels": channels, "uniform": len(shapes) == 1}
    return build_manifest(dataset, image, splits, len(classes), classes)


def _describe(manifest: dict) -> str:
    classes, image = manifest["classes"], manifest["image"]
    names = ", ".join(classes[:5]) + (", ..." if len(classes) > 5 else "")
    kinds = f"{len(classes)} classes ({names})" if classes else "no classes"
    size = f"{image['height']}x{image['width']}x{image['channels']}"
    return f"{kinds}; images {size}" + ("" if image["uniform"] else " (the most common size; not all images share it)")


def _print_summary(manifest: dict, out: Path, skipped: int, ignored: int) -> None:
    (split, info), = manifest["splits"].items()
    print(f"Wrote {info['num_samples']} images from {manifest['dataset']} as {len(info['shards'])} {split} shards "
          f"to {out}; {_describe(manifest)}; skipped {skipped} unreadable image{'s' * (skipped != 1)}; ignored "
          f"{ignored} other file{'s' * (ignored != 1)} (not {_EXTS}).")
