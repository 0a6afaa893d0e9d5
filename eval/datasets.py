"""Eval sets in clip_benchmark's local webdataset layout, read with webdataset.

    DIR/test/nshards.txt, DIR/test/0.tar ... DIR/test/{n-1}.tar
    DIR/dataset_type.txt                          classification (default) | retrieval
    DIR/classnames.txt                            classification: one class per line, label order
    DIR/zeroshot_classification_templates.txt     classification: one template per line, with {c}

Samples are `{key}.{webp|png|jpg|jpeg}` plus `{key}.cls` (the class index as text) or `{key}.txt`
(captions, one per line; any of them is a positive).
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor
from webdataset.tariterators import tarfile_samples

from eval.errors import UsageError
from vlp.data import format as fmt

IMAGE_KEYS = ("webp", "png", "jpg", "jpeg")
"""Image members in clip_benchmark's order of preference."""
KINDS = ("classification", "retrieval")


@dataclass(frozen=True)
class EvalSet:
    """An eval set's metadata; `read_batches` streams its samples."""

    root: Path
    kind: str
    """"classification" or "retrieval" (dataset_type.txt)."""
    shards: tuple[Path, ...]
    classnames: tuple[str, ...] = ()
    templates: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        """clip_benchmark's dataset name for this set (`--dataset wds/NAME`)."""
        return f"wds/{self.root.name}"


@dataclass
class Batch:
    """A batch as a DataLoader worker hands it over, samples in stream order."""

    positions: Tensor
    """(B,) index of each sample in the whole set (shard order, then order in the tar)."""
    keys: list[str]
    images: Tensor
    """(B, 3, H, W) after the model's preprocess."""
    targets: list[Any]
    """Per sample: the class index (classification) or the list of captions (retrieval)."""


def open_eval_set(root: Path, split: str = fmt.EVAL_SPLIT) -> EvalSet:
    """Read and check the set's metadata files; a usage error names what is missing."""
    if not root.is_dir():
        raise UsageError(f"{root}: no such dataset directory")
    shards = _shards(root / split)
    kind = _dataset_type(root)
    if kind == "retrieval":
        return EvalSet(root, kind, shards)
    classnames = _lines(root / fmt.CLASSNAMES_FILE, "one class name per line, in label order")
    templates = _lines(root / fmt.TEMPLATES_FILE, "one prompt per line, e.g. 'a photo of a {c}.'")
    for template in templates:
        if fmt.CLASS_PLACEHOLDER not in template:
            raise UsageError(
                f"{root / fmt.TEMPLATES_FILE}: template {template!r} has no "
                f"{fmt.CLASS_PLACEHOLDER} placeholder"
            )
    return EvalSet(root, kind, shards, tuple(classnames), tuple(templates))


def _shards(split_dir: Path) -> tuple[Path, ...]:
    nshards_file = split_dir / fmt.NSHARDS_FILE
    if not nshards_file.is_file():
        raise UsageError(
            f"{nshards_file}: missing; not an eval set in clip_benchmark's layout "
            "(make one with `vlp-shard eval-set`)"
        )
    text = nshards_file.read_text(encoding="utf-8").strip()
    if not text.isdigit():
        raise UsageError(f"{nshards_file}: expected the number of shards, found {text!r}")
    if int(text) == 0:
        raise UsageError(f"{split_dir}: empty split (nshards.txt says 0 shards)")
    shards = tuple(split_dir / fmt.EVAL_SHARD_NAME.format(index=i) for i in range(int(text)))
    missing = [s for s in shards if not s.is_file()]
    if missing:
        raise UsageError(f"{missing[0]}: missing ({len(missing)} of {len(shards)} shards absent)")
    return shards


def _dataset_type(root: Path) -> str:
    path = root / fmt.DATASET_TYPE_FILE
    # clip_benchmark treats a set without dataset_type.txt as classification
    kind = path.read_text(encoding="utf-8").strip().lower() if path.is_file() else "classification"
    if kind not in KINDS:
        raise UsageError(f"{path}: dataset type {kind!r} is not supported; expected {KINDS}")
    return kind


def _lines(path: Path, what: str) -> list[str]:
    if not path.is_file():
        raise UsageError(f"{path}: missing; a classification set needs it ({what})")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        raise UsageError(f"{path}: empty; expected {what}")
    return lines


