"""Fashion-MNIST from its IDX files: real images with class-name captions, or 2x2 mosaics.

Single items get varied class-name captions; mosaics place four items in a 2x2 grid with a
short caption listing them and a long caption with one sentence per tile (for DreamLIP-style
sub-caption objectives). Training samples carry hard-negative captions in their sidecar
(NegCLIP, data.hard_negatives): the caption with another class (replace_item) and, for mosaics,
with two different items swapped (swap_position: the listing's order is the reading order).
The test split becomes a clip_benchmark zero-shot eval set, and with mosaics also two retrieval
sets of test mosaics: one sentence per tile as queries, or the long caption.
"""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from data_tools.errors import UsageError
from data_tools.sample import RawSample
from data_tools.sources import Source
from vlp.data import format as fmt

DEFAULT_IDX_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASSNAMES = (
    "t-shirt", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle boot",
)  # fmt: skip
TEMPLATES = (
    "a photo of {a} {c}.",
    "a black and white photo of {a} {c}.",
    "a grayscale image of {a} {c}.",
    "a low resolution photo of {a} {c}.",
    "a product photo of {a} {c}.",
    "{a} {c}.",
    "a picture of {a} {c}.",
    "a photo of the {c}.",
)
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
COUNT_SENTENCES = (
    "There are four items.",
    "The picture shows four pieces of clothing.",
    "Four items are arranged in a grid.",
)
TILE_SENTENCES = (
    "{A} {c} is in the {p}.",
    "In the {p} there is {a} {c}.",
    "The {p} shows {a} {c}.",
)
SPLIT_FILES = {"train": "train", "test": "t10k"}
NEGATIVES_VERSION = 1
"""Bump when the training negatives change (it is part of `describe()`)."""


def article(noun: str) -> str:
    return "an" if noun[0] in "aeiou" else "a"


def items_caption(names: list[str]) -> str:
    """'a t-shirt, a bag, a coat and an ankle boot': a mosaic's items in reading order."""
    items = [f"{article(n)} {n}" for n in names]
    return ", ".join(items[:-1]) + " and " + items[-1]


def mosaic_canvas(images: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """[2S, 2S] uint8: the four images `rows` of `images` [N, S, S], in reading order."""
    size = images.shape[1]
    canvas = np.zeros((2 * size, 2 * size), dtype=np.uint8)
    for tile, row in enumerate(rows):
        top, left = divmod(tile, 2)
        canvas[top * size : (top + 1) * size, left * size : (left + 1) * size] = images[row]
    return canvas


def item_negatives(names: list[str], rng: np.random.Generator) -> tuple[list[list[str]], list[str]]:
    """(negative name lists, their kinds) of items `names`: two different items swapped (when
    any differ), and one item replaced by a class that is not among them."""
    negatives, kinds = [], []
    pairs = [(i, j) for i in range(len(names)) for j in range(i + 1, len(names))]
    pairs = [(i, j) for i, j in pairs if names[i] != names[j]]
    if pairs:
        i, j = pairs[rng.integers(len(pairs))]
        swapped = list(names)
        swapped[i], swapped[j] = names[j], names[i]
        negatives.append(swapped)
        kinds.append("swap_position")
    replaced = list(names)
    absent = [c for c in CLASSNAMES if c not in names]
    replaced[rng.integers(len(names))] = absent[rng.integers(len(absent))]
    return [*negatives, replaced], [*kinds, "replace_item"]


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped): big-endian dims after a 4-byte magic."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        data = handle.read()
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 0x08:
        raise UsageError(f"{path}: not an IDX file of unsigned bytes")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise UsageError(f"{path}: holds {body.size} bytes, header says shape {shape}")
    return body.reshape(shape)


