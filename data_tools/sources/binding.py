"""Image-caption selection sets (SugarCrepe-style binding tests), one per kind of negative.

Each item is an image, its true caption and one hard negative of a single kind: the eval set
stores them as clip_benchmark's `image_caption_selection` sets do (a retrieval-typed set whose
`.txt` holds the true caption first, then the negative). A model scores a hit when it ranks
the true caption above the negative.

- demo (two shapes on a textured background, as the training scenes draw them):
  `swap_attribute` (the two shapes' colours swapped), `swap_position` (two sentences placing
  the shapes, their cells swapped), `replace_object` (a shape replaced by one absent).
- fashion-mnist (2x2 mosaics of test-split items, listed in reading order):
  `swap_position` (two different items swapped), `replace_object` (an item replaced by a class
  absent from the mosaic).

Every item comes from its own random stream ("eval/binding/KIND"), so the sets never change
the demo's other eval sets and hold scenes no training sample has.
"""

from __future__ import annotations

import dataclasses
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from data_tools.errors import UsageError
from data_tools.sample import RawSample
from data_tools.sources import Source
from data_tools.sources import demo as dm
from data_tools.sources import demo_scene as scene
from data_tools.sources import fashion_mnist as fm

KINDS = ("swap_attribute", "swap_position", "replace_object")
"""Every kind of negative, in report order."""
FASHION_KINDS = ("swap_position", "replace_object")
"""Fashion-MNIST items have no attribute words: no swap_attribute set."""
VERSION = 1
"""Bump when the sets' contents change, so old shards no longer match `describe()`."""


class _BindingSource(Source):
    """Bookkeeping shared by the demo and fashion-mnist sets: kind check, per-item streams."""

    name = ""
    kinds: tuple[str, ...] = ()

    def __init__(self, kind: str, num_samples: int, seed: int):
        if kind not in self.kinds:
            raise UsageError(f"binding kind must be one of {self.kinds}, got {kind!r}")
        if num_samples < 0 or seed < 0:
            raise UsageError("num_samples and seed must be >= 0")
        self.kind, self.num_samples, self.seed = kind, num_samples, seed
        self._stream = zlib.crc32(f"eval/binding/{kind}".encode())

    def __len__(self) -> int:
        return self.num_samples

    def _rng(self, index: int) -> np.random.Generator:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} items")
        return np.random.default_rng([self.seed, self._stream, index])

    def describe(self) -> dict[str, Any]:
        return {
            "type": f"{self.name}_binding",
            "version": VERSION,
            "kind": self.kind,
            "num_samples": self.num_samples,
            "seed": self.seed,
        }

    def locate(self, index: int) -> str:
        return f"{self.name} binding/{self.kind} item {index} (seed {self.seed})"


class DemoBindingSource(_BindingSource):
    """Two shapes of distinct shape, colour and cell; captions in the training captions' style."""

    name, kinds = "demo", KINDS

    def __init__(self, kind: str, num_samples: int, image_size: int = 64, seed: int = 0):
        super().__init__(kind, num_samples, seed)
        self.image_size = image_size

    def read(self, index: int) -> RawSample:
        rng = self._rng(index)
        objects = _two_objects(rng)
        image = scene.render(objects, self.image_size, rng)
        if self.kind == "swap_position":
            first, second = objects
            swapped = [
                dataclasses.replace(first, position=second.position),
                dataclasses.replace(second, position=first.position),
            ]
            captions = _placements([objects, swapped], rng)
        else:
            captions = _listings([objects, _changed(objects, self.kind, rng)], rng)
        meta = {"kind": self.kind, "objects": [obj.meta() for obj in objects]}
        return RawSample(image=image, caption=captions, meta=meta)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "image_size": self.image_size}


