"""Embed an eval set's images and any list of texts with an `EvalModel`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from eval.datasets import EvalSet
from eval.models import EvalModel
from eval.progress import progress
from eval.samples import read_batches

TEXT_TOKENS_PER_BATCH = 16384
"""Tokens per text batch (after padding is cut). On CPU, 256 full-length captions per batch
encode 2-3x faster per caption than 64; short captions get proportionally bigger batches."""


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


def encode_texts(
    model: EvalModel, texts: Sequence[str], tokens_per_batch: int = TEXT_TOKENS_PER_BATCH
) -> Tensor:
    """(len(texts), D) L2-normalised text embeddings; repeated texts are encoded once.

    Texts are sorted by length and batched by token count, so a batch of short captions
    holds many of them, and models that skip trailing padding (`EvalModel.encode_tokens`) do
    little work on them.
    """
    unique = list(dict.fromkeys(texts))
    if not unique:
        return torch.empty(0, 0)
    tokens = model.tokenizer(unique)  # (U, L)
    lengths = model.text_lengths(tokens)
    order = lengths.argsort(descending=True, stable=True)
    bounds = token_batches(lengths[order].tolist(), tokens_per_batch)
    chunks = [
        model.encode_tokens(tokens[order[start:end]])
        for start, end in progress(bounds, "texts", unit="batch")
    ]
    by_unique = torch.cat(chunks)[order.argsort()]  # rows back in `unique` order
    row = {text: i for i, text in enumerate(unique)}
    return by_unique[[row[text] for text in texts]]


def token_batches(lengths: list[int], tokens_per_batch: int) -> list[tuple[int, int]]:
    """(start, end) of consecutive batches of `lengths` (longest first), each padded to its
    first row's length and holding at most tokens_per_batch tokens (at least one row)."""
    bounds, start = [], 0
    while start < len(lengths):
        end = min(len(lengths), start + max(1, tokens_per_batch // max(lengths[start], 1)))
        bounds.append((start, end))
        start = end
    return bounds
