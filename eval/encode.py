"""Embed an eval set's images and any list of texts with an `EvalModel`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from eval.datasets import EvalSet
from eval.models import EvalModel, prefix_lengths
from eval.progress import progress
from eval.samples import read_batches


@dataclass
class ImageEmbeddings:
    """An eval set's images in set order (shard order, then order within the tar)."""

    embeddings: Tensor
    """(N, D) L2-normalised."""
    keys: list[str]
    targets: list[Any]
    """Class index or list of captions, per image."""


def encode_images(
    model: EvalModel, dataset: EvalSet, batch_size: int, workers: int
) -> ImageEmbeddings:
    """Embed every image of `dataset` with the model's own preprocess."""
    positions, keys, targets, chunks = [], [], [], []
    batches = read_batches(dataset, model.preprocess, batch_size, workers)
    for batch in progress(batches, f"{dataset.name} images", unit="batch"):
        chunks.append(model.encode_images(batch.images))
        positions.append(batch.positions)
        keys.extend(batch.keys)
        targets.extend(batch.targets)
    # workers interleave batches: restore the set's order so results do not depend on them
    order = torch.cat(positions).argsort().tolist()
    embeddings = torch.cat(chunks)[order]
    return ImageEmbeddings(embeddings, [keys[i] for i in order], [targets[i] for i in order])


def encode_texts(model: EvalModel, texts: Sequence[str], batch_size: int) -> Tensor:
    """(len(texts), D) L2-normalised text embeddings; repeated texts are encoded once.

    Texts are batched by token length so that models which skip trailing padding (see
    `EvalModel.encode_tokens`) do little work on short captions.
    """
    unique = list(dict.fromkeys(texts))
    if not unique:
        return torch.empty(0, 0)
    tokens = model.tokenizer(unique)  # (U, L)
    order = prefix_lengths(tokens).argsort(descending=True)
    starts = range(0, len(unique), batch_size)
    chunks = [
        model.encode_tokens(tokens[order[start : start + batch_size]])
        for start in progress(starts, "texts", total=len(starts), unit="batch")
    ]
    by_unique = torch.cat(chunks)[order.argsort()]  # rows back in `unique` order
    row = {text: i for i, text in enumerate(unique)}
    return by_unique[[row[text] for text in texts]]
