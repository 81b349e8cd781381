"""MNIST on disk: reading the IDX files, downloading them, and converting them to webdataset tar shards.

The trainer never reads IDX files directly. It streams the shards written here, described by a
`manifest.json` (format `gan-dist-shards/1`) that lists every shard with its sample count and sha256.
`ensure_shards` is the one entry point a run needs: it reuses a finished shard folder, or builds one from
the four MNIST files (downloading them first when allowed).

This module is plain Python, numpy and PIL. webdataset is imported only inside `write_shards`, because
importing it pulls in torch and torch.distributed, which tools that only read or check data don't need.
"""

from __future__ import annotations

import gzip
import http.client
import json
import os
import re
import shutil
import struct
import tarfile
import urllib.request
import zlib
from pathlib import Path

import numpy as np

from gan_dist.errors import UserError
from gan_dist.files import sha256_file
from gan_dist.shards import MANIFEST_FORMAT

FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

# Tried in order. A module-level list so tests can point it at an unreachable address.
MIRRORS = [
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
]

_IMAGES_MAGIC = 0x00000803
_LABELS_MAGIC = 0x00000801
_SIZE = 28
# 120 training shards: enough for data.mode=epoch on up to 120 ranks x loader workers.
SHARD_SIZE = 500

_FIX_SOURCE = (
    "set data.mnist_dir=DIR (or --src DIR) to a folder with the four MNIST files, "
    "or run online so they can be downloaded"
)
_FIX_CORRUPT = "re-download it or point data.mnist_dir at the original files"

# Anything else in an existing output folder means it is not ours to delete.
_SHARD_NAME = re.compile(r"^(train|test)-\d{5,}\.tar$")


def read_idx(path: str | Path) -> np.ndarray:
    """Read an MNIST IDX file (gzip or raw): uint8 images (N, 28, 28) or uint8 labels (N,)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"MNIST file {path} does not exist; {_FIX_SOURCE}") from None
    except OSError as e:
        raise UserError(f"cannot read MNIST file {path} ({e.strerror or e}); {_FIX_SOURCE}") from None

    # By magic bytes, not by name: people gunzip files and keep the name, or the other way round.
    if raw[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(raw)
        except (EOFError, OSError, zlib.error) as e:
            raise UserError(f"{path} is a truncated or corrupt gzip file ({e}); {_FIX_CORRUPT}") from None
    else:
        data = raw
    del raw

    if len(data) < 4:
        raise UserError(f"{path} is too short to be an MNIST IDX file ({len(data)} bytes); {_FIX_CORRUPT}")
    (magic,) = struct.unpack(">I", data[:4])
    if magic == _IMAGES_MAGIC:
        ndim = 3
    elif magic == _LABELS_MAGIC:
        ndim = 1
    else:
        raise UserError(f"{path} is not an MNIST IDX file (bad magic 0x{magic:08x}); {_FIX_CORRUPT}")

    header = 4 + 4 * ndim
    if len(data) < header:
        raise UserError(f"{path} is truncated inside its IDX header; {_FIX_CORRUPT}")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    if ndim == 3 and dims[1:] != (_SIZE, _SIZE):
        raise UserError(
            f"{path} holds {dims[1]}x{dims[2]} images, MNIST images are {_SIZE}x{_SIZE}; {_FIX_CORRUPT}"
        )
    expected = int(np.prod(dims, dtype=np.int64))
    payload = len(data) - header
    if payload < expected:
        raise UserError(
            f"{path} is truncated: its header promises {expected} bytes of data but only {payload} follow; "
            f"{_FIX_CORRUPT}"
        )
    if payload > expected:
        raise UserError(
            f"{path} has {payload - expected} bytes more than its header describes (not an intact IDX file); "
            f"{_FIX_CORRUPT}"
        )
    # Copy so callers get a normal writable array, not a read-only view of the bytes.
    return np.frombuffer(data, dtype=np.uint8, count=expected, offset=header).reshape(dims).copy()


def _find(src: Path, name: str) -> Path | None:
    for candidate in (src / f"{name}.gz", src / name):
        if candidate.is_file():
            return candidate
    return None


def _missing_files(src: Path) -> list[str]:
    return [name for pair in FILES.values() for name in pair if _find(src, name) is None]


def files_present(src: str | Path) -> bool:
    """Whether `src` holds all four MNIST files (each as NAME.gz or NAME)."""
    return Path(src).is_dir() and not _missing_files(Path(src))


def load_mnist(src: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Read the four MNIST files from `src` (each as NAME.gz or NAME): {"train": (images, labels), "test": ...}."""
    src = Path(src)
    if not src.is_dir():
        raise UserError(f"MNIST folder {src} does not exist; {_FIX_SOURCE}")
    missing = _missing_files(src)
    if missing:
        names = ", ".join(f"{m}[.gz]" for m in missing)
        raise UserError(f"MNIST folder {src} is missing {names}; {_FIX_SOURCE}")

    out = {}
    for split, (images_name, labels_name) in FILES.items():
        images_path, labels_path = _find(src, images_name), _find(src, labels_name)
        images, labels = read_idx(images_path), read_idx(labels_path)
        # A swapped or renamed file parses fine but would silently train on garbage.
        if images.ndim != 3:
            raise UserError(f"{images_path} holds labels, not images; {_FIX_CORRUPT}")
        if labels.ndim != 1:
            raise UserError(f"{labels_path} holds images, not labels; {_FIX_CORRUPT}")
        if len(images) != len(labels):
            raise UserError(
                f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels; "
                f"the pair must come from the same MNIST split, {_FIX_CORRUPT}"
            )
        if len(images) == 0:
            raise UserError(f"{images_path} holds no images; {_FIX_CORRUPT}")
        if int(labels.max()) > 9:
            raise UserError(f"{labels_path} has label {int(labels.max())}, MNIST labels are 0..9; {_FIX_CORRUPT}")
        out[split] = (images, labels)
    return out