def load_split(idx_dir: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images [N, 28, 28] uint8, labels [N] uint8) for `train` or `test`."""
    stem = SPLIT_FILES[split]
    found = {}
    for kind, ndim in (("images", 3), ("labels", 1)):
        candidates = [idx_dir / f"{stem}-{kind}-idx{ndim}-ubyte{ext}" for ext in (".gz", "")]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            raise UsageError(
                f"{candidates[0]}: no such file; install Fashion-MNIST with "
                "`apt-get install dataset-fashion-mnist` or pass --idx-dir"
            )
        found[kind] = read_idx(path)
    if len(found["images"]) != len(found["labels"]):
        raise UsageError(f"{idx_dir}: {split} images and labels differ in count")
    return found["images"], found["labels"]


class FashionMnistSource(Source):
    """Single items (`mosaic=False`) or 2x2 mosaics of items drawn from one split."""

    def __init__(
        self,
        idx_dir: Path,
        split: str = "train",
        mosaic: bool = False,
        num_samples: int | None = None,
        seed: int = 0,
        captions: str | None = None,
    ):
        """`captions` (mosaics only): None for training samples (short caption + sidecar);
        "sentences" (the four tile sentences) or "long" for a retrieval eval set."""
        self.idx_dir, self.split, self.mosaic, self.seed = idx_dir, split, mosaic, seed
        self.captions = captions
        self.images, self.labels = load_split(idx_dir, split)
        available = len(self.images) // 4 if mosaic else len(self.images)
        # mosaics take consecutive blocks of one seeded permutation: each item appears once
        self.order = np.random.default_rng([seed, 1]).permutation(len(self.images))
        self.num_samples = available if num_samples is None else min(num_samples, available)

    def __len__(self) -> int:
        return self.num_samples

    def read(self, index: int) -> RawSample:
        return self._mosaic(index) if self.mosaic else self._single(index)

    def _single(self, index: int) -> RawSample:
        label = int(self.labels[index])
        name = CLASSNAMES[label]
        rng = np.random.default_rng([self.seed, 0, index])
        template = TEMPLATES[rng.integers(len(TEMPLATES))]
        caption = template.format(a=article(name), c=name)
        (replaced,), kinds = item_negatives([name], self._negatives_rng(index))  # one item
        negative = template.format(a=article(replaced[0]), c=replaced[0])
        meta = {"label": label, "class": name, "index": index, **_negatives([negative], kinds)}
        image = Image.fromarray(self.images[index])
        return RawSample(image=image, caption=caption, label=label, meta=meta)

    def _negatives_rng(self, index: int) -> np.random.Generator:
        """The negatives' own stream: the images and captions stay those of earlier versions."""
        return np.random.default_rng([self.seed, 3, index])

    def _mosaic(self, index: int) -> RawSample:
        rng = np.random.default_rng([self.seed, 1, index])
        rows = self.order[4 * index : 4 * index + 4]
        canvas = mosaic_canvas(self.images, rows)
        names = [CLASSNAMES[int(self.labels[row])] for row in rows]
        raw = items_caption(names)
        sentences = [COUNT_SENTENCES[rng.integers(len(COUNT_SENTENCES))]]
        for name, position in zip(names, POSITIONS, strict=True):
            template = TILE_SENTENCES[rng.integers(len(TILE_SENTENCES))]
            a = article(name)
            sentences.append(template.format(A=a.capitalize(), a=a, c=name, p=position))
        long = " ".join(sentences)
        if self.captions is not None:  # retrieval: the tile sentences, or the long caption
            queries = sentences[1:] if self.captions == "sentences" else [long]
            return RawSample(image=Image.fromarray(canvas), caption=queries)
        meta = {
            "labels": [int(self.labels[r]) for r in rows],
            "classes": names,
            "positions": list(POSITIONS),
            "raw": raw,
            "long": [long],
        }
        negatives, kinds = item_negatives(names, self._negatives_rng(index))
        meta.update(_negatives([items_caption(n) for n in negatives], kinds))
        return RawSample(image=Image.fromarray(canvas), caption=raw, meta=meta)

    def locate(self, index: int) -> str:
        return f"{self.split} {'mosaic' if self.mosaic else 'item'} {index}"

    def describe(self) -> dict[str, Any]:
        return {
            "type": "fashion-mnist",
            "idx_dir": str(self.idx_dir.resolve()),
            "split": self.split,
            "mosaic": self.mosaic,
            "num_samples": self.num_samples,
            "seed": self.seed,
            **({"captions": self.captions} if self.captions else {}),
            **({} if self.captions else {"negatives": NEGATIVES_VERSION}),
        }


def _negatives(captions: list[str], kinds: list[str]) -> dict[str, list[str]]:
    return {fmt.NEGATIVES_FIELD: captions, fmt.NEGATIVE_KINDS_FIELD: kinds}
