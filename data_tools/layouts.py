"""What each kind of shard set stores per sample: training pairs, or clip_benchmark eval sets."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from data_tools.images import ImageOptions, process_image
from data_tools.sample import BadSample, RawSample, Reason, clean_caption
from vlp.data import format as fmt

Members = dict[str, Any]


@dataclass(frozen=True)
class Layout:
    """A shard set's naming and per-sample members."""

    name: str
    shard_name: str
    build: Callable[[str, RawSample, ImageOptions], Members]


def _json_bytes(meta: dict[str, Any]) -> bytes:
    return json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8")


def train_members(key: str, sample: RawSample, opts: ImageOptions) -> Members:
    """`{key}.{ext}`, `{key}.txt` (caption), `{key}.json` (sizes + source metadata)."""
    caption = clean_caption(_single(sample.caption))
    image, sizes = process_image(_require_image(sample), opts)
    meta = {**sample.meta, **sizes, "key": key, "caption": caption}
    return {
        "__key__": key,
        opts.format: image,
        fmt.CAPTION_EXTENSION: caption.encode("utf-8"),
        fmt.METADATA_EXTENSION: _json_bytes(meta),
    }


def classification_members(key: str, sample: RawSample, opts: ImageOptions) -> Members:
    """clip_benchmark classification: `{key}.{ext}` + `{key}.cls` (class index as text)."""
    if not isinstance(sample.label, int) or isinstance(sample.label, bool) or sample.label < 0:
        raise BadSample(Reason.BAD_LABEL, f"label {sample.label!r} is not a class index")
    image, _ = process_image(_require_image(sample), opts)
    return {"__key__": key, opts.format: image, fmt.LABEL_EXTENSION: str(sample.label).encode()}


def retrieval_members(key: str, sample: RawSample, opts: ImageOptions) -> Members:
    """clip_benchmark retrieval: `{key}.{ext}` + `{key}.txt` with one caption per line."""
    raw = sample.caption if isinstance(sample.caption, list) else [sample.caption]
    # rows may have a varying number of captions: absent (None) or blank cells are skipped
    present = [caption for caption in raw if caption is not None and not _blank(caption)]
    if not present:
        raise BadSample(Reason.MISSING_CAPTION, "no caption")
    # a caption must stay one line: the reader splits the .txt on newlines
    captions = [" ".join(clean_caption(caption).split()) for caption in present]
    image, _ = process_image(_require_image(sample), opts)
    members = {"__key__": key, opts.format: image, "txt": "\n".join(captions).encode("utf-8")}
    if sample.meta:
        members[fmt.METADATA_EXTENSION] = _json_bytes(sample.meta)
    return members


def _blank(caption: Any) -> bool:
    return isinstance(caption, str | bytes) and not caption.strip()


def _single(caption: Any) -> Any:
    if isinstance(caption, list):
        return caption[0] if caption else None
    return caption


def _require_image(sample: RawSample):
    if sample.image is None:
        raise BadSample(Reason.MISSING_IMAGE, "no image")
    return sample.image


TRAIN = Layout("train", fmt.TRAIN_SHARD_NAME, train_members)
CLASSIFICATION = Layout("classification", fmt.EVAL_SHARD_NAME, classification_members)
RETRIEVAL = Layout("retrieval", fmt.EVAL_SHARD_NAME, retrieval_members)
