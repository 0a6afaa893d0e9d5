"""What a source hands the writer, and the ways a sample can be bad."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from vlp.data.format import Reason


class BadSample(Exception):
    """Raised by sources and encoders; the writer counts it by `reason` and moves on."""

    def __init__(self, reason: Reason, detail: str):
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail


ImageInput = bytes | Path | Image.Image
"""Encoded bytes, a local file, or an image already in memory (generated sources)."""


@dataclass
class RawSample:
    """One source item before validation and encoding.

    `caption` is a str, undecoded bytes (validated as UTF-8 by the writer), a list of captions
    (retrieval eval sets), or None when the source has none. `label` is used only by
    classification eval sets. `meta` goes into the `.json` sidecar of training shards.
    """

    image: ImageInput | None
    caption: str | bytes | list[str | bytes] | None = None
    label: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def long_captions(cells: list[Any]) -> list[str]:
    """The `.json` sidecar's `long` list from long-caption cells (each a string, a list of
    strings, or empty): cleaned, empty ones dropped, order kept; non-UTF-8 raises BadSample."""
    captions = []
    for cell in cells:
        for caption in cell if isinstance(cell, list) else [cell]:
            if caption is None or isinstance(caption, str | bytes) and not caption.strip():
                continue
            captions.append(clean_caption(caption))
    return captions


def clean_caption(caption: str | bytes | None) -> str:
    """Decode (strictly, UTF-8) and strip a caption; raise BadSample if unusable."""
    if caption is None:
        raise BadSample(Reason.MISSING_CAPTION, "no caption")
    if not isinstance(caption, str | bytes | bytearray):
        raise BadSample(Reason.MALFORMED_ROW, f"caption is a {type(caption).__name__}, not text")
    if isinstance(caption, bytes | bytearray):
        try:
            caption = bytes(caption).decode("utf-8")
        except UnicodeDecodeError as err:
            raise BadSample(
                Reason.NON_UTF8_CAPTION, f"caption is not UTF-8 ({err.reason})"
            ) from None
    else:
        try:
            # text read with errors="surrogateescape" carries undecodable bytes as lone
            # surrogates, which strict encoding rejects
            caption.encode("utf-8")
        except UnicodeEncodeError:
            raise BadSample(Reason.NON_UTF8_CAPTION, "caption is not UTF-8") from None
    caption = caption.strip()
    if not caption:
        raise BadSample(Reason.EMPTY_CAPTION, "caption is empty")
    return caption
