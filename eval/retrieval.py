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

import numpy as np
import torch
from torch import Tensor

from eval.datasets import EvalSet
from eval.encode import ImageEmbeddings, encode_images, encode_texts
from eval.geometry import geometry_metrics
from eval.models import EvalModel
from eval.options import EvalOptions
from eval.results import EvalResult

TASK = "zeroshot_retrieval"
METHODS = ("auto", "exact", "faiss", "faiss-ivf")
NO_HIT = torch.iinfo(torch.long).max
"""Rank of a query whose positives are absent (or, for faiss, not among the top k)."""
SCORE_MEMORY_BYTES = 256 * 2**20
"""Budget for one chunk of exact scores (float32, compared in place)."""
FAISS_QUERY_CHUNK = 65536


def choose_method(method: str, gallery_size: int, faiss_threshold: int) -> str:
    if method != "auto":
        return method
    return "faiss-ivf" if gallery_size >= faiss_threshold else "exact"


def exact_ranks(
    queries: Tensor, gallery: Tensor, positives: tuple[Tensor, Tensor], chunk_size: int = 0
) -> Tensor:
    """(Q,) rank of each query's best-scoring positive among the (G,) gallery items.

    rank = the number of non-positive gallery items scoring at least as high as the best
    positive (ties count against the model); a hit at k means rank < k. `positives` are the
    unique pairs (query index, gallery index). chunk_size 0 picks it from SCORE_MEMORY_BYTES.
    """
    pair_query, pair_gallery = positives
    num_queries, num_gallery = queries.shape[0], gallery.shape[0]
    chunk = chunk_size or max(1, SCORE_MEMORY_BYTES // (4 * max(num_gallery, 1)))
    order = pair_query.argsort(stable=True)  # pairs by query: each chunk's pairs are a slice
    pair_query, pair_gallery = pair_query[order], pair_gallery[order]
    ranks = torch.full((num_queries,), NO_HIT, dtype=torch.long)
    for start in range(0, num_queries, chunk):
        end = min(start + chunk, num_queries)
        scores = queries[start:end] @ gallery.T  # (c, G)
        low, high = torch.searchsorted(pair_query, torch.tensor([start, end])).tolist()
        rows, columns = pair_query[low:high] - start, pair_gallery[low:high]
        positive_scores = scores[rows, columns]
        best = torch.full((end - start,), -math.inf, dtype=scores.dtype)
        best = best.scatter_reduce(0, rows, positive_scores, "amax")
        # in place and summed as floats: 3-4x faster than a bool mask summed as int64;
        # float32 counts are exact below 2**24 gallery items
        count_dtype = torch.float32 if num_gallery < 2**24 else torch.float64
        at_least_best = scores.ge_(best[:, None]).sum(dim=1, dtype=count_dtype).long()
        # positives tied with the best one are not competitors
        tied = torch.zeros(end - start, dtype=torch.long)
        tied = tied.scatter_add(0, rows, (positive_scores >= best[rows]).long())
        has_positive = torch.zeros(end - start, dtype=torch.bool)
        has_positive[rows] = True
        ranks[start:end] = torch.where(has_positive, at_least_best - tied, NO_HIT)
        del scores  # before the next chunk's scores exist: one chunk in memory at a time
    return ranks


def faiss_ranks(
    queries: Tensor,
    gallery: Tensor,
    positives: tuple[Tensor, Tensor],
    max_k: int,
    inverted_file: bool = False,
    seed: int = 0,
) -> Tensor:
    """(Q,) position of the first positive among faiss's top max_k results (NO_HIT if none)."""
    import faiss

    gallery_np = np.ascontiguousarray(gallery.numpy(), dtype=np.float32)
    index = _ivf_index(gallery_np, seed) if inverted_file else faiss.IndexFlatIP(gallery.shape[1])
    index.add(gallery_np)
    pair_query, pair_gallery = positives
    num_gallery = gallery.shape[0]
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


def _ivf_index(gallery: np.ndarray, seed: int):
    """An inverted-file index with about 4·√N lists, trained on a seeded sample."""
    import faiss

    size, dim = gallery.shape
    num_lists = max(1, min(int(4 * math.sqrt(size)), size // 39))
    index = faiss.index_factory(dim, f"IVF{num_lists},Flat", faiss.METRIC_INNER_PRODUCT)
    sample = np.random.default_rng(seed).choice(size, min(size, 64 * num_lists), replace=False)
    index.train(gallery[np.sort(sample)])
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

    def first_caption_pairs(self) -> tuple[Tensor, Tensor]:
        """(P, D) image and (P, D) text embeddings: each captioned image with its first caption."""
        first = torch.full((len(self.images.keys),), -1, dtype=torch.long)
        texts = torch.arange(len(self.text_to_image))
        first = first.scatter_reduce(0, self.text_to_image, texts, "min", include_self=False)
        has_caption = first >= 0
        return self.images.embeddings[has_caption], self.text_embeddings[first[has_caption]]


def run_zeroshot_retrieval(
    model: EvalModel, dataset: EvalSet, options: EvalOptions
) -> RetrievalOutputs:
    images = encode_images(model, dataset, options.batch_size, options.workers)
    captions = [caption for image_captions in images.targets for caption in image_captions]
    owners = [i for i, image_captions in enumerate(images.targets) for _ in image_captions]
    texts = encode_texts(model, captions)
    return RetrievalOutputs(images, captions, texts, torch.tensor(owners, dtype=torch.long))


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
    metrics.update(geometry_metrics(*outputs.first_caption_pairs(), seed=options.seed))
    details = {
        "num_images": len(outputs.images.keys),
        "num_captions": len(outputs.captions),
        "retrieval_method": method,
        "geometry_pairs": "each image with its first caption",
        "dataset_root": str(dataset.root),
    }
    return EvalResult(dataset.name, TASK, metrics, details)


def evaluate_zeroshot_retrieval(
    model: EvalModel, dataset: EvalSet, options: EvalOptions
) -> EvalResult:
    return retrieval_result(dataset, run_zeroshot_retrieval(model, dataset, options), options)
