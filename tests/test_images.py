"""Resizing, decoding and validation of single images."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from data_tools.images import ImageOptions, process_image
from data_tools.sample import BadSample, Reason
from tests.conftest import image_bytes


def _decode(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("keep_ratio", (48, 32)),
        ("center_crop", (32, 32)),
        ("border", (32, 32)),
        ("none", (120, 80)),
    ],
)
def test_resize_modes(mode, expected):
    data, meta = process_image(image_bytes(120, 80), ImageOptions(size=32, resize_mode=mode))
    assert _decode(data).size == expected == (meta["width"], meta["height"])
    assert (meta["original_width"], meta["original_height"]) == (120, 80)


def test_border_pads_with_black_and_upscales_small_images():
    data, _ = process_image(
        Image.new("RGB", (20, 10), "white"),
        ImageOptions(size=40, resize_mode="border", format="png"),
    )
    pixels = np.asarray(_decode(data))
    assert pixels.shape == (40, 40, 3)
    assert pixels[0, 0].tolist() == [0, 0, 0] and pixels[20, 20].tolist() == [255, 255, 255]


def test_reduced_scale_jpeg_decode_matches_full_decode():
    """Image.draft decodes large JPEGs at 1/2..1/8 scale; the result must look the same."""
    rng = np.random.default_rng(0)
    smooth = Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).resize((1600, 1200))
    buffer = io.BytesIO()
    smooth.save(buffer, "JPEG", quality=95)
    fast, _ = process_image(buffer.getvalue(), ImageOptions(size=64, format="png"))
    reference = smooth.resize((85, 64), Image.Resampling.BICUBIC, reducing_gap=3.0)
    difference = np.abs(np.asarray(_decode(fast), float) - np.asarray(reference, float))
    assert _decode(fast).size == (85, 64) and difference.mean() < 2.0


def test_transparency_becomes_white_and_exif_rotation_is_applied():
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    data, _ = process_image(rgba, ImageOptions(size=8, resize_mode="none", format="png"))
    assert np.asarray(_decode(data))[0, 0].tolist() == [255, 255, 255]
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    buffer = io.BytesIO()
    Image.new("RGB", (60, 20)).save(buffer, "JPEG", exif=exif)
    data, meta = process_image(buffer.getvalue(), ImageOptions(size=20, resize_mode="none"))
    assert _decode(data).size == (20, 60)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", Reason.EMPTY_IMAGE),
        (b"GIF89a but not really", Reason.UNDECODABLE_IMAGE),
        (image_bytes(200, 200)[:1500], Reason.TRUNCATED_IMAGE),
    ],
)
def test_bad_images_raise_with_reason(data, reason):
    with pytest.raises(BadSample) as caught:
        process_image(data, ImageOptions(size=16))
    assert caught.value.reason is reason


def test_decompression_bomb_is_rejected_before_decoding():
    with pytest.raises(BadSample) as caught:
        process_image(image_bytes(100, 100), ImageOptions(size=16, max_pixels=9_999))
    assert caught.value.reason is Reason.DECOMPRESSION_BOMB and "exceeds" in caught.value.detail


def test_max_pixels_above_pillows_default_is_honoured(tmp_path):
    """Pillow's own limit (89.5 Mpx) must not override a larger --max-pixels."""
    from data_tools.images import open_image

    buffer = io.BytesIO()
    Image.new("1", (10000, 9000)).save(buffer, "PNG")  # 90 Mpx, a few KB
    assert open_image(buffer.getvalue(), 100_000_000).size == (10000, 9000)
    with pytest.raises(BadSample):
        open_image(buffer.getvalue(), 89_000_000)
