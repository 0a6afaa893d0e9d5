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

import colorsys
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from data_tools.errors import UsageError
from data_tools.sample import RawSample
from data_tools.sources import Source

# every name starts with a consonant, so "a {c}" reads right in the templates
SHAPES: tuple[str, ...] = (
    "circle",
    "square",
    "triangle",
    "star",
    "hexagon",
    "diamond",
    "cross",
    "heart",
)
_RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (35, 75, 235),
    "yellow": (245, 215, 20),
    "purple": (145, 45, 200),
    "orange": (250, 130, 15),
    "pink": (250, 125, 195),
    "cyan": (25, 215, 225),
    "white": (250, 250, 250),
}
COLOURS: tuple[str, ...] = tuple(_RGB)
SIZES = ("small", "large")
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
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
_MAX_OBJECTS = len(POSITIONS)
_NUMBERS = ("one", "two", "three", "four")
_SIZE_FRACTION = {"small": (0.38, 0.48), "large": (0.74, 0.84)}
"""Range of an object's extent as a fraction of its cell's side."""
_CELL_MARGIN = 0.04
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


# ---- shape outlines: polygons centred on the origin, fitted to the square [-1, 1]^2, y down


def _fit(points: np.ndarray) -> np.ndarray:
    """Centre a polygon's bounding box on the origin and scale its longer side to 2."""
    low, high = points.min(axis=0), points.max(axis=0)
    return (points - (low + high) / 2) * (2 / (high - low).max())


def _ring(count: int, radius: np.ndarray | float = 1.0, turn: float = 0.0) -> np.ndarray:
    """`count` points around the origin starting straight up, optionally with varying radius."""
    angles = turn - np.pi / 2 + np.arange(count) * 2 * np.pi / count
    return np.stack([np.cos(angles), np.sin(angles)], axis=1) * np.reshape(radius, (-1, 1))


def _heart() -> np.ndarray:
    # the classic parametric heart curve, flipped because image y points down
    t = np.linspace(0, 2 * np.pi, 72, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = 13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)
    return np.stack([x, -y], axis=1)


def _cross(arm: float = 0.34) -> np.ndarray:
    # a plus sign: the right half's outline from bottom to top, then its mirror image back down
    right = [(arm, 1), (arm, arm), (1, arm), (1, -arm), (arm, -arm), (arm, -1)]
    right = np.array(right, dtype=float)
    return np.concatenate([right, right[::-1] * [-1, 1]])


_OUTLINES: dict[str, np.ndarray] = {
    name: _fit(points)
    for name, points in {
        "circle": _ring(64),
        "square": _ring(4, turn=np.pi / 4),
        "triangle": _ring(3),
        "star": _ring(10, radius=np.tile([1.0, 0.45], 5)),
        "hexagon": _ring(6),
        "diamond": np.array([(0, -1), (0.72, 0), (0, 1), (-0.72, 0)], dtype=float),
        "cross": _cross(),
        "heart": _heart(),
    }.items()
}
_OUTLINES["square"] *= 0.9  # a box filling its whole extent looks bigger than the rest


# ---- scenes


@dataclass(frozen=True)
class _Object:
    shape: str
    colour: str
    size: str
    position: str

    def meta(self) -> dict[str, str]:
        return {
            "shape": self.shape,
            "colour": self.colour,
            "size": self.size,
            "position": self.position,
        }


