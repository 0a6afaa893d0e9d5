"""Figures of one evaluation: modality-gap projection, confusion matrix, retrieval examples."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from PIL import Image
from torch import Tensor

IMAGE_COLOUR, TEXT_COLOUR = "#1f77b4", "#ff7f0e"
HIT_COLOUR, MISS_COLOUR, OTHER_COLOUR = "#2ca02c", "#d62728", "0.3"


def pca_2d(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) -> (N, 2) coordinates on the top two principal axes, and their variance shares."""
    centred = points - points.mean(axis=0)
    _, singular, axes = np.linalg.svd(centred, full_matrices=False)
    variance = singular**2
    return centred @ axes[:2].T, variance[:2] / variance.sum()


def plot_gap_projection(
    image_embeddings: Tensor, text_embeddings: Tensor, gap: float, path: Path, seed: int = 0
) -> None:
    """Images and their captions on the first two principal axes of both together.

    Up to 1000 pairs (seeded sample); grey segments join 40 matched pairs and crosses mark
    the two centroids, whose distance in the full space is the gap.
    """
    count = image_embeddings.shape[0]
    chosen = np.sort(np.random.default_rng(seed).permutation(count)[:1000])
    x = image_embeddings[chosen].double().numpy()
    y = text_embeddings[chosen].double().numpy()
    coords, share = pca_2d(np.concatenate([x, y]))
    xs, ys = coords[: len(x)], coords[len(x) :]
    figure = Figure(figsize=(7.5, 6.5), layout="constrained")
    ax = figure.subplots()
    for i in range(min(40, len(x))):
        label = "matched pairs (40)" if i == 0 else None
        ax.plot([xs[i, 0], ys[i, 0]], [xs[i, 1], ys[i, 1]], color="0.75", lw=0.6, zorder=1,
                label=label)  # fmt: skip
    ax.scatter(*xs.T, s=12, alpha=0.6, color=IMAGE_COLOUR, label="images", zorder=2)
    ax.scatter(*ys.T, s=12, alpha=0.6, color=TEXT_COLOUR, marker="^", label="captions", zorder=2)
    for points, colour, name in ((xs, IMAGE_COLOUR, "image"), (ys, TEXT_COLOUR, "caption")):
        centre = points.mean(axis=0)
        ax.scatter(*centre, s=220, marker="X", color=colour, edgecolor="black", zorder=3,
                   label=f"{name} centroid")  # fmt: skip
    ax.set_title(
        f"Modality gap ‖μ_image − μ_caption‖ = {gap:.3f}\n"
        f"PCA of {len(x)} pairs (axes explain {share[0]:.0%} and {share[1]:.0%} of variance)"
    )
    ax.set_xlabel("principal axis 1")
    ax.set_ylabel("principal axis 2")
    ax.legend(loc="best", fontsize=9)
    ax.grid(alpha=0.3)
    figure.savefig(path, dpi=110)


def plot_confusion(
    labels: Tensor, predictions: Tensor, classnames: Sequence[str], title: str, path: Path
) -> None:
    """Row-normalised confusion matrix (true class by row) with the counts written in."""
    num_classes = len(classnames)
    counts = torch.zeros(num_classes, num_classes, dtype=torch.long)
    counts.index_put_((labels, predictions), torch.ones_like(labels), accumulate=True)
    rates = counts.double() / counts.sum(dim=1, keepdim=True).clamp_min(1)
    side = max(5.0, 0.55 * num_classes + 2.5)
    figure = Figure(figsize=(side + 1, side), layout="constrained")
    ax = figure.subplots()
    shown = ax.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=1)
    figure.colorbar(shown, ax=ax, label="fraction of the true class", shrink=0.8)
    if num_classes <= 30:
        for (row, column), count in np.ndenumerate(counts.numpy()):
            if count:
                colour = "white" if rates[row, column] > 0.6 else "black"
                ax.text(column, row, str(count), ha="center", va="center", color=colour,
                        fontsize=8)  # fmt: skip
    ticks = range(num_classes)
    ax.set_xticks(ticks, list(classnames), rotation=45, ha="right")
    ax.set_yticks(ticks, list(classnames))
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title)
    figure.savefig(path, dpi=110)


@dataclass
class RetrievalExample:
    caption: str
    top: list[tuple[Image.Image, bool]]
    """The best images for the caption, best first, and whether each is its image."""
    target: Image.Image
    rank: int
    """0-based rank of the caption's own image."""


def plot_retrieval_examples(examples: list[RetrievalExample], path: Path) -> None:
    """One row per query caption: its top images (its own framed in green) and its image."""
    columns = max(len(e.top) for e in examples) + 1
    figure = Figure(figsize=(1.9 * columns, 2.6 * len(examples)), layout="constrained")
    rows = figure.subfigures(len(examples), 1, squeeze=False).ravel()
    for row, example in zip(rows, examples, strict=True):
        caption = textwrap.fill(f"“{example.caption}”", width=16 * columns)
        row.suptitle(caption, fontsize=9, ha="left", x=0.01)
        axes = row.subplots(1, columns)
        for place, (ax, (image, is_target)) in enumerate(zip(axes, example.top, strict=False)):
            _show(ax, image, f"#{place + 1}", HIT_COLOUR if is_target else OTHER_COLOUR, is_target)
        found = example.rank < len(example.top)
        label = f"its image\n(rank {example.rank + 1})"
        _show(axes[-1], example.target, label, HIT_COLOUR if found else MISS_COLOUR, True)
    figure.savefig(path, dpi=110)


def _show(ax, image: Image.Image, label: str, colour: str, framed: bool) -> None:
    ax.imshow(image)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlabel(label, fontsize=8, color=colour)
    for spine in ax.spines.values():
        spine.set_visible(False)
    if framed:
        width, height = image.size
        ax.add_patch(
            Rectangle((-0.5, -0.5), width, height, fill=False, edgecolor=colour, linewidth=4)
        )
