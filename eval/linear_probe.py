"""Linear probe with clip_benchmark's protocol, on a classification set with a `train/` split.

The frozen model embeds the images of `DIR/train` and `DIR/test` (L2-normalised, as
clip_benchmark's default `--normalize`). A validation share carved from train (seeded) chooses
the weight decay: a logistic-regression layer is fit with AdamW (lr 0.1, cosine schedule
without warm-up, batch 64, 10 epochs, the same seed for every fit) at 7 values of the 97-point
grid logspace(-6, 2), then around the best one at distances 8, 4, 2 and 1 grid points (the
OpenAI CLIP paper's sweep, A.3, with AdamW as clip_benchmark does). The layer is then fit on
all of train with that weight decay and scored on test: `lp_acc1`, `lp_acc5`,
`lp_mean_per_class_recall`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import asdict

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from eval.datasets import EvalSet, open_eval_set
from eval.encode import encode_images
from eval.errors import UsageError
from eval.models import EvalModel
from eval.options import EvalOptions
from eval.results import EvalResult
from eval.zero_shot import classification_metrics
from vlp.config import ProbeConfig
from vlp.data import format as fmt

TASK = "linear_probe"
WEIGHT_DECAYS = torch.logspace(-6, 2, 97, dtype=torch.float64).tolist()
COARSE = tuple(range(0, len(WEIGHT_DECAYS), 16))
"""Grid indices tried first: 1e-6, 1e-4/3, ..., 1e2 (7 values)."""
SPANS = (8, 4, 2, 1)
"""Grid distances of the refinement around the best index so far."""


def validation_split(count: int, proportion: float, seed: int) -> tuple[Tensor, Tensor]:
    """(train indices, validation indices), each sorted: a seeded share of `count` items."""
    num_val = min(count - 1, max(1, round(count * proportion)))
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    return order[num_val:].sort().values, order[:num_val].sort().values


def fit_probe(
    features: Tensor,
    labels: Tensor,
    num_classes: int,
    weight_decay: float,
    probe: ProbeConfig,
    seed: int,
) -> nn.Linear:
    """A linear classifier on (N, D) features: AdamW, cosine lr per step, shuffled batches.

    Every fit draws its initial weights and batch order from its own generator seeded with
    `seed`, so fits differ only in the weight decay and the data.
    """
    generator = torch.Generator().manual_seed(seed)
    layer = nn.Linear(features.shape[1], num_classes)
    bound = 1 / math.sqrt(features.shape[1])  # nn.Linear's own init, drawn from `generator`
    with torch.no_grad():
        layer.weight.uniform_(-bound, bound, generator=generator)
        layer.bias.uniform_(-bound, bound, generator=generator)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=probe.lr, weight_decay=weight_decay)
    batches = math.ceil(len(features) / probe.batch_size)
    total, step = probe.epochs * batches, 0
    for _ in range(probe.epochs):
        order = torch.randperm(len(features), generator=generator)
        for start in range(0, len(features), probe.batch_size):
            rows = order[start : start + probe.batch_size]
            for group in optimizer.param_groups:
                group["lr"] = 0.5 * (1 + math.cos(math.pi * step / total)) * probe.lr
            loss = F.cross_entropy(layer(features[rows]), labels[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
    return layer


def choose_weight_decay(
    train: tuple[Tensor, Tensor],
    val: tuple[Tensor, Tensor],
    num_classes: int,
    probe: ProbeConfig,
    seed: int,
) -> tuple[float, dict[float, float]]:
    """The grid weight decay with the best validation acc1, and {weight decay: val acc1} tried.

    Among equal accuracies the first one tried wins (coarse grid in increasing order, then
    left, centre, right of each refinement).
    """
    tried: dict[int, float] = {}

    def accuracy(index: int) -> float:
        if index not in tried:
            layer = fit_probe(*train, num_classes, WEIGHT_DECAYS[index], probe, seed)
            with torch.no_grad():
                tried[index] = (layer(val[0]).argmax(dim=1) == val[1]).float().mean().item()
        return tried[index]

    peak = _first_best(COARSE, accuracy)
    for span in SPANS:
        candidates = (max(peak - span, 0), peak, min(peak + span, len(WEIGHT_DECAYS) - 1))
        peak = _first_best(candidates, accuracy)
    return WEIGHT_DECAYS[peak], {WEIGHT_DECAYS[i]: tried[i] for i in sorted(tried)}


def _first_best(indices, accuracy) -> int:
    best, best_accuracy = indices[0], -1.0
    for index in indices:
        if accuracy(index) > best_accuracy:
            best, best_accuracy = index, accuracy(index)
    return best


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run torch on one CPU thread: the probe's matrices are so small that intra-op threads
    only add synchronisation (a fit is 20x slower with 2 threads on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def train_split(dataset: EvalSet) -> EvalSet:
    """The set's `train/` split; a usage error saying how to get one when it is missing."""
    if not (dataset.root / fmt.EVAL_TRAIN_SPLIT).is_dir():
        raise UsageError(
            f"{dataset.root}: linear_probe needs a {fmt.EVAL_TRAIN_SPLIT}/ split beside "
            f"{fmt.EVAL_SPLIT}/ (same layout); `vlp-shard demo` and `vlp-shard fashion-mnist` "
            "write one for their classification sets"
        )
    return open_eval_set(dataset.root, fmt.EVAL_TRAIN_SPLIT)


def evaluate_linear_probe(model: EvalModel, dataset: EvalSet, options: EvalOptions) -> EvalResult:
    probe, seed, num_classes = options.probe, options.seed, len(dataset.classnames)
    train_images = encode_images(model, train_split(dataset), options.batch_size, options.workers)
    test_images = encode_images(model, dataset, options.batch_size, options.workers)
    features = train_images.embeddings
    labels = torch.tensor(train_images.targets, dtype=torch.long)
    if len(labels) < 2:
        raise UsageError(f"{dataset.root / fmt.EVAL_TRAIN_SPLIT}: needs at least 2 samples")
    fit_rows, val_rows = validation_split(len(labels), probe.val_proportion, seed)
    with _one_thread():
        weight_decay, sweep = choose_weight_decay(
            (features[fit_rows], labels[fit_rows]),
            (features[val_rows], labels[val_rows]),
            num_classes, probe, seed,
        )  # fmt: skip
        layer = fit_probe(features, labels, num_classes, weight_decay, probe, seed)
    test_labels = torch.tensor(test_images.targets, dtype=torch.long)
    with torch.no_grad():
        scores = classification_metrics(layer(test_images.embeddings), test_labels)
    metrics = {
        "lp_acc1": scores.acc1,
        "lp_acc5": scores.acc5,
        "lp_mean_per_class_recall": scores.mean_per_class_recall,
    }
    details = {
        "weight_decay": weight_decay,
        "validation_acc1": sweep,
        "num_train": len(fit_rows),
        "num_validation": len(val_rows),
        "num_test": len(test_labels),
        "probe": {**asdict(probe), "normalized": True, "seed": seed},
        "dataset_root": str(dataset.root),
    }
    return EvalResult(dataset.name, TASK, metrics, details)
