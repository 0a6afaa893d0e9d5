"""Softmax cross-entropy over many columns in bounded memory: column tiles, recomputed backward.

For local queries q_i [B, D], gathered keys k_j [N, D] (N = W·B, or more with negatives) and a
scale s, the InfoNCE row loss is L_i = lse_i − s·q_i·k_{t_i} with lse_i = log Σ_j exp(s·q_i·k_j).
The positive term is one dot product per row; only lse needs all N columns. The forward computes
lse tile by tile with a running log-sum-exp and keeps just lse [B]; the backward recomputes each
tile's logits and uses ∂lse_i/∂(s·q_i·k_j) = p_ij = exp(s·q_i·k_j − lse_i), plus the positive:

    ∂/∂q_i = s (Σ_j g_i p_ij k_j − g_i k_{t_i})
    ∂/∂k_j = s (Σ_i g_i p_ij q_i − Σ_{i: t_i=j} g_i q_i)
    ∂/∂s   = Σ_ij g_i p_ij q_i·k_j − Σ_i g_i q_i·k_{t_i}

so the largest temporaries are [B, tile] and one [N, D] gradient for the keys, whatever N is (the
Inf-CL idea, implemented from this math). Masked columns (absent hard negatives) and, for DCL,
each row's positive are −inf.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def tiled_cross_entropy(
    queries: Tensor,
    keys: Tensor,
    scale: Tensor,
    targets: Tensor,
    tile: int,
    exclude_positive: bool = False,
    column_mask: Tensor | None = None,
) -> Tensor:
    """mean_i (lse_i − s·q_i·k_{t_i}); queries [B, D], keys [N, D], targets [B] column indices,
    column_mask [N] (False: no column). Equal to F.cross_entropy on the [B, N] logits (and to
    DCL's decoupled form with `exclude_positive`), without ever holding them."""
    rows = _TiledInfoNCE.apply(queries, keys, scale, targets, exclude_positive, column_mask, tile)
    return rows.mean()


def _tile_logits(
    queries: Tensor, keys: Tensor, scale: Tensor, start: int, targets: Tensor,
    exclude_positive: bool, column_mask: Tensor | None,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """(dots [B, T], masked scaled logits [B, T]) of the key tile that begins at `start`."""
    dots = queries @ keys.T
    logits = scale * dots
    if column_mask is not None:
        logits = logits.masked_fill(~column_mask[start : start + keys.shape[0]], -math.inf)
    if exclude_positive:
        local = targets - start
        rows = ((local >= 0) & (local < keys.shape[0])).nonzero()[:, 0]
        logits = logits.index_put((rows, local[rows]), logits.new_tensor(-math.inf))
    return dots, logits


class _TiledInfoNCE(torch.autograd.Function):
    """Per-row loss [B] = lse_i − s·q_i·k_{t_i}, holding no [B, N] tensor in either pass."""

    @staticmethod
    def forward(ctx, queries, keys, scale, targets, exclude_positive, column_mask, tile):
        lse = queries.new_full((queries.shape[0],), -math.inf)
        for start in range(0, keys.shape[0], tile):
            _, logits = _tile_logits(queries, keys[start : start + tile], scale, start,
                                     targets, exclude_positive, column_mask)  # fmt: skip
            lse = torch.logaddexp(lse, torch.logsumexp(logits, dim=1))
        positive_dots = (queries * keys[targets]).sum(-1)  # [B]
        ctx.save_for_backward(queries, keys, scale, targets, lse, column_mask, positive_dots)
        ctx.exclude_positive, ctx.tile = exclude_positive, tile
        return lse - scale * positive_dots

    @staticmethod
    def backward(ctx, grad_rows):
        queries, keys, scale, targets, lse, column_mask, positive_dots = ctx.saved_tensors
        g = grad_rows[:, None]  # [B, 1]
        grad_queries = -scale * g * keys[targets]
        grad_keys = torch.empty_like(keys)
        grad_scale = -(grad_rows * positive_dots).sum()
        for start in range(0, keys.shape[0], ctx.tile):
            block = keys[start : start + ctx.tile]
            dots, logits = _tile_logits(queries, block, scale, start, targets,
                                        ctx.exclude_positive, column_mask)  # fmt: skip
            weights = torch.exp(logits - lse[:, None]) * g  # g_i p_ij, [B, T]
            grad_scale += (weights * dots).sum()
            weights.mul_(scale)
            grad_queries.addmm_(weights, block)
            # written in place: a [T, D] temporary would be as large as the keys when T >= N
            torch.mm(weights.T, queries, out=grad_keys[start : start + ctx.tile])
        grad_keys.index_add_(0, targets, -scale * g * queries)
        return grad_queries, grad_keys, grad_scale.reshape(scale.shape), None, None, None, None