def _two_objects(rng: np.random.Generator) -> list[scene.SceneObject]:
    """Two objects with distinct shapes, colours and cells, in reading order of the cells."""
    shapes = rng.choice(len(scene.SHAPES), 2, replace=False)
    colours = rng.choice(len(scene.COLOURS), 2, replace=False)
    cells = np.sort(rng.choice(len(scene.POSITIONS), 2, replace=False))
    sizes = rng.integers(0, len(scene.SIZES), 2)
    return [
        scene.SceneObject(scene.SHAPES[s], scene.COLOURS[c], scene.SIZES[z], scene.POSITIONS[p])
        for s, c, z, p in zip(shapes, colours, sizes, cells, strict=True)
    ]


def _changed(objects: list[scene.SceneObject], kind: str, rng: np.random.Generator):
    """The objects with their colours swapped (swap_attribute) or one shape replaced by one
    absent from the scene (replace_object)."""
    first, second = objects
    if kind == "swap_attribute":
        return [
            dataclasses.replace(first, colour=second.colour),
            dataclasses.replace(second, colour=first.colour),
        ]
    index = int(rng.integers(2))
    absent = [s for s in scene.SHAPES if s not in (first.shape, second.shape)]
    changed = list(objects)
    changed[index] = dataclasses.replace(objects[index], shape=absent[rng.integers(len(absent))])
    return changed


def _listings(versions: list[list[scene.SceneObject]], rng: np.random.Generator) -> list[str]:
    """Each version of the scene as a short training-style caption: one template, object
    order and set of size words for all versions, so only the negative's change differs."""
    order = rng.permutation(2)
    keep_size = rng.random(2) >= dm._DROP_SIZE_WORD
    template = dm._RAW_TEMPLATES[rng.integers(len(dm._RAW_TEMPLATES))]
    return [
        template.format(
            objects=dm._join([dm._phrase(objects[i], bool(keep_size[i])) for i in order]),
            count=dm._counted(2, "shape"),
        )
        for objects in versions
    ]


def _placements(versions: list[list[scene.SceneObject]], rng: np.random.Generator) -> list[str]:
    """Each version as two long-caption sentences placing its objects (shared templates)."""
    order = rng.permutation(2)
    templates = [dm._OBJECT_SENTENCES[rng.integers(len(dm._OBJECT_SENTENCES))] for _ in order]
    return [
        " ".join(
            dm._capitalised(template.format(x=dm._phrase(objects[i], True), p=objects[i].position))
            for template, i in zip(templates, order, strict=True)
        )
        for objects in versions
    ]


class FashionBindingSource(_BindingSource):
    """2x2 mosaics of four test-split items (at least two classes), listed in reading order."""

    name, kinds = "fashion-mnist", FASHION_KINDS

    def __init__(self, idx_dir: Path, kind: str, num_samples: int, seed: int = 0):
        super().__init__(kind, num_samples, seed)
        self.idx_dir = idx_dir
        self.images, self.labels = fm.load_split(idx_dir, "test")

    def read(self, index: int) -> RawSample:
        rng = self._rng(index)
        rows = rng.choice(len(self.images), 4, replace=False)
        while len(set(self.labels[rows].tolist())) < 2:  # a swap must change the caption
            rows = rng.choice(len(self.images), 4, replace=False)
        names = [fm.CLASSNAMES[int(self.labels[r])] for r in rows]
        changed = list(names)
        if self.kind == "swap_position":
            pairs = [(i, j) for i in range(4) for j in range(i + 1, 4) if names[i] != names[j]]
            i, j = pairs[rng.integers(len(pairs))]
            changed[i], changed[j] = names[j], names[i]
        else:
            index_changed = int(rng.integers(4))
            absent = [c for c in fm.CLASSNAMES if c not in names]
            changed[index_changed] = absent[rng.integers(len(absent))]
        image = Image.fromarray(fm.mosaic_canvas(self.images, rows))
        captions = [fm.items_caption(names), fm.items_caption(changed)]
        return RawSample(image=image, caption=captions, meta={"kind": self.kind, "classes": names})

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "idx_dir": str(self.idx_dir.resolve())}
