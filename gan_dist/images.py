"""Decoding one sample's image bytes to the training resolution, with PIL alone (plain numpy out, no torch).

Only image members (`png`, `jpg`, `jpeg`, `webp`) are ever decoded; other members such as `.pyd` or `.pickle` are
never unpickled. An image is converted to grayscale or RGB, its shorter side resized to the target resolution, and
the centre cropped square.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from gan_dist.shards import IMAGE_EXTS


class BadImage(Exception):
    """A sample without a readable image."""


def decode_image(sample: dict, resolution: int, channels: int, flip: bool = False) -> np.ndarray:
    """The sample's image as uint8 (resolution, resolution, channels); BadImage when it has none or it is broken."""
    ext = next((e for e in IMAGE_EXTS if e in sample), None)
    if ext is None:
        raise BadImage(f"no image member (has {', '.join(k for k in sample if not k.startswith('__')) or 'none'})")
    mode = "L" if channels == 1 else "RGB"
    try:
        with Image.open(io.BytesIO(sample[ext])) as img:
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
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise BadImage(f"unreadable {ext} ({err})") from None
    return array[:, :, None] if array.ndim == 2 else array


def sample_label(sample: dict) -> int:
    """The sample's class from its `cls` member, or -1 when it has none."""
    try:
        return int(sample["cls"])
    except (KeyError, ValueError):
        return -1
