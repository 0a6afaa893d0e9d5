"""Embed an eval set's images and any list of texts with an `EvalModel`.

With a `store` path the embeddings stream to a memory-mapped `.npy` file a batch at a time
(eval.embedding_store) and come back mapped, so sets whose embeddings exceed RAM can be encoded;
without one they are gathered in RAM. Both paths encode the same batches, so their rows are
identical.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from eval.datasets import EvalSet
from eval.embedding_store import EmbeddingWriter, open_embeddings
from eval.models import EvalModel
from eval.progress import progress
from eval.samples import read_batches

TEXT_TOKENS_PER_BATCH = 16384
"""Tokens per text batch (after padding is cut). On CPU, 256 full-length captions per batch
encode 2-3x faster per caption than 64; short captions get proportionally bigger batches."""
TEXT_BLOCK = 2**18
"""Texts tokenized, sorted by length and de-duplicated together: bounds the token memory
((block, context) int64) whatever the number of texts."""


@dataclass
class ImageEmbeddings:
    """An eval set's images in set order (shard order, then order within the tar)."""

    embeddings: Tensor
    """(N, D) L2-normalised."""
    keys: list[str]
    targets: list[Any]
    """Class index or list of captions, per image."""


def encode_images(
    model: EvalModel, dataset: EvalSet, batch_size: int, workers: int, store: Path | None = None
) -> ImageEmbeddings:
    """Embed every image of `dataset` with the model's own preprocess (to `store` if given)."""
    positions, keys, targets, chunks = [], [], [], []
    writer: EmbeddingWriter | None = None
    batches = read_batches(dataset, model.preprocess, batch_size, workers)
    for batch in progress(batches, f"{dataset.name} images", unit="batch"):
        embeddings = model.encode_images(batch.images)
        if store is None:
            chunks.append(embeddings)
        else:
            writer = writer or EmbeddingWriter(store, embeddings.shape[1])
            writer.write_at(batch.positions, embeddings)  # rows land in set order
        positions.append(batch.positions)
        keys.extend(batch.keys)
        targets.extend(batch.targets)
    # workers interleave batches: restore the set's order so results do not depend on them
    order = torch.cat(positions).argsort().tolist()
    if writer is not None:
        embeddings = open_embeddings(writer.close())
    else:
        embeddings = torch.cat(chunks)[order]
    return ImageEmbeddings(embeddings, [keys[i] for i in order], [targets[i] for i in order])


def encode_texts(
    model: EvalModel,
    texts: Sequence[str],
    tokens_per_batch: int = TEXT_TOKENS_PER_BATCH,
    store: Path | None = None,
) -> Tensor:
    """(len(texts), D) L2-normalised text embeddings (mapped from `store` if given).

    Texts are encoded a block of TEXT_BLOCK at a time; within a block, repeated texts are
    encoded once, and texts are sorted by length and batched by token count, so a batch of
    short captions holds many of them and models that skip trailing padding
    (`EvalModel.encode_tokens`) do little work on them.
    """
    blocks = range(0, len(texts), TEXT_BLOCK)
    if store is None:
        chunks = [_encode_block(model, texts[s : s + TEXT_BLOCK], tokens_per_batch) for s in blocks]
        return torch.cat(chunks) if chunks else torch.empty(0, 0)
    writer: EmbeddingWriter | None = None
    for start in progress(blocks, f"texts (blocks of {TEXT_BLOCK})", unit="block"):
        block = _encode_block(model, texts[start : start + TEXT_BLOCK], tokens_per_batch)
        writer = writer or EmbeddingWriter(store, block.shape[1])
        writer.write(start, block)
    return open_embeddings(writer.close()) if writer else torch.empty(0, 0)


def _encode_block(model: EvalModel, texts: Sequence[str], tokens_per_batch: int) -> Tensor:
    unique = list(dict.fromkeys(texts))
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
