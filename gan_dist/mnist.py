"""MNIST's four IDX files on disk: reading them (`read_idx`, `load_mnist`, `files_present`) and downloading them
(`download_mnist`).

Training streams MNIST from the shards `mnist_shards.py` converts these files to; the files themselves are read
where all of MNIST is wanted at once (the device cache, evaluation, rejection sampling, the classifier). Plain
Python and numpy.
"""

from __future__ import annotations

import gzip
import http.client
import os
import shutil
import struct
import urllib.request
import zlib
from pathlib import Path

import numpy as np

from gan_dist.errors import UserError

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
SIZE = 28  # images are SIZE x SIZE

_FIX_SOURCE = (
    "set data.mnist_dir=DIR (or --src DIR) to a folder with the four MNIST files, "
    "or run online so they can be downloaded"
)
_FIX_CORRUPT = "re-download it or point data.mnist_dir at the original files"


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
    if ndim == 3 and dims[1:] != (SIZE, SIZE):
        raise UserError(
            f"{path} holds {dims[1]}x{dims[2]} images, MNIST images are {SIZE}x{SIZE}; {_FIX_CORRUPT}"
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