def download_mnist(dest: str | Path, timeout: float = 20.0) -> Path:
    """Download the four MNIST .gz files into `dest` (skipping valid ones already there); returns `dest`."""
    dest = Path(dest)
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create MNIST download folder {dest} ({e.strerror or e}); {_FIX_SOURCE}") from None

    for name in (n for pair in FILES.values() for n in pair):
        existing = _find(dest, name)
        if existing is not None:
            try:
                read_idx(existing)
                continue
            except UserError:
                pass  # a broken leftover: fetch a fresh copy, which load_mnist prefers as NAME.gz

        target = dest / f"{name}.gz"
        # Per process, so concurrent downloaders never write into each other's temp file.
        part = dest / f".{name}.gz.part-{os.getpid()}"
        last_error = "no mirrors configured"
        for mirror in MIRRORS:
            url = f"{mirror}{name}.gz"
            try:
                with urllib.request.urlopen(url, timeout=timeout) as response, open(part, "wb") as f:
                    shutil.copyfileobj(response, f)
                # A captive portal or error page can arrive with status 200.
                read_idx(part)
                os.replace(part, target)
                break
            except (OSError, http.client.HTTPException, ValueError, UserError) as e:
                last_error = f"{url}: {e}"
            finally:
                part.unlink(missing_ok=True)
        else:
            raise UserError(
                f"downloading MNIST file {name}.gz into {dest} failed from every mirror (last error: {last_error}); "
                f"without internet access, set data.mnist_dir=DIR (or --src DIR) to a local folder with the "
                f"four MNIST files"
            )
    return dest


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _encode_png(image: np.ndarray) -> bytes:
    # Hand-built rather than PIL's encoder: about 10x faster on 28x28 images, and the bytes depend only on
    # zlib (no encoder options, metadata or Pillow version), which keeps shard checksums reproducible.
    height, width = image.shape
    rows = np.zeros((height, width + 1), dtype=np.uint8)  # filter byte 0 ("none") before each row
    rows[:, 1:] = image
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale, no interlace
    return (
        _PNG_SIGNATURE
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(rows.tobytes(), 6))
        + _png_chunk(b"IEND", b"")
    )


def _check_output_dir(out: Path) -> None:
    if not out.exists():
        return
    if not out.is_dir():
        raise UserError(f"shard output {out} exists and is not a folder; choose another output folder")
    if (out / "manifest.json").exists():
        try:
            complete = read_manifest(out) is not None
        except UserError:
            complete = False  # a broken cache of ours: exactly the case that gets rebuilt in place
        if complete:
            raise UserError(
                f"shard folder {out} already exists with a manifest.json; use it as is, "
                f"or delete it to rebuild, or choose another output folder"
            )
    foreign = [p.name for p in out.iterdir() if p.name != "manifest.json" and not _SHARD_NAME.match(p.name)]
    if foreign:
        raise UserError(
            f"shard output {out} is not empty and holds files that are not shards ({', '.join(sorted(foreign)[:3])}); "
            f"choose an empty or new output folder"
        )


