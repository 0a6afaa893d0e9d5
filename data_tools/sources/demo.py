"""A procedurally generated captioned dataset ("demo") that exercises every vlp feature offline.

Each image shows one to four coloured shapes in the cells of a 2x2 grid on a muted, textured
background. Because the generator knows exactly what it drew, it can write matching short
captions (for contrastive training), multi-sentence long captions with positions (for sentence
splitting and captioning), a zero-shot shape classification set and a retrieval set, all small
enough to train and evaluate on a laptop in minutes.

Every item is drawn from its own random stream, `numpy.random.default_rng([seed, stream, index])`,
so an item depends only on the constructor arguments and its index (shards are built in parallel
from fixed index ranges), and the eval sets use other streams, so they are held out from training
even with the same seed.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from data_tools.errors import UsageError
from data_tools.sample import RawSample
from data_tools.sources import Source
from data_tools.sources.demo_scene import (
    SHAPES,
    SceneObject,
    one_object,
    random_objects,
    render,
    training_objects,
)

SHAPE_TEMPLATES: tuple[str, ...] = (
    "a {c}.",
    "a drawing of a {c}.",
    "a small {c}.",
    "a large {c}.",
    "a coloured {c} shape.",
    "a picture of a {c}.",
    "a {c} on a textured background.",
    "a {c} shape.",
)

_VERSION = 1
"""Bump when the generator's output changes, so old shards no longer match `describe()`."""
_TRAIN_VERSION = 2
"""The training scenes' own version (2: the one-object share, long `.txt` captions); the eval sets
keep _VERSION."""
SINGLE_FRACTION = 0.5
"""Share of training scenes drawn with exactly one object, as in eval/shapes. In a batch of busy
scenes the colours alone tell the captions apart, so a model learns colours and hardly any
shapes; one-object scenes of the same colour can only be told apart by shape. (Leaving the
colour out of some one-object captions, so that only the shape matches, lowered zero-shot acc1
at the demo's budget: 0.25 against 0.36 at 38,400 samples, one seed.)"""
LONG_CAPTION_FRACTION = 1 / 3
"""Share of training scenes whose `.txt` caption is one of their long captions (the other is
kept in the sidecar with the raw caption). The retrieval set queries with one raw and two long
captions per image, so a model that only ever read raw captions would meet long ones first at
evaluation."""
_NUMBERS = ("one", "two", "three", "four")
_DROP_SIZE_WORD = 0.25
"""Chance that a short caption leaves out an object's size word."""

_RAW_TEMPLATES = (
    "{objects}",
    "{count}: {objects}",
    "a picture of {objects}",
    "an image with {objects}",
    "{objects} on a textured background",
    "a drawing of {objects}",
)
_COUNT_SENTENCES = (
    "there {be} {n} {shapes}.",
    "the picture shows {n} {objects}.",
    "{n} {shapes} {be} on a textured background.",
    "this image contains {n} {shapes}.",
    "we can see {n} {objects}.",
    "there {be} {n} {objects} in the picture.",
)
_OBJECT_SENTENCES = (
    "{x} is in the {p}.",
    "in the {p} there is {x}.",
    "{x} sits in the {p}.",
    "the {p} corner holds {x}.",
    "{x} can be seen in the {p}.",
    "there is {x} in the {p}.",
    "at the {p} we see {x}.",
)


# ---- captions


def _with_article(words: str) -> str:
    return ("an " if words[0] in "aeiou" else "a ") + words


def _phrase(obj: SceneObject, with_size: bool) -> str:
    """'a small red circle', or 'a red circle' without the size word."""
    words = [obj.size] if with_size else []
    return _with_article(" ".join([*words, obj.colour, obj.shape]))


def _join(phrases: list[str]) -> str:
    """'A', 'A and B', 'A, B and C'."""
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _noun(noun: str, count: int) -> str:
    return noun if count == 1 else noun + "s"


def _counted(count: int, noun: str) -> str:
    """'one shape', 'three shapes'."""
    return f"{_NUMBERS[count - 1]} {_noun(noun, count)}"


