"""Zero-shot retrieval with clip_benchmark's metric names and semantics.

`image_retrieval_recall@k`: a caption finds its image among the top k images (text→image).
`text_retrieval_recall@k`: an image finds any of its captions among the top k captions
(image→text). Both are hit rates averaged over the queries, as in CLIP papers.

Scoring is exact by default: queries are scored against the whole gallery a chunk at a time,
so memory is chunk × N, never N × N. Past `faiss_threshold` gallery items, `auto` switches to
faiss's inverted-file index (approximate, sub-quadratic); `faiss` is faiss's exact
inner-product index.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from eval.datasets import EvalSet
from eval.embedding_store import release
from eval.encode import ImageEmbeddings, encode_images, encode_texts
from eval.exact_search import NO_HIT, exact_ranks
from eval.geometry import geometry_metrics
from eval.models import EvalModel
from eval.options import EvalOptions
from eval.results import EvalResult

TASK = "zeroshot_retrieval"
METHODS = ("auto", "exact", "faiss", "faiss-ivf")
FAISS_QUERY_CHUNK = 65536
FAISS_ADD_BLOCK = 65536
"""Gallery rows handed to a faiss index at a time (a mapped gallery stays one block resident)."""
GEOMETRY_MAX_PAIRS = 100_000
"""Geometry metrics use at most this many (image, first caption) pairs, a seeded sample: their
uniformity is O(N²) and the separability probe holds every pair in RAM."""


def choose_method(method: str, gallery_size: int, faiss_threshold: int) -> str:
    if method != "auto":
        return method
    return "faiss-ivf" if gallery_size >= faiss_threshold else "exact"


def faiss_ranks(
    queries: Tensor,
    gallery: Tensor,
    positives: tuple[Tensor, Tensor],
    max_k: int,
    inverted_file: bool = False,
    seed: int = 0,
) -> Tensor:
    """(Q,) position of the first positive among faiss's top max_k results (NO_HIT if none)."""
    index = faiss_index(gallery, inverted_file, seed)
    return faiss_search_ranks(index, queries, positives, max_k)


def faiss_index(gallery: Tensor, inverted_file: bool = False, seed: int = 0):
    """faiss's exact inner-product index, or its IVF index, holding a copy of the gallery."""
    import faiss

    index = _ivf_index(gallery, seed) if inverted_file else faiss.IndexFlatIP(gallery.shape[1])
    for start in range(0, len(gallery), FAISS_ADD_BLOCK):
        block = gallery[start : start + FAISS_ADD_BLOCK]
        index.add(np.ascontiguousarray(block.numpy(), dtype=np.float32))  # the index copies it
        release(block)
    return index


def faiss_search_ranks(
    index, queries: Tensor, positives: tuple[Tensor, Tensor], max_k: int
) -> Tensor:
    """(Q,) position of the first positive among `index`'s top max_k results (NO_HIT if none)."""
    pair_query, pair_gallery = positives
    num_gallery = index.ntotal
    positive_codes = (pair_query * num_gallery + pair_gallery).sort().values
    ranks = []
    for start in range(0, queries.shape[0], FAISS_QUERY_CHUNK):
        chunk = np.ascontiguousarray(queries[start : start + FAISS_QUERY_CHUNK].numpy())
        _, found = index.search(chunk, min(max_k, num_gallery))  # (c, k), -1 when short
        found = torch.from_numpy(found)
        query_ids = torch.arange(start, start + len(chunk))[:, None]
        hit = torch.isin(query_ids * num_gallery + found, positive_codes) & (found >= 0)
        ranks.append(torch.where(hit.any(dim=1), hit.int().argmax(dim=1), NO_HIT))
    return torch.cat(ranks)