def write_shards(src: str | Path, out: str | Path, shard_size: int = SHARD_SIZE, *, progress: bool = False) -> dict:
    """Write MNIST from `src` as webdataset shards plus manifest.json into `out`, atomically; returns the manifest."""
    src, out = Path(src), Path(out)
    if not isinstance(shard_size, int) or shard_size < 1:
        raise UserError(f"shard size must be a positive integer, got {shard_size!r}")
    _check_output_dir(out)
    data = load_mnist(src)

    import webdataset  # noqa: PLC0415 - see the module docstring

    tmp = out.parent / f"{out.name}.tmp-{os.getpid()}"
    bar = None
    if progress:
        from tqdm import tqdm  # noqa: PLC0415 - only needed for interactive use

        bar = tqdm(total=sum(len(labels) for _, labels in data.values()), unit="img", desc=f"sharding {out.name}")
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        splits = {}
        for split, (images, labels) in data.items():
            shards = []
            for index, start in enumerate(range(0, len(labels), shard_size)):
                stop = min(start + shard_size, len(labels))
                name = f"{split}-{index:05d}.tar"
                with open(tmp / name, "wb") as f:
                    # Fixed mtime (and the fixed default owner/mode) so the same input gives the same tar bytes.
                    with webdataset.TarWriter(f, encoder=False, compress=False, mtime=0) as writer:
                        # Plain ustar headers: a third faster than pax and the names need nothing more.
                        # (TarWriter's own `format` argument is not passed on to tarfile in webdataset 1.0.)
                        writer.tarstream.format = tarfile.USTAR_FORMAT
                        for i in range(start, stop):
                            writer.write(
                                {
                                    "__key__": f"{split}_{i:05d}",
                                    "png": _encode_png(images[i]),
                                    "cls": str(int(labels[i])).encode("ascii"),
                                }
                            )
                shards.append({"name": name, "num_samples": stop - start, "sha256": sha256_file(tmp / name)})
                if bar is not None:
                    bar.update(stop - start)
            splits[split] = {"num_samples": int(len(labels)), "shards": shards}

        manifest = {
            "format": MANIFEST_FORMAT,
            "dataset": "mnist",
            "image": {"height": _SIZE, "width": _SIZE, "channels": 1},
            "num_classes": 10,
            "splits": splits,
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")

        if out.exists():
            # Only an empty folder or a broken cache of ours gets here (see _check_output_dir).
            old = out.parent / f"{out.name}.old-{os.getpid()}"
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                os.rename(tmp, out)
            except OSError:
                # Another process finished the same conversion first; its shards are byte-identical to ours.
                existing = read_manifest(out)
                if existing is None:
                    raise
                return existing
        return manifest
    except OSError as e:
        raise UserError(
            f"cannot write shards to {out} ({e}); check the folder is writable and has free space"
        ) from None
    finally:
        if bar is not None:
            bar.close()
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def read_manifest(out: str | Path) -> dict | None:
    """The manifest of the shard folder `out`, or None if it has none; UserError if it is broken."""
    out = Path(out)
    path = out / "manifest.json"
    if not path.is_file():
        return None
    fix = f"delete {out} so it is rebuilt"
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"shard folder {out} has an unreadable manifest.json ({e}); {fix}") from None
    try:
        if manifest["format"] != MANIFEST_FORMAT:
            raise UserError(
                f"shard folder {out} has manifest format {manifest['format']!r}, expected {MANIFEST_FORMAT!r}; {fix}"
            )
        names = [shard["name"] for split in manifest["splits"].values() for shard in split["shards"]]
    except (KeyError, TypeError, AttributeError):
        raise UserError(f"shard folder {out} has a malformed manifest.json; {fix}") from None

    missing = []
    for name in names:
        # A name with a path in it would point outside the folder.
        if not isinstance(name, str) or Path(name).name != name:
            raise UserError(f"shard folder {out} has a malformed manifest.json (shard name {name!r}); {fix}")
        shard = out / name
        if not shard.is_file() or shard.stat().st_size == 0:
            missing.append(name)
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise UserError(
            f"shard folder {out} is incomplete: {', '.join(missing[:3])}{more} missing or empty; {fix}"
        )
    return manifest


def ensure_shards(mnist_dir: str | Path, cache_dir: str | Path, download: bool = True) -> dict:
    """The manifest of the shards in `cache_dir`, building them from `mnist_dir` (downloading first) if needed."""
    manifest = read_manifest(cache_dir)
    if manifest is not None:
        if manifest.get("dataset") != "mnist":
            raise UserError(
                f"shard folder {cache_dir} holds {manifest.get('dataset')!r}, not MNIST; "
                f"point the cache at another folder or delete it so it is rebuilt"
            )
        return manifest
    if download and _missing_files(Path(mnist_dir)):
        download_mnist(mnist_dir)
    return write_shards(mnist_dir, cache_dir)