def _capitalised(sentence: str) -> str:
    return sentence[0].upper() + sentence[1:]


def _raw_caption(objects: list[SceneObject], rng: np.random.Generator) -> str:
    """A short caption naming every object in random order, without positions."""
    order = rng.permutation(len(objects))
    keep_size = rng.random(len(objects)) >= _DROP_SIZE_WORD
    phrases = [_phrase(objects[i], bool(keep_size[i])) for i in order]
    template = _RAW_TEMPLATES[rng.integers(len(_RAW_TEMPLATES))]
    return template.format(objects=_join(phrases), count=_counted(len(objects), "shape"))


def _long_caption(objects: list[SceneObject], count_sentence: str, rng: np.random.Generator) -> str:
    """A count sentence, then one sentence per object (random order) saying where it is."""
    n = len(objects)
    plural = {"shapes": _noun("shape", n), "objects": _noun("object", n)}
    sentences = [count_sentence.format(n=_NUMBERS[n - 1], be="is" if n == 1 else "are", **plural)]
    for i in rng.permutation(n):
        template = _OBJECT_SENTENCES[rng.integers(len(_OBJECT_SENTENCES))]
        sentences.append(template.format(x=_phrase(objects[i], True), p=objects[i].position))
    return " ".join(_capitalised(sentence) for sentence in sentences)


def _long_captions(objects: list[SceneObject], rng: np.random.Generator) -> list[str]:
    """Two long captions of the same scene; distinct count sentences make them differ."""
    firsts = rng.choice(len(_COUNT_SENTENCES), 2, replace=False)
    return [_long_caption(objects, _COUNT_SENTENCES[i], rng) for i in firsts]


def _sentences(caption: str) -> list[str]:
    return [part.strip() + "." for part in caption.split(".") if part.strip()]


# ---- sources


@dataclass(frozen=True)
class _Scene:
    image: Image.Image
    objects: list[SceneObject]
    raw: str
    long: list[str]


def _scene(
    rng: np.random.Generator, image_size: int, objects: list[SceneObject] | None = None
) -> _Scene:
    """The scene of `objects` (default: 1-4 random ones, as the retrieval sets draw them)."""
    objects = random_objects(rng) if objects is None else objects
    image = render(objects, image_size, rng)
    return _Scene(image, objects, _raw_caption(objects, rng), _long_captions(objects, rng))


class _Generated(Source):
    """Shared bookkeeping: argument checks, per-item random streams, descriptions."""

    kind = ""

    def __init__(self, num_samples: int, image_size: int, seed: int, stream: str):
        if num_samples < 0:
            raise UsageError(f"num_samples must be >= 0, got {num_samples}")
        if image_size < 16:
            raise UsageError(f"image_size must be >= 16, got {image_size}")
        if seed < 0:
            raise UsageError(f"seed must be >= 0, got {seed}")
        self.num_samples, self.image_size, self.seed = num_samples, image_size, seed
        # crc32, unlike hash(), is the same in every process
        self._stream = zlib.crc32(stream.encode("utf-8"))

    def __len__(self) -> int:
        return self.num_samples

    def _rng(self, index: int) -> np.random.Generator:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} items")
        return np.random.default_rng([self.seed, self._stream, index])

    def describe(self) -> dict[str, Any]:
        return {
            "type": self.kind,
            "version": _VERSION,
            "num_samples": self.num_samples,
            "image_size": self.image_size,
            "seed": self.seed,
        }

    def locate(self, index: int) -> str:
        return f"{self.kind} item {index} (seed {self.seed})"


