"""Stream an eval set's samples: decoded, preprocessed and batched by DataLoader workers."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torch import Tensor
from webdataset.tariterators import tarfile_samples

from eval.datasets import EvalSet
from eval.errors import UsageError
from vlp.data import format as fmt

IMAGE_KEYS = ("webp", "png", "jpg", "jpeg")
"""Image members in clip_benchmark's order of preference."""


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
    split = dataset.root / fmt.EVAL_SPLIT
    if count == 0:
        raise UsageError(f"{split}: empty split (no samples in the shards)")
    if dataset.expected_samples is not None and count != dataset.expected_samples:
        raise UsageError(
            f"{split}: read {count} samples but {fmt.SIZES_FILE} says {dataset.expected_samples};"
            " a shard is truncated or was replaced (check with `vlp-shard verify`)"
        )


def read_images(dataset: EvalSet, keys: set[str]) -> dict[str, Image.Image]:
    """The original (not preprocessed) images of the samples named by `keys`."""
    found = {}
    urls = ({"url": str(shard)} for shard in dataset.shards)
    for sample in tarfile_samples(urls):
        if sample["__key__"] in keys:
            image_key = next(k for k in IMAGE_KEYS if k in sample)
            with Image.open(io.BytesIO(sample[image_key])) as image:
                found[sample["__key__"]] = image.convert("RGB")
        if len(found) == len(keys):
            break
    return found


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
        except (tarfile.TarError, OSError, EOFError, ValueError) as err:
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
    if dataset.captioned:
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