def read_batches(
    dataset: EvalSet, preprocess: Callable, batch_size: int, workers: int
) -> Iterator[Batch]:
    """Decoded, preprocessed batches; workers decode interleaved samples of the stream.

    Batches arrive in no guaranteed order: use `Batch.positions` to restore the set's order.
    """
    samples = _Samples(dataset, preprocess)
    loader = torch.utils.data.DataLoader(
        samples, batch_size=batch_size, num_workers=workers, collate_fn=_collate
    )
    count = 0
    for batch in loader:
        if isinstance(batch, _Failure):
            raise UsageError(batch.message)
        count += len(batch.keys)
        yield batch
    if count == 0:
        raise UsageError(f"{dataset.root / fmt.EVAL_SPLIT}: empty split (no samples in the shards)")


class _Samples(torch.utils.data.IterableDataset):
    """Every worker reads the whole stream and decodes every num_workers-th sample.

    Splitting samples rather than shards keeps all workers busy on a one-shard set; reading
    tar bytes is cheap next to decoding and preprocessing the images.
    """

    def __init__(self, dataset: EvalSet, preprocess: Callable):
        self.dataset = dataset
        self.preprocess = preprocess

    def __iter__(self) -> Iterator[tuple[int, str, Tensor, Any] | _Failure]:
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        urls = ({"url": str(shard)} for shard in self.dataset.shards)
        stream = tarfile_samples(urls)
        position = 0
        try:
            for sample in stream:
                if position % num_workers == worker:
                    yield _decode(self.dataset, position, sample, self.preprocess)
                position += 1
        except (OSError, EOFError, ValueError) as err:  # tarfile.ReadError is an OSError
            yield _Failure(f"{self.dataset.root}: unreadable shard ({err})")
        except UsageError as err:
            # raised here, a worker's error would reach the user wrapped in its traceback
            yield _Failure(str(err))


@dataclass(frozen=True)
class _Failure:
    message: str


def _decode(
    dataset: EvalSet, position: int, sample: dict[str, Any], preprocess: Callable
) -> tuple[int, str, Tensor, Any]:
    key, url = sample["__key__"], sample["__url__"]
    where = f"{url}: sample {key}"
    image_key = next((k for k in IMAGE_KEYS if k in sample), None)
    if image_key is None:
        raise UsageError(f"{where}: no image member (found {_members(sample)})")
    try:
        with Image.open(io.BytesIO(sample[image_key])) as image:
            pixels = preprocess(image.convert("RGB"))
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise UsageError(f"{where}: cannot decode the {image_key} image ({err})") from err
    if dataset.kind == "retrieval":
        return position, key, pixels, _captions(sample, where)
    return position, key, pixels, _label(sample, where, len(dataset.classnames))


def _captions(sample: dict[str, Any], where: str) -> list[str]:
    if fmt.CAPTION_EXTENSION not in sample:
        raise UsageError(
            f"{where}: no .{fmt.CAPTION_EXTENSION} captions (found {_members(sample)}); "
            "is this a classification set? check dataset_type.txt"
        )
    text = sample[fmt.CAPTION_EXTENSION].decode("utf-8", "replace")
    # one caption per line; blank lines are not captions
    return [line.strip() for line in text.splitlines() if line.strip()]


def _label(sample: dict[str, Any], where: str, num_classes: int) -> int:
    if fmt.LABEL_EXTENSION not in sample:
        raise UsageError(
            f"{where}: no .{fmt.LABEL_EXTENSION} label (found {_members(sample)}); "
            "is this a retrieval set? check dataset_type.txt"
        )
    text = sample[fmt.LABEL_EXTENSION].decode("utf-8", "replace").strip()
    if not text.isdigit() or int(text) >= num_classes:
        raise UsageError(f"{where}: label {text!r} is not a class index below {num_classes}")
    return int(text)


def _members(sample: dict[str, Any]) -> str:
    return " ".join(f".{k}" for k in sorted(sample) if not k.startswith("__")) or "nothing"


def _collate(items: list[tuple[int, str, Tensor, Any] | _Failure]) -> Batch | _Failure:
    failure = next((item for item in items if isinstance(item, _Failure)), None)
    if failure is not None:
        return failure
    positions, keys, images, targets = zip(*items, strict=True)
    return Batch(torch.tensor(positions), list(keys), torch.stack(images), list(targets))
