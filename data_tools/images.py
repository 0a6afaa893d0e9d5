"""Decode, validate, resize and re-encode images.

Every failure becomes a `BadSample` with a reason, so one bad file never stops a run.
JPEG inputs are decoded at a reduced scale (`Image.draft`) when the target is much smaller,
which is exact up to resampling and is where most of the speed over full decodes comes from.
"""

from __future__ import annotations

import io
import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps

from data_tools.sample import BadSample, ImageInput, Reason

RESIZE_MODES = ("keep_ratio", "center_crop", "border", "none")
FORMATS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}
DEFAULT_MAX_PIXELS = 89_478_485
"""Pillow's own decompression-bomb threshold (about 0.25 GB of RGB)."""


@dataclass(frozen=True)
class ImageOptions:
    """How images are resized and re-encoded."""

    size: int = 256
    """Target size in pixels; its meaning depends on `resize_mode`."""
    resize_mode: str = "keep_ratio"
    """keep_ratio: shorter side = size; center_crop: size x size crop of that; border: longer side
    = size, padded to a black square; none: keep the original pixels."""
    format: str = "jpg"
    quality: int = 95
    """JPEG/WebP quality (ignored for PNG)."""
    max_pixels: int = DEFAULT_MAX_PIXELS
    """Images with more pixels than this are skipped as decompression bombs."""


def open_image(data: ImageInput, max_pixels: int) -> Image.Image:
    """Open and fully decode `data` into a PIL image; raise BadSample on any problem."""
    if isinstance(data, Image.Image):
        return data
    if isinstance(data, Path):
        try:
            data = data.read_bytes()
        except FileNotFoundError:
            raise BadSample(Reason.MISSING_FILE, f"{data}: no such file") from None
        except OSError as err:
            raise BadSample(Reason.MISSING_FILE, f"{data}: {err.strerror}") from None
    if len(data) == 0:
        raise BadSample(Reason.EMPTY_IMAGE, "image file is empty (0 bytes)")
    try:
        with _pillow_pixel_limit(max_pixels):
            image = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise BadSample(Reason.DECOMPRESSION_BOMB, str(err)) from None
    except Exception as err:  # PIL raises many types (UnidentifiedImageError, SyntaxError, ...)
        raise BadSample(Reason.UNDECODABLE_IMAGE, f"cannot identify image: {err}") from None
    width, height = image.size
    if width * height > max_pixels:
        raise BadSample(
            Reason.DECOMPRESSION_BOMB, f"{width}x{height} exceeds --max-pixels {max_pixels}"
        )
    return image


@contextmanager
def _pillow_pixel_limit(max_pixels: int):
    """Pillow's own bomb check at our limit (it reads a process-wide setting)."""
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def load_pixels(image: Image.Image, draft_size: tuple[int, int] | None) -> Image.Image:
    """Decode pixel data (optionally at reduced JPEG scale) and return an RGB image."""
    if draft_size is not None and image.format == "JPEG":
        image.draft("RGB", draft_size)
    try:
        image.load()
    except Exception as err:
        # Pillow has no exception type for truncation; its message says "truncated"
        reason = (
            Reason.TRUNCATED_IMAGE
            if "truncated" in str(err).lower()
            else (Reason.UNDECODABLE_IMAGE)
        )
        raise BadSample(reason, f"cannot decode image: {err}") from None
    image = ImageOps.exif_transpose(image) if image.getexif().get(0x0112, 1) != 1 else image
    return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB with transparent regions composited on white (not black, which reads as content)."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


def target_size(width: int, height: int, opts: ImageOptions) -> tuple[int, int]:
    """Size after resizing (before any crop or border) for `opts.resize_mode`."""
    if opts.resize_mode == "none":
        return width, height
    if opts.resize_mode == "border":
        scale = opts.size / max(width, height)
    else:
        scale = opts.size / min(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def resize(image: Image.Image, opts: ImageOptions) -> Image.Image:
    """Apply `opts.resize_mode` to an RGB image."""
    new_size = target_size(*image.size, opts)
    if new_size != image.size:
        # reducing_gap runs a cheap box reduction first when shrinking a lot
        image = image.resize(new_size, Image.Resampling.BICUBIC, reducing_gap=3.0)
    if opts.resize_mode == "center_crop" and image.size != (opts.size, opts.size):
        left = (image.width - opts.size) // 2
        top = (image.height - opts.size) // 2
        image = image.crop((left, top, left + opts.size, top + opts.size))
    elif opts.resize_mode == "border" and image.size != (opts.size, opts.size):
        canvas = Image.new("RGB", (opts.size, opts.size))
        canvas.paste(image, ((opts.size - image.width) // 2, (opts.size - image.height) // 2))
        image = canvas
    return image


def encode(image: Image.Image, opts: ImageOptions) -> bytes:
    buffer = io.BytesIO()
    if opts.format == "png":
        image.save(buffer, "PNG")
    else:
        image.save(buffer, FORMATS[opts.format], quality=opts.quality)
    return buffer.getvalue()


def process_image(data: ImageInput, opts: ImageOptions) -> tuple[bytes, dict[str, int]]:
    """Validate, resize and encode one image; returns the bytes and size metadata."""
    image = open_image(data, opts.max_pixels)
    original = image.size
    draft = None
    if opts.resize_mode != "none":
        # ask for at least the pre-crop target size; draft picks the smallest JPEG scale above it
        draft = tuple(math.ceil(v) for v in target_size(*original, opts))
    image = resize(load_pixels(image, draft), opts)
    meta = {
        "width": image.width,
        "height": image.height,
        "original_width": original[0],
        "original_height": original[1],
    }
    return encode(image, opts), meta
