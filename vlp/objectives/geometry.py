"""Uniformity and alignment terms that close the contrastive gap (Fahim et al.; METHODS.md §4).

x_i, y_i are the L2-normalised image and text embeddings of pair i of the *global* batch:

- alignment        mean_i ‖x_i − y_i‖²                                   (0 .. 4)
- uniformity       ½ log mean_{i<j} e^{−t‖x_i−x_j‖²} + ½ (same for y)     (−4n/(n−1) .. 0)
- cross_uniformity log mean_{i≠j} e^{−t‖x_i−y_j‖²}                       (−4n/(n−1) .. 0)

CUA = contrastive + uniformity + alignment; CUAXU adds cross_uniformity. The functions below are
plain differentiable torch on (N, D) unit rows (eval.geometry reports the same quantities); the
terms gather every rank's rows with gradient and compute the global value on each rank, so the
loss and, after DDP's gradient mean, the gradients equal one process on the whole batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from vlp import distributed
from vlp.config import TermConfig
from vlp.data.pipeline import Batch
from vlp.model import ModelOutput
from vlp.objectives import OBJECTIVES, Objective


@dataclass
class AlignmentConfig(TermConfig):
    weight: float = 0.0
    """mean_i ‖x_i − y_i‖² of matched image/text embeddings over the global batch (CUA: 1.0)."""


@dataclass
class UniformityConfig(TermConfig):
    weight: float = 0.0
    """In-modal uniformity, the mean of the image and the text one, over the global batch
    (CUA: 1.0)."""
    t: float = 2.0
    """Kernel sharpness: log mean_{i<j} exp(−t‖x_i − x_j‖²)."""

    def checks(self) -> list[tuple[bool, str, str]]:
        return [(self.t > 0, "t", "positive")]


@dataclass
class CrossUniformityConfig(TermConfig):
    weight: float = 0.0
    """Cross-modal uniformity log mean_{i≠j} exp(−t‖x_i − y_j‖²) over the global batch
    (CUAXU: 1.0, with uniformity and alignment)."""
    t: float = 2.0

    def checks(self) -> list[tuple[bool, str, str]]:
        return [(self.t > 0, "t", "positive")]


DEFAULT_CHUNK = 1024


def alignment(x: Tensor, y: Tensor) -> Tensor:
    """mean_i ‖x_i − y_i‖² (= 2 − 2·matched cosine for unit vectors); always ≥ gap²."""
    return (x - y).pow(2).sum(dim=1).mean()


def _squared_distances(a: Tensor, b: Tensor) -> Tensor:
    """(A, D), (B, D) -> (A, B) ‖a_i − b_j‖²; no sqrt, so gradients stay finite at 0."""
    return (a.pow(2).sum(1)[:, None] + b.pow(2).sum(1)[None, :] - 2 * a @ b.T).clamp_min(0)


def _log_mean_exp_pairs(a: Tensor, b: Tensor, t: float, keep: str, chunk_size: int) -> Tensor:
    """log mean over pairs (i, j) of exp(−t‖a_i − b_j‖²), pairs j > i ("upper") or j ≠ i.

    Computed per block of rows with log-sum-exp, so any t and any N is stable and the
    memory is chunk_size × N.
    """
    n = a.shape[0]
    num_pairs = n * (n - 1) // 2 if keep == "upper" else n * (n - 1)
    if num_pairs == 0:
        return a.new_tensor(math.nan)
    columns = torch.arange(n, device=a.device)
    block_sums = []
    for start in range(0, n, chunk_size):
        rows = torch.arange(start, min(start + chunk_size, n), device=a.device)
        mask = columns[None, :] > rows[:, None] if keep == "upper" else columns != rows[:, None]
        if not mask.any():  # the last row has no j > i
            continue
        values = -t * _squared_distances(a[rows], b)
        block_sums.append(torch.logsumexp(values[mask], dim=0))
    return torch.logsumexp(torch.stack(block_sums), dim=0) - math.log(num_pairs)


def uniformity(x: Tensor, t: float = 2.0, chunk_size: int = DEFAULT_CHUNK) -> Tensor:
    """log mean_{i<j} exp(−t‖x_i − x_j‖²); −4 for orthonormal points, 0 when all coincide."""
    return _log_mean_exp_pairs(x, x, t, "upper", chunk_size)


def cross_uniformity(
    x: Tensor, y: Tensor, t: float = 2.0, chunk_size: int = DEFAULT_CHUNK
) -> Tensor:
    """log mean_{i≠j} exp(−t‖x_i − y_j‖²) over the N(N−1) non-matching ordered pairs."""
    return _log_mean_exp_pairs(x, y, t, "different", chunk_size)


def _global_pairs(out: Any) -> tuple[Tensor, Tensor]:
    """([W·B, D], [W·B, D]) image and text rows of every rank, at least fp32, with gradient."""
    dtype = torch.promote_types(out.image_emb.dtype, torch.float32)  # bf16 autocast -> fp32
    image = distributed.gather_with_grad(out.image_emb.to(dtype))
    text = distributed.gather_with_grad(out.text_emb.to(dtype))
    return image, text


@OBJECTIVES.register("alignment")
class AlignmentObjective(Objective):
    Config = AlignmentConfig

    batch_coupled = True  # GradCache computes it on the whole accumulated batch (exact)

    def __call__(self, out: ModelOutput, batch: Batch) -> Tensor:
        return alignment(*_global_pairs(out))


@OBJECTIVES.register("uniformity")
class UniformityObjective(Objective):
    """In-modal uniformity: the mean of the image and the text uniformity."""

    Config = UniformityConfig

    batch_coupled = True  # every pair of rows interacts: GradCache must see the whole batch

    def __init__(self, cfg: UniformityConfig | CrossUniformityConfig):
        self.t = cfg.t

    def __call__(self, out: ModelOutput, batch: Batch) -> Tensor:
        image, text = _global_pairs(out)
        return (uniformity(image, self.t) + uniformity(text, self.t)) / 2


@OBJECTIVES.register("cross_uniformity")
class CrossUniformityObjective(Objective):
    Config = CrossUniformityConfig

    batch_coupled = True

    def __init__(self, cfg: UniformityConfig | CrossUniformityConfig):
        self.t = cfg.t

    def __call__(self, out: ModelOutput, batch: Batch) -> Tensor:
        return cross_uniformity(*_global_pairs(out), self.t)
