"""Symmetric InfoNCE (CLIP) with a learnable, clamped temperature, over the global batch.

Two options change the image->text side or both softmaxes:

- hard negatives (NegCLIP, `data.hard_negatives`): each image brings K negative captions, the
  batch's trailing K text slots; image->text rows then span every gathered caption plus every
  gathered negative. Negatives are never queries, so text->image is unchanged.
- decoupled (DCL): the positive is left out of each row's denominator,
  L_i = -s_ii + log sum_{j != i} exp(s_ij)   (s: scaled cosines).

`tile` computes the same loss in column tiles with a recomputing backward (vlp.objectives.tiled),
so its memory is O(B × tile) instead of O(B × W·B); off (None), the loss is computed as before.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlp import distributed
from vlp.config import TermConfig
from vlp.data.pipeline import Batch
from vlp.model import ModelOutput
from vlp.objectives import OBJECTIVES, Objective
from vlp.objectives.tiled import tiled_cross_entropy


@dataclass
class ContrastiveConfig(TermConfig):
    weight: float = 1.0
    max_logit_scale: float = 100.0
    """The learnable temperature's scale exp(logit_scale) is clamped to [1, this]."""
    fixed_temperature: float | None = None
    """Fix the temperature to this value instead of learning it (the contrastive-gap recipe
    uses 0.01, i.e. scale 100); the model's logit_scale is set to ln(1/this) and frozen."""
    decoupled: bool = False
    """DCL (Yeh et al. 2022): leave the positive pair out of each softmax's denominator."""
    tile: int | None = None
    """Columns per tile: the logits are never held whole, so the loss's memory no longer grows
    with the global batch (equal to the untiled loss up to float rounding). None: untiled."""

    def checks(self) -> list[tuple[bool, str, str]]:
        return [
            (self.tile is None or self.tile >= 1, "tile", "at least 1, or null for no tiles"),
            (self.max_logit_scale >= 1, "max_logit_scale", "at least 1"),
            (
                self.fixed_temperature is None or self.fixed_temperature > 0,
                "fixed_temperature",
                "positive (e.g. 0.01) or null for a learnable temperature",
            ),
        ]


def clip_loss(
    image_emb: Tensor,
    text_emb: Tensor,
    scale: Tensor,
    negatives: Tensor | None = None,
    negative_mask: Tensor | None = None,
    decoupled: bool = False,
    tile: int | None = None,
) -> Tensor:
    """Mean of image->text and text->image cross-entropy.

    image_emb, text_emb: [B, D] L2-normalised local rows. Each rank scores its own rows against
    the gathered columns of all ranks (`local loss`), so memory is O(B * W * B), and the mean over
    ranks equals the single-process loss on the concatenated batch.
    negatives: [B, K, D] normalised negative captions of each image; negative_mask [B, K] (bool)
    marks the real ones (the others are no column at all).
    tile: compute both sides in column tiles of this size (vlp.objectives.tiled).
    """
    all_image = distributed.gather_with_grad(image_emb)  # [W*B, D]
    all_text = distributed.gather_with_grad(text_emb)
    targets = distributed.contrastive_targets(image_emb.shape[0], image_emb.device)
    if tile is not None:
        keys, mask = _image_side_columns(all_text, negatives, negative_mask)
        return (
            tiled_cross_entropy(image_emb, keys, scale, targets, tile, decoupled, mask)
            + tiled_cross_entropy(text_emb, all_image, scale, targets, tile, decoupled)
        ) / 2
    logits_per_image = scale * image_emb @ all_text.T  # [B, W*B]
    logits_per_text = scale * text_emb @ all_image.T
    if negatives is not None:
        logits_per_image = torch.cat(
            [logits_per_image, _negative_logits(image_emb, negatives, negative_mask, scale)], 1
        )  # [B, W*B + W*B*K]
    cross_entropy = decoupled_cross_entropy if decoupled else F.cross_entropy
    return (cross_entropy(logits_per_image, targets) + cross_entropy(logits_per_text, targets)) / 2


def _image_side_columns(
    all_text: Tensor, negatives: Tensor | None, mask: Tensor | None
) -> tuple[Tensor, Tensor | None]:
    """The image->text columns, every rank's captions then every rank's negatives ([W*B + W*B*K,
    D], as in the untiled logits), and which of them exist (None: all)."""
    if negatives is None:
        return all_text, None
    all_negatives = distributed.gather_with_grad(negatives.flatten(0, 1))
    keys = torch.cat([all_text, all_negatives])
    if mask is None:
        return keys, None
    present = distributed.gather(mask.flatten().to(keys.device))
    return keys, torch.cat([present.new_ones(all_text.shape[0]), present])


def _negative_logits(
    image_emb: Tensor, negatives: Tensor, mask: Tensor | None, scale: Tensor
) -> Tensor:
    """[B, W*B*K] scaled cosines of the local images to every rank's negatives; -inf where a
    negative slot is empty."""
    all_negatives = distributed.gather_with_grad(negatives.flatten(0, 1))  # [W*B*K, D]
    logits = scale * image_emb @ all_negatives.T
    if mask is None:
        return logits
    present = distributed.gather(mask.flatten().to(logits.device))
    return logits.masked_fill(~present, -math.inf)


def decoupled_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """mean_i (-logits[i, t_i] + logsumexp_{j != t_i} logits[i, j])  (DCL)."""
    positive = logits.gather(1, targets[:, None])[:, 0]
    others = logits.scatter(1, targets[:, None], -math.inf)
    return (torch.logsumexp(others, dim=1) - positive).mean()


def negative_slots(out: Any, batch: Any) -> tuple[Tensor | None, Tensor | None]:
    """([B, K, D] the batch's hard-negative embeddings, [B, K] their mask), or (None, None).

    They are the last `batch.num_negatives` text slots (vlp.data.pipeline.Batch).
    """
    count = getattr(batch, "num_negatives", 0)
    if not count:
        return None, None
    if out.text_emb_all is None or out.text_emb_all.shape[1] <= count:
        raise ValueError(f"a batch with {count} hard negatives per image needs 1 + that many slots")
    return out.text_emb_all[:, -count:], batch.text_mask[:, -count:]


@OBJECTIVES.register("contrastive")
class ContrastiveObjective(Objective):
    Config = ContrastiveConfig

    batch_coupled = True
    """Every row's loss depends on every other row: train.grad_cache keeps the whole batch."""

    def __init__(self, cfg: ContrastiveConfig):
        self.max_log_scale = math.log(cfg.max_logit_scale)
        self.fixed_temperature = cfg.fixed_temperature
        self.decoupled = cfg.decoupled
        self.tile = cfg.tile

    def __call__(self, out: ModelOutput, batch: Batch) -> Tensor:
        negatives, mask = negative_slots(out, batch)
        return clip_loss(
            out.image_emb, out.text_emb, out.logit_scale, negatives, mask, self.decoupled, self.tile
        )

    @torch.no_grad()
    def prepare_model(self, model: nn.Module) -> None:
        """A fixed temperature is the model's own logit_scale, set and frozen (before the
        optimizer and DDP see it), so exported weights and evaluation carry it too."""
        if self.fixed_temperature is not None:
            model.logit_scale.fill_(math.log(1 / self.fixed_temperature))
            model.logit_scale.requires_grad_(False)

    @torch.no_grad()
    def after_optimizer_step(self, model: nn.Module) -> None:
        if self.fixed_temperature is None:
            model.logit_scale.clamp_(0, self.max_log_scale)
