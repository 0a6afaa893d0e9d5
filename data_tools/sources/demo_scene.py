"""The demo's scenes: what can be drawn (shapes, colours, sizes, cells) and how it is drawn.

A scene is one to four objects in the cells of a 2x2 grid on a muted, textured background;
rendering draws at a multiple of the image size and box-downsamples, which anti-aliases edges.
The captions and the datasets built from scenes are in data_tools/sources/demo.py.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

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
_MAX_OBJECTS = len(POSITIONS)
_SIZE_FRACTION = {"small": (0.38, 0.48), "large": (0.74, 0.84)}
"""Range of an object's extent as a fraction of its cell's side."""
_CELL_MARGIN = 0.04


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
class SceneObject:
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


def random_objects(rng: np.random.Generator) -> list[SceneObject]:
    """1-4 objects in distinct cells, in POSITIONS order; no two share both shape and colour."""
    count = int(rng.integers(1, _MAX_OBJECTS + 1))
    cells = np.sort(rng.choice(len(POSITIONS), count, replace=False))
    kinds = rng.choice(len(SHAPES) * len(COLOURS), count, replace=False)
    sizes = rng.integers(0, len(SIZES), count)
    return [
        SceneObject(
            SHAPES[kind // len(COLOURS)], COLOURS[kind % len(COLOURS)], SIZES[size], POSITIONS[cell]
        )
        for cell, kind, size in zip(cells, kinds, sizes, strict=True)
    ]


def training_objects(rng: np.random.Generator, single_fraction: float) -> list[SceneObject]:
    """One object of any kind with probability `single_fraction`, else `random_objects`."""
    if rng.random() >= single_fraction:
        return random_objects(rng)
    return [one_object(rng, SHAPES[rng.integers(len(SHAPES))])]


def one_object(rng: np.random.Generator, shape: str) -> SceneObject:
    colour = COLOURS[rng.integers(len(COLOURS))]
    size = SIZES[rng.integers(len(SIZES))]
    return SceneObject(shape, colour, size, POSITIONS[rng.integers(len(POSITIONS))])


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


def _draw(canvas: Image.Image, obj: SceneObject, rng: np.random.Generator) -> None:
    """Draw `obj` in its cell, sized by its size class and jittered within the cell."""
    cell = canvas.width / 2
    row, column = divmod(POSITIONS.index(obj.position), 2)
    half = rng.uniform(*_SIZE_FRACTION[obj.size]) * cell / 2
    slack = max(cell / 2 - half - _CELL_MARGIN * cell, 0.0)
    centre = (np.array([column, row]) + 0.5) * cell + rng.uniform(-slack, slack, 2)
    points = _OUTLINES[obj.shape] * half + centre
    ImageDraw.Draw(canvas).polygon(points.ravel().tolist(), fill=_RGB[obj.colour])


def render(objects: list[SceneObject], image_size: int, rng: np.random.Generator) -> Image.Image:
    factor = _supersampling(image_size)
    background = Image.fromarray(_background(rng, image_size))
    # nearest upscaling then box reduction gives the background back exactly
    canvas = background.resize((image_size * factor,) * 2, Image.Resampling.NEAREST)
    for obj in objects:
        _draw(canvas, obj, rng)
    return canvas.reduce(factor)