def _ivf_index(gallery: Tensor, seed: int):
    """An inverted-file index with about 4·√N lists, trained on a seeded sample."""
    import faiss

    size, dim = gallery.shape
    num_lists = max(1, min(int(4 * math.sqrt(size)), size // 39))
    index = faiss.index_factory(dim, f"IVF{num_lists},Flat", faiss.METRIC_INNER_PRODUCT)
    sample = np.random.default_rng(seed).choice(size, min(size, 64 * num_lists), replace=False)
    index.train(np.ascontiguousarray(gallery[torch.from_numpy(np.sort(sample))].numpy()))
    release(gallery)
    # √(lists) probes: a query scans the 4·√N centroids and about N^(3/4)/2 items, so a whole
    # evaluation grows like N^1.75 instead of N²; bench/retrieval_scale.py measures the recall
    # this costs
    index.nprobe = min(num_lists, max(8, math.ceil(math.sqrt(num_lists))))
    return index


def retrieval_ranks(
    queries: Tensor,
    gallery: Tensor,
    positives: tuple[Tensor, Tensor],
    method: str,
    max_k: int,
    seed: int = 0,
) -> Tensor:
    """Ranks by `method` ("exact", "faiss", "faiss-ivf"); compare them with k ≤ max_k only."""
    if method == "exact":
        return exact_ranks(queries, gallery, positives)
    if method in ("faiss", "faiss-ivf"):
        return faiss_ranks(queries, gallery, positives, max_k, method == "faiss-ivf", seed)
    raise ValueError(f"unknown retrieval method {method!r}; expected one of {METHODS}")


def retrieval_recalls(
    image_embeddings: Tensor,
    text_embeddings: Tensor,
    text_to_image: Tensor,
    ks: Sequence[int] = (1, 5, 10),
    method: str = "exact",
    seed: int = 0,
) -> dict[str, float]:
    """clip_benchmark's recall@k both ways; caption t belongs to image text_to_image[t]."""
    texts = torch.arange(len(text_to_image))
    text_to_image_ranks = retrieval_ranks(
        text_embeddings, image_embeddings, (texts, text_to_image), method, max(ks), seed
    )
    image_to_text_ranks = retrieval_ranks(
        image_embeddings, text_embeddings, (text_to_image, texts), method, max(ks), seed
    )
    metrics = {}
    for k in ks:
        metrics[f"image_retrieval_recall@{k}"] = recall_at_k(text_to_image_ranks, k)
        metrics[f"text_retrieval_recall@{k}"] = recall_at_k(image_to_text_ranks, k)
    return metrics


def recall_at_k(ranks: Tensor, k: int) -> float:
    return (ranks < k).float().mean().item()


def top_matches(queries: Tensor, gallery: Tensor, k: int) -> Tensor:
    """(Q, k) indices of each query's k best gallery items, best first."""
    return (queries @ gallery.T).topk(min(k, gallery.shape[0]), dim=1).indices


@dataclass
class RetrievalOutputs:
    """Everything a retrieval run computed; reports draw from it."""

    images: ImageEmbeddings
    captions: list[str]
    text_embeddings: Tensor
    """(M, D) L2-normalised, one row per caption."""
    text_to_image: Tensor
    """(M,) image index of each caption."""

    def first_caption_pairs(self, seed: int = 0) -> tuple[Tensor, Tensor]:
        """(P, D) image and (P, D) text embeddings: each captioned image with its first caption
        (a seeded sample of GEOMETRY_MAX_PAIRS images when there are more)."""
        first = torch.full((len(self.images.keys),), -1, dtype=torch.long)
        texts = torch.arange(len(self.text_to_image))
        first = first.scatter_reduce(0, self.text_to_image, texts, "min", include_self=False)
        images = (first >= 0).nonzero().flatten()
        if len(images) > GEOMETRY_MAX_PAIRS:
            picked = np.random.default_rng(seed).choice(len(images), GEOMETRY_MAX_PAIRS, False)
            images = images[torch.from_numpy(np.sort(picked))]
        return self.images.embeddings[images], self.text_embeddings[first[images]]


def run_zeroshot_retrieval(
    model: EvalModel, dataset: EvalSet, options: EvalOptions
) -> RetrievalOutputs:
    """Image and caption embeddings, memory-mapped under options.embeddings_dir if it is set."""
    stores = embedding_paths(options.embeddings_dir, dataset)
    images = encode_images(model, dataset, options.batch_size, options.workers, stores[0])
    captions = [caption for image_captions in images.targets for caption in image_captions]
    owners = [i for i, image_captions in enumerate(images.targets) for _ in image_captions]
    texts = encode_texts(model, captions, store=stores[1])
    return RetrievalOutputs(images, captions, texts, torch.tensor(owners, dtype=torch.long))


def embedding_paths(
    directory: str | None, dataset: EvalSet
) -> tuple[Path, Path] | tuple[None, None]:
    """Where a set's image and caption embeddings are written (None, None: kept in RAM)."""
    if directory is None:
        return None, None
    stem = Path(directory) / dataset.root.name
    return stem.with_name(f"{stem.name}_images.npy"), stem.with_name(f"{stem.name}_texts.npy")


def retrieval_result(
    dataset: EvalSet, outputs: RetrievalOutputs, options: EvalOptions
) -> EvalResult:
    """Recall@k both ways, plus the geometry of the (image, first caption) pairs."""
    method = choose_method(
        options.retrieval_method,
        max(len(outputs.captions), len(outputs.images.keys)),
        options.faiss_threshold,
    )
    metrics = retrieval_recalls(
        outputs.images.embeddings, outputs.text_embeddings, outputs.text_to_image,
        options.recall_ks, method, options.seed,
    )  # fmt: skip
    pairs = outputs.first_caption_pairs(options.seed)
    metrics.update(geometry_metrics(*pairs, seed=options.seed))
    captioned = int(outputs.text_to_image.unique().numel())
    details = {
        "num_images": len(outputs.images.keys),
        "num_captions": len(outputs.captions),
        "retrieval_method": method,
        "geometry_pairs": "each image with its first caption"
        + (f" (a seeded sample of {len(pairs[0])})" if len(pairs[0]) < captioned else ""),
        "dataset_root": str(dataset.root),
    }
    if options.embeddings_dir is not None:
        details["embeddings_dir"] = options.embeddings_dir  # the memory-mapped .npy files
    return EvalResult(dataset.name, TASK, metrics, details)


def evaluate_zeroshot_retrieval(
    model: EvalModel, dataset: EvalSet, options: EvalOptions
) -> EvalResult:
    return retrieval_result(dataset, run_zeroshot_retrieval(model, dataset, options), options)
