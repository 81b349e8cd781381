"""Tests for gan_dist.images: decoding one sample to the training resolution with PIL.

Covers: shorter-side resize then centre crop (what is kept of a wide and a tall image), grayscale and RGB output
from any PIL mode (palette, RGBA, L), JPEG and WebP members, flips, labels from `cls`, and BadImage for a sample
without an image or with broken bytes (never an unpickled member).
"""

from __future__ import annotations

import io
import pickle

import numpy as np
import pytest
from PIL import Image

from gan_dist.images import BadImage, decode_image, sample_label


def encode(img: Image.Image, fmt: str = "PNG") -> bytes:
    out = io.BytesIO()
    img.save(out, format=fmt)
    return out.getvalue()


def bands(width: int, height: int) -> Image.Image:
    """Three vertical bands: red | green | blue, the middle one half the width."""
    a = np.zeros((height, width, 3), np.uint8)
    a[:, : width // 4, 0] = 255
    a[:, width // 4: 3 * width // 4, 1] = 255
    a[:, 3 * width // 4:, 2] = 255
    return Image.fromarray(a)


def test_wide_image_is_resized_on_its_short_side_and_centre_cropped():
    out = decode_image({"png": encode(bands(80, 40))}, 16, 3)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    # The 40x40 centre of the 80x40 image is all green band.
    assert (out[:, :, 1] > 200).all() and (out[:, :, 0] < 50).all() and (out[:, :, 2] < 50).all()


def test_tall_image_keeps_its_middle_rows():
    a = np.zeros((60, 20), np.uint8)
    a[20:40] = 255  # only the middle third is white
    out = decode_image({"png": encode(Image.fromarray(a))}, 20, 1)
    assert out.shape == (20, 20, 1) and (out > 250).all()


@pytest.mark.parametrize("mode", ["P", "RGBA", "L", "LA", "I;16"])
def test_any_pil_mode_becomes_grayscale_or_rgb(mode):
    img = bands(32, 32).convert(mode) if mode != "I;16" else Image.new("I;16", (32, 32), 1000)
    for channels in (1, 3):
        out = decode_image({"png": encode(img)}, 32, channels)
        assert out.shape == (32, 32, channels)


@pytest.mark.parametrize("fmt, ext", [("JPEG", "jpg"), ("JPEG", "jpeg"), ("WEBP", "webp")])
def test_jpeg_and_webp_members_decode_close_to_the_source(fmt, ext):
    out = decode_image({ext: encode(bands(256, 256), fmt)}, 64, 3).astype(int)
    assert out.shape == (64, 64, 3)
    # Left quarter red, middle green, right quarter blue, up to compression error at the edges.
    assert out[:, 2:14, 0].mean() > 200 and out[:, 20:44, 1].mean() > 200 and out[:, 50:62, 2].mean() > 200


def test_flip_mirrors_left_and_right():
    sample = {"png": encode(bands(32, 32))}
    plain, flipped = decode_image(sample, 32, 3), decode_image(sample, 32, 3, flip=True)
    assert np.array_equal(flipped, plain[:, ::-1])
    assert flipped[0, 0, 2] == 255 and plain[0, 0, 0] == 255


def test_labels_come_from_cls_or_are_minus_one():
    assert sample_label({"cls": b"7"}) == 7
    assert sample_label({"cls": b" 12\n"}) == 12
    assert sample_label({}) == -1 and sample_label({"cls": b"cat"}) == -1


def test_samples_without_a_readable_image_raise_bad_image():
    with pytest.raises(BadImage, match="no image member .*has cls, pyd"):
        decode_image({"__key__": "k", "cls": b"1", "pyd": pickle.dumps(object())}, 8, 1)
    with pytest.raises(BadImage, match="unreadable png"):
        decode_image({"png": b"\x89PNG\r\n\x1a\n broken"}, 8, 1)
    with pytest.raises(BadImage, match="unreadable jpg"):
        decode_image({"jpg": encode(bands(64, 64), "JPEG")[:200]}, 8, 3)
