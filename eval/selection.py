"""Image-caption selection (SugarCrepe; clip_benchmark's `image_caption_selection` task).

Each image of a selection set comes with its true caption (the `.txt`'s first line) and one or
more hard negatives of one kind (the other lines). The model scores every caption against its
image (cosine of the embeddings); an image is a hit when its true caption scores strictly
highest. Metrics, named as clip_benchmark writes them:

- `acc`: the hit rate (clip_benchmark: text and image both right; with one image per item the
  image side always is, so it equals `text_acc`);
- `text_acc`: the hit rate of image -> caption selection;
- `image_acc`: caption -> image selection, 1 by construction with one image per item.

clip_benchmark picks the first caption on an exact tie (torch's argmax); vlp counts a tie as a
miss, so a degenerate model that scores every caption alike gets 0, not 1 (`details.ties` says
how many items tied). One set per kind of negative, as in SugarCrepe and clip_benchmark; when
several sets of one directory (e.g. eval/binding/*) are evaluated together, `overall_results`
adds their mean as one more result named after that directory.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from eval.datasets import SELECTION, EvalSet
from eval.encode import encode_images, encode_texts
from eval.errors import UsageError
from eval.models import EvalModel
from eval.options import EvalOptions
from eval.results import EvalResult

TASK = SELECTION
METRICS = ("acc", "text_acc", "image_acc")


def selection_hits(
    image_emb: Tensor, text_emb: Tensor, owners: Tensor, is_true: Tensor
) -> tuple[Tensor, Tensor]:
    """((N,) bool hits, (N,) bool ties) of N images.

    image_emb (N, D), text_emb (M, D) L2-normalised; caption m belongs to image owners[m];
    is_true[m] marks each image's true caption (one per image, at least one negative each).
    """
    scores = (text_emb * image_emb[owners]).sum(dim=1)  # (M,) each caption against its image
    num_images = image_emb.shape[0]
    true_score = torch.zeros(num_images, dtype=scores.dtype).index_put_(
        (owners[is_true],), scores[is_true]
    )
    best_negative = torch.full((num_images,), -torch.inf, dtype=scores.dtype)
    best_negative = best_negative.scatter_reduce(0, owners[~is_true], scores[~is_true], "amax")
    return true_score > best_negative, true_score == best_negative


@dataclass
class SelectionOutputs:
    """Everything a selection run computed; reports draw examples from it."""

    keys: list[str]
    captions: list[list[str]]
    """Per image: the true caption, then its negatives."""
    scores: list[list[float]]
    """Per image: each caption's cosine with the image, in the same order."""
    hits: Tensor
    ties: Tensor


def run_selection(model: EvalModel, dataset: EvalSet, options: EvalOptions) -> SelectionOutputs:
    images = encode_images(model, dataset, options.batch_size, options.workers)
    for key, captions in zip(images.keys, images.targets, strict=True):
        if len(captions) < 2:
            raise UsageError(
                f"{dataset.root}: item {key} has {len(captions)} caption; a selection set lists "
                "the true caption, then at least one negative, one per line of its .txt"
            )
    captions = [caption for item in images.targets for caption in item]
    owners = torch.tensor([i for i, item in enumerate(images.targets) for _ in item])
    is_true = torch.tensor([k == 0 for item in images.targets for k in range(len(item))])
    text_emb = encode_texts(model, captions)
    hits, ties = selection_hits(images.embeddings, text_emb, owners, is_true)
    scores = (
        (text_emb * images.embeddings[owners])
        .sum(dim=1)
        .split([len(item) for item in images.targets])
    )
    return SelectionOutputs(images.keys, images.targets, [s.tolist() for s in scores], hits, ties)


def selection_result(dataset: EvalSet, outputs: SelectionOutputs) -> EvalResult:
    accuracy = outputs.hits.float().mean().item()
    details = {
        "num_images": len(outputs.keys),
        "num_negatives": sum(len(c) - 1 for c in outputs.captions),
        "ties": int(outputs.ties.sum()),
        "dataset_root": str(dataset.root),
    }
    metrics = {"acc": accuracy, "text_acc": accuracy, "image_acc": 1.0}
    return EvalResult(dataset.name, TASK, metrics, details)


def evaluate_image_caption_selection(
    model: EvalModel, dataset: EvalSet, options: EvalOptions
) -> EvalResult:
    return selection_result(dataset, run_selection(model, dataset, options))


def overall_groups(roots: Sequence[Path]) -> dict[Path, list[Path]]:
    """Selection sets by parent directory, for the directories holding at least two of them."""
    groups: dict[Path, list[Path]] = {}
    for root in roots:
        groups.setdefault(root.parent, []).append(root)
    return {parent: members for parent, members in groups.items() if len(members) >= 2}


def overall_name(parent: Path) -> str:
    return f"wds/{parent.name}"


def overall_results(results: Sequence[EvalResult]) -> list[EvalResult]:
    """One result per directory of two or more evaluated selection sets: each metric's mean
    over the sets (each kind of negative weighs the same, as SugarCrepe averages them)."""
    own = {Path(r.details["dataset_root"]): r for r in results if r.task == TASK}
    overall = []
    for parent, roots in overall_groups(list(own)).items():
        members = [own[root] for root in roots]
        metrics = {m: sum(r.metrics[m] for r in members) / len(members) for m in METRICS}
        details = {
            "mean_of": {root.name: own[root].metrics["acc"] for root in roots},
            "dataset_root": str(parent),
        }
        overall.append(EvalResult(overall_name(parent), TASK, metrics, details))
    return overall