class DemoSource(_Generated):
    """Training pairs: image + caption (the raw caption, or for `long_fraction` of scenes one of
    the long captions); the raw and long captions and the objects go to the sidecar.

    `weak_captions`: the caption names one of the scene's objects (drawn at random), never its
    long caption: DreamLIP's setting of a short, weak raw caption next to rich long captions.
    """

    kind = "demo"

    def __init__(
        self,
        num_samples: int,
        image_size: int = 64,
        seed: int = 0,
        split: str = "train",
        single_fraction: float = SINGLE_FRACTION,
        long_fraction: float = LONG_CAPTION_FRACTION,
        weak_captions: bool = False,
    ):
        super().__init__(num_samples, image_size, seed, f"demo/{split}")
        for name, value in (("single_fraction", single_fraction), ("long_fraction", long_fraction)):
            if not 0 <= value <= 1:
                raise UsageError(f"{name} must be in [0, 1], got {value}")
        self.split, self.single_fraction = split, single_fraction
        self.long_fraction = 0.0 if weak_captions else long_fraction
        self.weak_captions = weak_captions

    def read(self, index: int) -> RawSample:
        rng = self._rng(index)
        scene = _scene(rng, self.image_size, training_objects(rng, self.single_fraction))
        long = rng.random() < self.long_fraction
        caption = scene.long[rng.integers(len(scene.long))] if long else scene.raw
        if self.weak_captions:  # drawn last: the default stream stays as it was
            caption = _raw_caption([scene.objects[rng.integers(len(scene.objects))]], rng)
        meta = {
            "raw": scene.raw,
            "long": scene.long,
            "objects": [obj.meta() for obj in scene.objects],
            "num_objects": len(scene.objects),
        }
        return RawSample(image=scene.image, caption=caption, meta=meta)

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "version": _TRAIN_VERSION,
            "split": self.split,
            "single_fraction": self.single_fraction,
            "long_fraction": self.long_fraction,
            **({"weak_captions": True} if self.weak_captions else {}),
        }

    def locate(self, index: int) -> str:
        return f"demo {self.split} item {index} (seed {self.seed})"


class ShapesEvalSource(_Generated):
    """Zero-shot classification: one object per image, labelled by its index in SHAPES."""

    kind = "demo_shapes_eval"

    def __init__(self, num_samples: int, image_size: int = 64, seed: int = 0):
        super().__init__(num_samples, image_size, seed, "eval/shapes")

    def read(self, index: int) -> RawSample:
        rng = self._rng(index)
        # cycling through the shapes keeps the classes balanced in every index range
        obj = one_object(rng, SHAPES[index % len(SHAPES)])
        image = render([obj], self.image_size, rng)
        return RawSample(image=image, label=SHAPES.index(obj.shape), meta=obj.meta())


RETRIEVAL_VIEWS = ("all", "sentences", "long")


class RetrievalEvalSource(_Generated):
    """Retrieval: each image with its captions; the same images for every `captions` view.

    all: the short caption and the two long captions; sentences: the first long caption's
    sentences about one object each (its count sentence left out), one query per object;
    long: the two long captions only.
    """

    kind = "demo_retrieval_eval"

    def __init__(
        self, num_samples: int, image_size: int = 64, seed: int = 0, captions: str = "all"
    ):
        super().__init__(num_samples, image_size, seed, "eval/retrieval")
        if captions not in RETRIEVAL_VIEWS:
            raise UsageError(f"captions must be one of {RETRIEVAL_VIEWS}, got {captions!r}")
        self.captions = captions

    def read(self, index: int) -> RawSample:
        scene = _scene(self._rng(index), self.image_size)
        sentences = [_sentences(caption) for caption in scene.long]
        meta = {
            "raw": scene.raw,
            "long": scene.long,
            "sentences": sentences,
            "objects": [obj.meta() for obj in scene.objects],
        }
        captions = {
            "all": [scene.raw, *scene.long],
            "sentences": sentences[0][1:],
            "long": scene.long,
        }[self.captions]
        return RawSample(image=scene.image, caption=captions, meta=meta)

    def describe(self) -> dict[str, Any]:
        view = {} if self.captions == "all" else {"captions": self.captions}
        return {**super().describe(), **view}


class ShapesTrainSource(ShapesEvalSource):
    """The shapes set's train/ split for the linear probe: items like the test split's, drawn
    from their own random stream, so they are held out from the test split and from training."""

    kind = "demo_shapes_train"

    def __init__(self, num_samples: int, image_size: int = 64, seed: int = 0):
        _Generated.__init__(self, num_samples, image_size, seed, "eval/shapes/train")
