"""Tests for gan_dist.images: decoding one sample to the training resolution with PIL.

Covers: shorter-side resize then centre crop (what is kept of a wide and a tall image), grayscale and RGB output
from any PIL mode (palette, RGBA, L), JPEG and WebP members, flips, labels from `cls`, and BadSample for a sample
without an image or with broken bytes (never an unpickled member), with bytes of another format than its extension
(EPS and PDF included), with more pixels than the bound, or with a label that is not a small non-negative integer.
"""

from __future__ import annotations

import io
import pickle

import numpy as np
import pytest
from PIL import Image

from gan_dist.images import MAX_LABEL, BadSample, decode_image, pixel_bound, sample_label


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
    assert sample_label({"cls": str(MAX_LABEL).encode()}) == MAX_LABEL
    assert sample_label({}) == -1


@pytest.mark.parametrize("cls", [b"cat", b"-3", b"99999999999999999999999", b"1e3", b"7.5", b"", b"\xff\xfe",
                                 b"1 2", "\u0663".encode()])  # an Arabic-Indic 3: a digit to Python, not to us
def test_labels_that_are_not_small_non_negative_integers_are_bad_samples(cls):
    with pytest.raises(BadSample, match="is not a class index from 0 to"):
        sample_label({"cls": cls})


def test_image_bytes_are_decoded_only_as_the_format_their_extension_names():
    png, jpeg = encode(bands(16, 16)), encode(bands(16, 16), "JPEG")
    assert decode_image({"png": png}, 16, 3).shape == (16, 16, 3)
    for sample in ({"png": jpeg}, {"jpg": png}, {"webp": png}, {"png": encode(bands(16, 16), "GIF")},
                   {"png": encode(bands(16, 16), "BMP")}, {"png": b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n"},
                   {"jpg": b"%PDF-1.4\n1 0 obj\n"}):
        with pytest.raises(BadSample, match="unreadable"):
            decode_image(sample, 16, 3)


def test_images_over_the_pixel_bound_are_refused_before_decoding():
    assert pixel_bound(28) == 4096 * 4096 and pixel_bound(256) == 1024 * 256 * 256
    # A PNG header claiming 20000 x 20000 pixels (400 Mpx, past PIL's own bomb limit) and a bomb under that limit:
    # neither is decoded.
    huge = io.BytesIO()
    Image.new("L", (1, 1)).save(huge, format="PNG")
    header = bytearray(huge.getvalue())
    header[16:24] = (20000).to_bytes(4, "big") * 2
    with pytest.raises(BadSample, match="unreadable png|over the bound"):
        decode_image({"png": bytes(header)}, 28, 1)
    big = encode(Image.new("L", (5000, 4000)))  # 20 Mpx of zeros: tiny as PNG, 20 MB decoded
    with pytest.raises(BadSample, match="5000x4000 pixels is over the bound of 16777216 pixels for resolution 28"):
        decode_image({"png": big}, 28, 1)
    assert decode_image({"png": big}, 256, 1).shape == (256, 256, 1)


def test_a_sample_marked_by_the_reader_is_bad():
    with pytest.raises(BadSample, match="over the cap"):
        decode_image({"__error__": "member k.png has 10 bytes, over the cap of 5", "png": b""}, 8, 1)


def test_samples_without_a_readable_image_raise_bad_image():
    with pytest.raises(BadSample, match="no image member .*has cls, pyd"):
        decode_image({"__key__": "k", "cls": b"1", "pyd": pickle.dumps(object())}, 8, 1)
    with pytest.raises(BadSample, match="unreadable png"):
        decode_image({"png": b"\x89PNG\r\n\x1a\n broken"}, 8, 1)
    with pytest.raises(BadSample, match="unreadable jpg"):
        decode_image({"jpg": encode(bands(64, 64), "JPEG")[:200]}, 8, 3)


def npy(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, array, allow_pickle=True)
    return out.getvalue()


def test_npy_members_are_read_as_the_array_they_hold():
    array = np.random.default_rng(0).integers(0, 256, (6, 6, 3), dtype=np.uint8)
    assert np.array_equal(decode_image({"npy": npy(array)}, 6, 3), array)
    assert np.array_equal(decode_image({"npy": npy(array)}, 6, 3, flip=True), array[:, ::-1])


@pytest.mark.parametrize("data, message", [
    (npy(np.zeros((6, 6, 3), np.float32)), "not a uint8"),
    (npy(np.array([{"a": 1}], dtype=object)), "not a uint8"),  # a pickle inside: never loaded
    (npy(np.zeros((6, 6, 3), np.uint8))[:-5], "not a uint8"),  # fewer bytes than the header's shape needs
    (npy(np.zeros((6, 6, 3), np.uint8)).replace(b"(6, 6, 3)", b"(9, 9, 3)"), "not a uint8"),
    (npy(np.zeros((4, 4, 3), np.uint8)), "this run needs (6, 6, 3)"),
    (b"\x93NUMPY\x01\x00\xff\x00{'descr': os.system('x')}", "unreadable npy"),
    (b"not npy at all", "unreadable npy"),
])
def test_npy_members_that_are_not_a_uint8_image_of_the_run_are_bad_samples(data, message):
    with pytest.raises(BadSample, match=message.replace("(", r"\(").replace(")", r"\)")):
        decode_image({"npy": data}, 6, 3)
