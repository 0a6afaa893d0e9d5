"""Hard-negative captions (NegCLIP) for the demo's training samples.

`DemoNegatives(DemoSource(...))` reads the same samples and adds, to each `.json` sidecar,
negative captions of the `.txt` caption: the caption with two objects' colours swapped (a colour
replaced when no two objects differ in both colour and shape) and with one object's shape
replaced by a shape absent from the scene. Each is false for the image: the (colour, shape)
pairs it names differ from the scene's. The demo's short captions carry no positions, so
position negatives live in the binding sets (data_tools/sources/binding.py), not here.

The negatives come from their own random stream, so the samples' images and captions are those
of the wrapped source.
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Any

import numpy as np

from data_tools.sample import RawSample
from data_tools.sources import Source
from data_tools.sources.demo import DemoSource, _phrase
from data_tools.sources.demo_scene import COLOURS, SHAPES, SceneObject
from vlp.data import format as fmt

VERSION = 1
"""Bump when the negatives change, so shards written before no longer match `describe()`."""
_STREAM = zlib.crc32(b"demo/negatives")


class DemoNegatives(Source):
    """The wrapped demo source's samples, with `negatives` and `negative_kinds` in the sidecar."""

    def __init__(self, source: DemoSource):
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def read(self, index: int) -> RawSample:
        sample = self.source.read(index)
        objects = [SceneObject(**obj) for obj in sample.meta["objects"]]
        rng = np.random.default_rng([self.source.seed, _STREAM, index])
        negatives, kinds = caption_negatives(objects, str(sample.caption), rng)
        meta = {**sample.meta, fmt.NEGATIVES_FIELD: negatives, fmt.NEGATIVE_KINDS_FIELD: kinds}
        return dataclasses.replace(sample, meta=meta)

    def describe(self) -> dict[str, Any]:
        return {**self.source.describe(), "negatives": VERSION}

    def locate(self, index: int) -> str:
        return self.source.locate(index)


def caption_negatives(
    objects: list[SceneObject], caption: str, rng: np.random.Generator
) -> tuple[list[str], list[str]]:
    """([colour negative, shape negative], their kinds) of `caption`, which names every object
    of `objects` by its phrase ("a small red circle" or "a red circle")."""
    colour_kind, colour_change = _colour_change(objects, rng)
    shape_change = _shape_change(objects, rng)
    negatives = [_rewrite(caption, objects, change) for change in (colour_change, shape_change)]
    return negatives, [colour_kind, "replace_shape"]


def _colour_change(objects: list[SceneObject], rng: np.random.Generator):
    """(kind, {index: changed object}): swap the colours of two objects that differ in colour
    and shape, else give one object another colour."""
    pairs = [
        (i, j)
        for i in range(len(objects))
        for j in range(i + 1, len(objects))
        if objects[i].colour != objects[j].colour and objects[i].shape != objects[j].shape
    ]
    if pairs:
        i, j = pairs[rng.integers(len(pairs))]
        first, second = objects[i], objects[j]
        return "swap_colour", {
            i: dataclasses.replace(first, colour=second.colour),
            j: dataclasses.replace(second, colour=first.colour),
        }
    index = int(rng.integers(len(objects)))
    others = [c for c in COLOURS if c != objects[index].colour]
    return "replace_colour", {
        index: dataclasses.replace(objects[index], colour=others[rng.integers(len(others))])
    }


def _shape_change(objects: list[SceneObject], rng: np.random.Generator) -> dict[int, SceneObject]:
    """{index: the object with a shape that no object of the scene has}."""
    index = int(rng.integers(len(objects)))
    absent = [s for s in SHAPES if s not in {obj.shape for obj in objects}]
    return {index: dataclasses.replace(objects[index], shape=absent[rng.integers(len(absent))])}


def _rewrite(caption: str, objects: list[SceneObject], changes: dict[int, SceneObject]) -> str:
    """`caption` with each changed object's phrase replaced, its size word kept or left out as
    the caption has it, and capitalised where it starts a sentence (long captions). Objects never
    share both colour and shape, so each phrase is unique."""
    lower = caption.lower()  # the phrases are lower-case ASCII: indices stay aligned
    spans = []
    for index, changed in changes.items():
        with_size = _phrase(objects[index], True)
        has_size = with_size in lower
        old = with_size if has_size else _phrase(objects[index], False)
        start = lower.find(old)
        if start < 0:
            raise ValueError(f"{caption!r} does not name {old!r}")
        new = _phrase(changed, has_size)
        new = new[0].upper() + new[1:] if caption[start].isupper() else new
        spans.append((start, start + len(old), new))
    pieces, end = [], 0
    for start, stop, new in sorted(spans):
        pieces += [caption[end:start], new]
        end = stop
    return "".join(pieces) + caption[end:]
