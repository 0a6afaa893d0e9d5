"""Classification and retrieval metrics on logits and embeddings whose answers are known."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from eval.retrieval import (
    NO_HIT,
    exact_ranks,
    faiss_ranks,
    retrieval_recalls,
)
from eval.zero_shot import class_weights, classification_metrics


def test_top1_top5_and_recall_on_known_logits():
    # 6 classes; sample i's label sits at rank i among the logits (0 = best)
    labels = torch.tensor([0, 1, 2, 3, 4, 5])
    logits = torch.stack([_logits_with_label_rank(6, label, rank=label) for label in range(6)])
    scores = classification_metrics(logits, labels)
    assert scores.acc1 == pytest.approx(1 / 6)
    assert scores.acc5 == pytest.approx(5 / 6)
    assert scores.per_class_recall == [1.0, 0, 0, 0, 0, 0]
    assert scores.mean_per_class_recall == pytest.approx(1 / 6)


def _logits_with_label_rank(num_classes: int, label: int, rank: int) -> torch.Tensor:
    """Logits where `label` is the (rank+1)-th best class, no ties."""
    others = [c for c in range(num_classes) if c != label]
    order = others[:rank] + [label] + others[rank:]
    logits = torch.empty(num_classes)
    logits[torch.tensor(order)] = torch.arange(num_classes, 0, -1).float()
    return logits


def test_acc5_is_nan_below_5_classes():
    logits = torch.eye(4)
    scores = classification_metrics(logits, torch.arange(4))
    assert scores.acc1 == 1.0 and math.isnan(scores.acc5)
    assert not math.isnan(classification_metrics(torch.eye(5), torch.arange(5)).acc5)


def test_mean_per_class_recall_on_an_imbalanced_set_is_balanced_accuracy():
    from sklearn.metrics import balanced_accuracy_score

    # class 0: 8 samples, all right; class 1: 2 samples, 1 right; class 2: no samples
    labels = torch.tensor([0] * 8 + [1, 1])
    predicted = torch.tensor([0] * 8 + [1, 0])
    logits = F.one_hot(predicted, 3).float()
    scores = classification_metrics(logits, labels)
    assert scores.acc1 == pytest.approx(0.9)
    assert scores.mean_per_class_recall == pytest.approx(0.75)
    assert scores.mean_per_class_recall == pytest.approx(
        balanced_accuracy_score(labels.numpy(), predicted.numpy())
    )
    assert scores.per_class_recall[:2] == [1.0, 0.5] and math.isnan(scores.per_class_recall[2])


def test_ties_count_against_the_model():
    logits = torch.zeros(4, 6)  # a collapsed model: every class scores the same
    scores = classification_metrics(logits, torch.tensor([0, 1, 2, 3]))
    assert scores.acc1 == 0.0 and scores.acc5 == 0.0


def test_class_weights_mean_of_normalised_templates_renormalised():
    templates = F.normalize(
        torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [1.0, 0.0]]]), dim=-1
    )
    weights = class_weights(templates)
    torch.testing.assert_close(weights[0], torch.tensor([1.0, 1.0]) / math.sqrt(2))
    torch.testing.assert_close(weights[1], torch.tensor([1.0, 0.0]))


# ---- retrieval


def _captions_of(images_per_caption: list[int]) -> torch.Tensor:
    return torch.tensor(images_per_caption, dtype=torch.long)


def test_exactly_right_embeddings_give_recall_1():
    images = torch.eye(6)
    owners = _captions_of([0, 0, 1, 2, 3, 4, 5, 5, 5])  # several captions per image
    metrics = retrieval_recalls(images, images[owners], owners)
    assert all(value == 1.0 for value in metrics.values())
    assert list(metrics) == [
        "image_retrieval_recall@1", "text_retrieval_recall@1",
        "image_retrieval_recall@5", "text_retrieval_recall@5",
        "image_retrieval_recall@10", "text_retrieval_recall@10",
    ]  # fmt: skip


def test_exactly_wrong_embeddings_give_recall_0_at_1():
    images = torch.eye(5)
    owners = torch.arange(5)
    texts = images.roll(1, dims=0)  # caption i is exactly image i - 1
    metrics = retrieval_recalls(images, texts, owners, ks=(1,))
    assert metrics == {"image_retrieval_recall@1": 0.0, "text_retrieval_recall@1": 0.0}


def test_known_ranks_give_known_recalls():
    # caption i scores 0.05 with its own image and more with ranks[i] other images
    ranks = [5, 0, 11, 3, 1, 8, 2, 10, 4, 7, 9, 6]
    images = torch.eye(12, dtype=torch.float64)
    coefficients = 0.05 * torch.eye(12, dtype=torch.float64)  # (caption, image)
    for i, rank in enumerate(ranks):
        for m in range(rank):
            coefficients[i, (i + 1 + m) % 12] = 1 - 0.05 * m
    texts, owners = coefficients @ images, torch.arange(12)
    assert exact_ranks(texts, images, (owners, owners)).tolist() == ranks
    # image j: its caption scores 0.05; every caption that put j above its own image beats it
    image_ranks = [(coefficients[:, j] > 0.05).sum().item() for j in range(12)]
    metrics = retrieval_recalls(images, texts, owners, ks=(1, 5, 10))
    for k in (1, 5, 10):
        assert metrics[f"image_retrieval_recall@{k}"] == pytest.approx(
            sum(r < k for r in ranks) / 12
        )
        expected = sum(r < k for r in image_ranks) / 12
        assert metrics[f"text_retrieval_recall@{k}"] == pytest.approx(expected)
    assert metrics["image_retrieval_recall@5"] == pytest.approx(5 / 12)


def test_text_retrieval_hits_if_any_caption_is_in_the_top_k():
    images = torch.eye(3)
    # image 0 has a bad caption (it is image 1) and a good one; image 1 only a bad one
    texts = torch.stack([images[1], images[0], 0.5 * images[2], images[2]])
    owners = _captions_of([0, 0, 1, 2])
    metrics = retrieval_recalls(images, texts, owners, ks=(1,))
    # image→text: image 0 finds its good caption; image 1 finds none; image 2 does
    assert metrics["text_retrieval_recall@1"] == pytest.approx(2 / 3)
    # text→image: captions 1 and 3 find their image
    assert metrics["image_retrieval_recall@1"] == pytest.approx(2 / 4)


def test_an_image_without_captions_is_a_miss_for_every_k():
    images = torch.eye(3)
    owners = _captions_of([0, 1])
    ranks = exact_ranks(images, images[owners], (owners, torch.arange(2)))
    assert ranks.tolist() == [0, 0, NO_HIT]


def test_chunked_exact_and_faiss_ranks_agree_on_random_embeddings():
    generator = torch.Generator().manual_seed(0)
    images = F.normalize(torch.randn(300, 16, generator=generator), dim=1)
    owners = torch.arange(300).repeat_interleave(3)
    texts = F.normalize(images[owners] + 0.8 * torch.randn(900, 16, generator=generator), dim=1)
    positives = (torch.arange(900), owners)
    whole = exact_ranks(texts, images, positives, chunk_size=900)
    assert torch.equal(exact_ranks(texts, images, positives, chunk_size=7), whole)
    flat = faiss_ranks(texts, images, positives, max_k=10)
    for k in (1, 5, 10):
        assert torch.equal(whole < k, flat < k)
    ivf = faiss_ranks(texts, images, positives, max_k=10, inverted_file=True)
    assert ((ivf < 10).float().mean() - (whole < 10).float().mean()).abs() < 0.05


def test_exact_recall_matches_clip_benchmark_recall_at_k():
    from clip_benchmark.metrics.zeroshot_retrieval import recall_at_k

    generator = torch.Generator().manual_seed(1)
    images = F.normalize(torch.randn(50, 8, generator=generator), dim=1)
    owners = torch.arange(50).repeat_interleave(2)
    texts = F.normalize(images[owners] + torch.randn(100, 8, generator=generator), dim=1)
    scores = texts @ images.T
    positive = torch.zeros_like(scores, dtype=torch.bool)
    positive[torch.arange(100), owners] = True
    ours = retrieval_recalls(images, texts, owners)
    for k in (1, 5, 10):
        theirs_t2i = (recall_at_k(scores, positive, k) > 0).float().mean().item()
        theirs_i2t = (recall_at_k(scores.T, positive.T, k) > 0).float().mean().item()
        assert ours[f"image_retrieval_recall@{k}"] == pytest.approx(theirs_t2i)
        assert ours[f"text_retrieval_recall@{k}"] == pytest.approx(theirs_i2t)
