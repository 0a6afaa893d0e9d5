"""Zero-shot classification with clip_benchmark's metric names and semantics.

Class embedding = mean of the L2-normalised template embeddings, renormalised; logits =
100 * image @ class_embeddingsᵀ. `acc1`, `acc5` (NaN with fewer than 5 classes) and
`mean_per_class_recall` (balanced accuracy: mean over the classes that have samples).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from eval.datasets import EvalSet
from eval.encode import ImageEmbeddings, encode_images, encode_texts
from eval.models import EvalModel
from eval.options import EvalOptions
from eval.results import EvalResult
from vlp.data.format import CLASS_PLACEHOLDER

LOGIT_SCALE = 100.0
"""clip_benchmark's fixed scale; it changes no metric, only what logits look like."""
TASK = "zeroshot_classification"


def class_weights(template_embeddings: Tensor) -> Tensor:
    """(C, T, D) L2-normalised template embeddings -> (C, D) class embeddings."""
    return F.normalize(template_embeddings.mean(dim=1), dim=-1)


def zero_shot_classifier(
    model: EvalModel, classnames: Sequence[str], templates: Sequence[str]
) -> Tensor:
    """(C, D) class embeddings from every template filled with every class name."""
    prompts = [t.replace(CLASS_PLACEHOLDER, name) for name in classnames for t in templates]
    embeddings = encode_texts(model, prompts)  # (C * T, D)
    return class_weights(embeddings.view(len(classnames), len(templates), -1))


@dataclass
class ClassificationScores:
    acc1: float
    acc5: float
    mean_per_class_recall: float
    per_class_recall: list[float]
    """Recall of each class; NaN for a class without samples."""
    predictions: Tensor
    """(N,) argmax class (first of tied maxima), for confusion matrices."""


def classification_metrics(logits: Tensor, labels: Tensor) -> ClassificationScores:
    """Metrics of (N, C) logits against (N,) labels.

    A sample is counted in top-k when fewer than k other classes score at least as high as
    its label: ties count against the model, so a collapsed model scores 0, not chance.
    """
    num_classes = logits.shape[1]
    label_logit = logits.gather(1, labels[:, None])  # (N, 1)
    rank = (logits >= label_logit).sum(dim=1) - 1  # other classes at least as high
    correct = rank == 0
    recalls = [
        correct[labels == c].float().mean().item() if (labels == c).any() else math.nan
        for c in range(num_classes)
    ]
    present = [r for r in recalls if not math.isnan(r)]
    return ClassificationScores(
        acc1=correct.float().mean().item(),
        acc5=(rank < 5).float().mean().item() if num_classes >= 5 else math.nan,
        mean_per_class_recall=sum(present) / len(present),
        per_class_recall=recalls,
        predictions=logits.argmax(dim=1),
    )


@dataclass
class ClassificationOutputs:
    """Everything a zero-shot run computed; reports draw from it."""

    images: ImageEmbeddings
    class_embeddings: Tensor
    """(C, D) L2-normalised."""
    labels: Tensor
    scores: ClassificationScores


def run_zeroshot_classification(
    model: EvalModel, dataset: EvalSet, options: EvalOptions
) -> ClassificationOutputs:
    images = encode_images(model, dataset, options.batch_size, options.workers)
    weights = zero_shot_classifier(model, dataset.classnames, dataset.templates)
    labels = torch.tensor(images.targets, dtype=torch.long)
    scores = classification_metrics(LOGIT_SCALE * images.embeddings @ weights.T, labels)
    return ClassificationOutputs(images, weights, labels, scores)


def classification_result(dataset: EvalSet, outputs: ClassificationOutputs) -> EvalResult:
    scores = outputs.scores
    counts = torch.bincount(outputs.labels, minlength=len(dataset.classnames)).tolist()
    return EvalResult(
        dataset=dataset.name,
        task=TASK,
        metrics={
            "acc1": scores.acc1,
            "acc5": scores.acc5,
            "mean_per_class_recall": scores.mean_per_class_recall,
        },
        details={
            "num_samples": len(outputs.labels),
            "num_classes": len(dataset.classnames),
            "per_class_recall": dict(zip(dataset.classnames, scores.per_class_recall, strict=True)),
            "per_class_samples": dict(zip(dataset.classnames, counts, strict=True)),
            "dataset_root": str(dataset.root),
        },
    )


def evaluate_zeroshot_classification(
    model: EvalModel, dataset: EvalSet, options: EvalOptions
) -> EvalResult:
    return classification_result(dataset, run_zeroshot_classification(model, dataset, options))