def _random_objects(rng: np.random.Generator) -> list[_Object]:
    """1-4 objects in distinct cells, in POSITIONS order; no two share both shape and colour."""
    count = int(rng.integers(1, _MAX_OBJECTS + 1))
    cells = np.sort(rng.choice(len(POSITIONS), count, replace=False))
    kinds = rng.choice(len(SHAPES) * len(COLOURS), count, replace=False)
    sizes = rng.integers(0, len(SIZES), count)
    return [
        _Object(
            SHAPES[kind // len(COLOURS)], COLOURS[kind % len(COLOURS)], SIZES[size], POSITIONS[cell]
        )
        for cell, kind, size in zip(cells, kinds, sizes, strict=True)
    ]


def _training_objects(rng: np.random.Generator, single_fraction: float) -> list[_Object]:
    """One object of any kind with probability `single_fraction`, else `_random_objects`."""
    if rng.random() >= single_fraction:
        return _random_objects(rng)
    return [_one_object(rng, SHAPES[rng.integers(len(SHAPES))])]


def _one_object(rng: np.random.Generator, shape: str) -> _Object:
    colour = COLOURS[rng.integers(len(COLOURS))]
    size = SIZES[rng.integers(len(SIZES))]
    return _Object(shape, colour, size, POSITIONS[rng.integers(len(POSITIONS))])


# ---- rendering


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """A (size, size) field in [-1, 1]: stripes, checker, gradient or blotches."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    kind = rng.integers(4)
    if kind == 0:
        angle, period, phase = rng.uniform(0, np.pi), rng.uniform(0.08, 0.25), rng.uniform(0, 6.3)
        return np.sin((x * np.cos(angle) + y * np.sin(angle)) * 2 * np.pi / period + phase)
    if kind == 1:
        squares = int(rng.integers(4, 9))
        return ((x * squares).astype(int) + (y * squares).astype(int)) % 2 * 2.0 - 1
    if kind == 2:
        angle = rng.uniform(0, 2 * np.pi)
        ramp = x * np.cos(angle) + y * np.sin(angle)
        return (ramp - ramp.min()) / np.ptp(ramp) * 2 - 1
    grid = rng.uniform(-1, 1, (int(rng.integers(3, 7)),) * 2).astype(np.float32)
    return np.asarray(Image.fromarray(grid).resize((size, size), Image.Resampling.BILINEAR))


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A muted (size, size, 3) uint8 background that no saturated object colour can match."""
    # low saturation and value keep it far from every entry of _RGB, white included
    hue, saturation, value = rng.uniform(0, 1), rng.uniform(0.05, 0.25), rng.uniform(0.28, 0.5)
    base = np.array(colorsys.hsv_to_rgb(hue, saturation, value), dtype=np.float32)
    shade = 1 + rng.uniform(0.08, 0.2) * _texture(rng, size)
    grain = rng.normal(0, 0.015, (size, size, 1)).astype(np.float32)
    pixels = base * shade[..., None] + grain
    return (np.clip(pixels, 0, 1) * 255 + 0.5).astype(np.uint8)


def _supersampling(image_size: int) -> int:
    """Drawing at this multiple and box-downsampling anti-aliases edges; 2x suffices when big."""
    return 4 if image_size <= 128 else 2


def _draw(canvas: Image.Image, obj: _Object, rng: np.random.Generator) -> None:
    """Draw `obj` in its cell, sized by its size class and jittered within the cell."""
    cell = canvas.width / 2
    row, column = divmod(POSITIONS.index(obj.position), 2)
    half = rng.uniform(*_SIZE_FRACTION[obj.size]) * cell / 2
    slack = max(cell / 2 - half - _CELL_MARGIN * cell, 0.0)
    centre = (np.array([column, row]) + 0.5) * cell + rng.uniform(-slack, slack, 2)
    points = _OUTLINES[obj.shape] * half + centre
    ImageDraw.Draw(canvas).polygon(points.ravel().tolist(), fill=_RGB[obj.colour])


def _render(objects: list[_Object], image_size: int, rng: np.random.Generator) -> Image.Image:
    factor = _supersampling(image_size)
    background = Image.fromarray(_background(rng, image_size))
    # nearest upscaling then box reduction gives the background back exactly
    canvas = background.resize((image_size * factor,) * 2, Image.Resampling.NEAREST)
    for obj in objects:
        _draw(canvas, obj, rng)
    return canvas.reduce(factor)


# ---- captions


def _with_article(words: str) -> str:
    return ("an " if words[0] in "aeiou" else "a ") + words


def _phrase(obj: _Object, with_size: bool) -> str:
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


def _raw_caption(objects: list[_Object], rng: np.random.Generator) -> str:
    """A short caption naming every object in random order, without positions."""
    order = rng.permutation(len(objects))
    keep_size = rng.random(len(objects)) >= _DROP_SIZE_WORD
    phrases = [_phrase(objects[i], bool(keep_size[i])) for i in order]
    template = _RAW_TEMPLATES[rng.integers(len(_RAW_TEMPLATES))]
    return template.format(objects=_join(phrases), count=_counted(len(objects), "shape"))


def _long_caption(objects: list[_Object], count_sentence: str, rng: np.random.Generator) -> str:
    """A count sentence, then one sentence per object (random order) saying where it is."""
    n = len(objects)
    plural = {"shapes": _noun("shape", n), "objects": _noun("object", n)}
    sentences = [count_sentence.format(n=_NUMBERS[n - 1], be="is" if n == 1 else "are", **plural)]
    for i in rng.permutation(n):
        template = _OBJECT_SENTENCES[rng.integers(len(_OBJECT_SENTENCES))]
        sentences.append(template.format(x=_phrase(objects[i], True), p=objects[i].position))
    return " ".join(_capitalised(sentence) for sentence in sentences)


def _long_captions(objects: list[_Object], rng: np.random.Generator) -> list[str]:
    """Two long captions of the same scene; distinct count sentences make them differ."""
    firsts = rng.choice(len(_COUNT_SENTENCES), 2, replace=False)
    return [_long_caption(objects, _COUNT_SENTENCES[i], rng) for i in firsts]


def _sentences(caption: str) -> list[str]:
    return [part.strip() + "." for part in caption.split(".") if part.strip()]


# ---- sources


@dataclass(frozen=True)
class _Scene:
    image: Image.Image
    objects: list[_Object]
    raw: str
    long: list[str]


def _scene(
    rng: np.random.Generator, image_size: int, objects: list[_Object] | None = None
) -> _Scene:
    """The scene of `objects` (default: 1-4 random ones, as the retrieval sets draw them)."""
    objects = _random_objects(rng) if objects is None else objects
    image = _render(objects, image_size, rng)
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
        scene = _scene(rng, self.image_size, _training_objects(rng, self.single_fraction))
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
        obj = _one_object(rng, SHAPES[index % len(SHAPES)])
        image = _render([obj], self.image_size, rng)
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
