"""Decoding one sample's image bytes and label to training inputs, with PIL alone (plain numpy out, no torch).

Pre-decoded images (`npy`, written by `make_shards.py --format npy`) are read as `numpy.load(allow_pickle=False)`
reads them, NumPy's header reader and then the raw bytes, with the header parsed once per shape: uint8, (H, W, C),
exactly as many bytes as that shape needs, already at the run's resolution. Other image members (`png`, `jpg`,
`jpeg`, `webp`) are decoded, each only as the format its extension names (bytes of any other format, EPS or PDF
included, are refused rather than handed to PIL's other decoders); other members such as `.pyd` or `.pickle` are
never unpickled. An image is refused before decoding when it has more pixels than `pixel_bound(resolution)` (a
decompression bomb); PIL's own bomb warning is an error here. It is converted to grayscale or RGB, its shorter side
resized to the target resolution, and the centre cropped square. A label is the `cls` member as a small
non-negative integer.
"""

from __future__ import annotations

import functools
import io
import math
import re
import warnings

import numpy as np
from PIL import Image

from gan_dist.shardformat import IMAGE_EXTS

FORMATS = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP"}
MAX_LABEL = 999_999
_LABEL = re.compile(rb"\s*(\d{1,6})\s*")


class BadSample(Exception):
    """A sample without a readable image, or with an invalid label."""


def pixel_bound(resolution: int) -> int:
    """The most pixels a source image may have: 32x the target side each way, and never under 4096 x 4096."""
    return max(1024 * resolution * resolution, 4096 * 4096)


@functools.lru_cache(maxsize=64)
def _npy_header(header: bytes) -> tuple[tuple[int, ...], bool, np.dtype]:
    # Every image of a shard has the same header, so NumPy's parser (ast.literal_eval) runs once per shape.
    f = io.BytesIO(header)
    version = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    return read(f, max_header_size=1024)


def npy_image(data: bytes) -> np.ndarray:
    """A pre-decoded image (`npy` member: a uint8 (H, W, C) array in NumPy's format) as a read-only view of the
    bytes. The header is checked before anything is read: NumPy's own header reader, never a pickle, and exactly as
    many bytes as the shape needs; BadSample otherwise."""
    two = data[6:7] != b"\x01"  # format 2.0 and 3.0 have a 4-byte header length
    start = (12 + int.from_bytes(data[8:12], "little")) if two else (10 + int.from_bytes(data[8:10], "little"))
    try:
        shape, fortran, dtype = _npy_header(data[:start])
    except (ValueError, OSError, SyntaxError) as err:
        raise BadSample(f"unreadable npy ({err})") from None
    if dtype != np.uint8 or fortran or len(shape) != 3 or shape[2] not in (1, 3) or \
            len(data) - start != math.prod(shape):
        raise BadSample(f"npy holds a {'Fortran-order ' if fortran else ''}{dtype} array of shape {shape} in "
                        f"{len(data)} bytes, not a uint8 (H, W, 1 or 3) image")
    return np.frombuffer(data, np.uint8, offset=start).reshape(shape)


def _decode_npy(data: bytes, resolution: int, channels: int, flip: bool) -> np.ndarray:
    array = npy_image(data)
    if array.shape != (resolution, resolution, channels):
        raise BadSample(f"npy of shape {array.shape}, this run needs ({resolution}, {resolution}, {channels}); "
                        f"write the shards with make_shards.py --format npy --resolution {resolution} --channels "
                        f"{channels}")
    return array[:, ::-1] if flip else array


def decode_image(sample: dict, resolution: int, channels: int, flip: bool = False) -> np.ndarray:
    """The sample's image as uint8 (resolution, resolution, channels); BadSample when it has none or it is broken."""
    if "__error__" in sample:
        raise BadSample(sample["__error__"])
    if "npy" in sample:
        return _decode_npy(sample["npy"], resolution, channels, flip)
    ext = next((e for e in IMAGE_EXTS if e in sample), None)
    if ext is None:
        raise BadSample(f"no image member (has {', '.join(k for k in sample if not k.startswith('__')) or 'none'})")
    mode = "L" if channels == 1 else "RGB"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(sample[ext]), formats=[FORMATS[ext]]) as img:
                if img.width * img.height > pixel_bound(resolution):
                    raise BadSample(f"{ext} of {img.width}x{img.height} pixels is over the bound of "
                                    f"{pixel_bound(resolution)} pixels for resolution {resolution}")
                # JPEG can decode at 1/2, 1/4 or 1/8 scale for a fraction of the cost of a full decode.
                img.draft(mode, (resolution, resolution))
                img = img.convert(mode)
                w, h = img.size
                if (w, h) != (resolution, resolution):
                    scale = resolution / min(w, h)
                    size = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
                    img = img.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
                    left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
                    img = img.crop((left, top, left + resolution, top + resolution))
                if flip:
                    img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
                array = np.asarray(img, dtype=np.uint8)
    except (OSError, SyntaxError, ValueError, MemoryError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as err:
        raise BadSample(f"unreadable {ext} ({err})") from None
    return array[:, :, None] if array.ndim == 2 else array


def sample_label(sample: dict) -> int:
    """The sample's class from its `cls` member, or -1 when it has none; BadSample when `cls` is not an integer
    from 0 to MAX_LABEL."""
    if "cls" not in sample:
        return -1
    match = _LABEL.fullmatch(sample["cls"])
    if match is None:
        raise BadSample(f"cls {sample['cls'][:40]!r} is not a class index from 0 to {MAX_LABEL}")
    return int(match.group(1))
