"""Geometry of paired image/text embeddings: modality gap, uniformity, alignment, ...

Definitions follow Fahim et al., "It's Not a Modality Gap" (design/methods/dreamlip_gap.md §2.4).
x_i, y_i are the image and text embeddings of pair i; every function below takes (N, D) rows
that are already L2-normalised, is plain differentiable torch and needs O(chunk_size · N)
memory, never O(N²).
`alignment`, `uniformity` and `cross_uniformity` are the training objectives' own functions
(vlp.objectives.geometry), so what is reported is exactly what the gap-closing terms optimise.
`geometry_metrics` normalises raw embeddings and computes them all.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from vlp.objectives.geometry import alignment, cross_uniformity, uniformity


def modality_gap(x: Tensor, y: Tensor) -> Tensor:
    """‖μ_x − μ_y‖ between the centroids (not renormalised) of unit vectors; in [0, 2]."""
    return torch.linalg.vector_norm(x.mean(dim=0) - y.mean(dim=0))


def centroid_cosine(x: Tensor, y: Tensor) -> Tensor:
    """cos(μ_x, μ_y)."""
    return F.cosine_similarity(x.mean(dim=0), y.mean(dim=0), dim=0)


def matched_cosine(x: Tensor, y: Tensor) -> Tensor:
    """mean_i x_i·y_i."""
    return (x * y).sum(dim=1).mean()


def nonmatched_cosine(x: Tensor, y: Tensor) -> Tensor:
    """mean over i ≠ j of x_i·y_j, in O(N·D): (Σx)·(Σy) minus the matched terms."""
    n = x.shape[0]
    total = x.sum(dim=0) @ y.sum(dim=0)
    return (total - (x * y).sum()) / (n * (n - 1))


def effective_rank(x: Tensor) -> Tensor:
    """exp(entropy of the normalised singular values) of the (N, D) matrix (Roy & Vetterli).

    1 when all rows coincide; k for k orthonormal rows; at most min(N, D).
    """
    singular = torch.linalg.svdvals(x.double())
    p = singular / singular.sum()
    p = p[p > 0]
    return torch.exp(-(p * p.log()).sum()).to(x.dtype)


def linear_separability(x: Tensor, y: Tensor, seed: int = 0, train_fraction: float = 0.8) -> float:
    """Test accuracy of a logistic regression telling images (0) from texts (1).

    The pairs are split at random (seeded) into train_fraction / rest, so a pair's image and
    text are always on the same side; 0.5 means the modalities are inseparable. sklearn's
    defaults (L2, C = 1, lbfgs, 100 iterations), as in the reference evaluator.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    n = x.shape[0]
    num_train = round(train_fraction * n)
    if not 0 < num_train < n:
        return math.nan
    order = np.random.default_rng(seed).permutation(n)
    images, texts = x.detach().cpu().numpy(), y.detach().cpu().numpy()

    def split(pairs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return np.concatenate([images[pairs], texts[pairs]]), np.repeat([0, 1], len(pairs))

    classifier = LogisticRegression(random_state=seed)
    with warnings.catch_warnings():
        # 100 lbfgs iterations is the reference setting; not converging there is expected
        warnings.simplefilter("ignore", ConvergenceWarning)
        classifier.fit(*split(order[:num_train]))
    return float(classifier.score(*split(order[num_train:])))


def geometry_metrics(
    image_embeddings: Tensor, text_embeddings: Tensor, seed: int = 0
) -> dict[str, float]:
    """Every geometry metric of N pairs (row i of each is a pair); inputs need not be unit norm."""
    x = F.normalize(image_embeddings.detach().double(), dim=-1)
    y = F.normalize(text_embeddings.detach().double(), dim=-1)
    uniformity_image, uniformity_text = uniformity(x).item(), uniformity(y).item()
    return {
        "gap": modality_gap(x, y).item(),
        "centroid_cosine": centroid_cosine(x, y).item(),
        "uniformity_image": uniformity_image,
        "uniformity_text": uniformity_text,
        "uniformity": (uniformity_image + uniformity_text) / 2,
        "cross_uniformity": cross_uniformity(x, y).item(),
        "alignment": alignment(x, y).item(),
        "matched_cosine": matched_cosine(x, y).item(),
        "nonmatched_cosine": nonmatched_cosine(x, y).item() if len(x) > 1 else math.nan,
        "linear_separability": linear_separability(x.float(), y.float(), seed),
        "effective_rank_image": effective_rank(x).item(),
        "effective_rank_text": effective_rank(y).item(),
    }
