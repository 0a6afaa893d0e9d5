"""DreamLIP: several text slots per image (raw caption + sampled sub-captions), two terms.

- `multi_positive`: the mean over slots k of the symmetric InfoNCE between the images and the
  texts of slot k (negatives within the slot only). One slot gives exactly `contrastive`.
- `subcaption_grouping`: each text t[b,k] pools its own image's patches into g[b,k] (min-max
  normalised cosines, zeroed below a threshold, renormalised), then a symmetric InfoNCE over all
  (image, slot) pairs of the global batch with its own learnable temperature.

g is computed locally (it only uses the image's own patches); only g, t and the slot mask are
gathered, so the cost is B*T*D per rank instead of B*M*D patch tokens.
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


@dataclass
class MultiPositiveConfig(TermConfig):
    weight: float = 0.0
    """DreamLIP's global loss: the mean over text slots of each slot's InfoNCE (1.0 in DreamLIP;
    with one text per image it equals `contrastive`, which it replaces)."""
    max_logit_scale: float = 100.0
    """Clamp of the shared temperature's scale, as for `contrastive`."""

    def checks(self) -> list[tuple[bool, str, str]]:
        return [(self.max_logit_scale >= 1, "max_logit_scale", "at least 1")]


@dataclass
class GroupingConfig(TermConfig):
    weight: float = 0.0
    """DreamLIP's sub-caption grouping loss (1.0 in DreamLIP)."""
    threshold: float = 0.0
    """Min-max normalised patch weights below this are zeroed (sigma); negative: 1/patches."""
    max_logit_scale: float = 100.0
    """Clamp of the grouping loss's own learnable temperature's scale."""

    def checks(self) -> list[tuple[bool, str, str]]:
        return [
            (self.max_logit_scale >= 1, "max_logit_scale", "at least 1"),
            (
                self.threshold < 1,
                "threshold",
                "below 1 (min-max weights lie in [0, 1); negative: 1/patches)",
            ),
        ]


MINMAX_EPS = 1e-10
"""Added to the min-max denominator (as in DreamLIP), so equal cosines give zeros, not NaN."""


def text_slots(out: Any) -> Tensor:
    """[B, T, D] every text slot's embedding (T = 1 when the batch has one text per image)."""
    return out.text_emb_all if out.text_emb_all is not None else out.text_emb[:, None]


def multi_positive_loss(image_emb: Tensor, text_emb: Tensor, scale: Tensor) -> Tensor:
    """mean_k InfoNCE(images, slot k); image_emb [B, D], text_emb [B, T, D], local rows.

    Local rows against gathered columns, as `clip_loss`: the mean over ranks equals the
    single-process loss on the concatenated batch.
    """
    all_image = distributed.gather_with_grad(image_emb)  # [W*B, D]
    slots = text_emb.shape[1]
    by_slot = text_emb.transpose(0, 1)  # [T, B, D]
    # gathered slot by slot as [B, D] blocks, the shape gather_with_grad's backward expects
    all_text = torch.stack([distributed.gather_with_grad(t) for t in by_slot])  # [T, W*B, D]
    targets = distributed.contrastive_targets(image_emb.shape[0], image_emb.device)
    per_image = scale * image_emb @ all_text.transpose(1, 2)  # [T, B, W*B]
    per_text = scale * by_slot @ all_image.T
    targets = targets.repeat(slots)  # one row per (slot, local image), slot-major
    return (
        F.cross_entropy(per_image.flatten(0, 1), targets)
        + F.cross_entropy(per_text.flatten(0, 1), targets)
    ) / 2


def grouping_weights(cosines: Tensor, threshold: float) -> Tensor:
    """Patch weights [..., M] from text-patch cosines [..., M]; each row sums to 1.

    Min-max normalise over patches, zero the values below `threshold` (negative: 1/M), and
    renormalise; a row left without weight (all cosines equal) gets uniform 1/M.
    """
    patches = cosines.shape[-1]
    sigma = 1 / patches if threshold < 0 else threshold
    low = cosines.min(-1, keepdim=True).values
    high = cosines.max(-1, keepdim=True).values
    scaled = (cosines - low) / (high - low + MINMAX_EPS)
    kept = scaled * (scaled >= sigma)
    total = kept.sum(-1, keepdim=True)
    # the divisor is 1 where the row is empty so that branch's gradient is 0, never 0/0
    safe = torch.where(total > 0, total, torch.ones_like(total))
    return torch.where(total > 0, kept / safe, torch.full_like(kept, 1 / patches))


def grouped_embeddings(text_emb: Tensor, patch_emb: Tensor, threshold: float) -> Tensor:
    """g [B, T, D]: each text slot's weighted sum of its own image's patches, normalised.

    text_emb [B, T, D], patch_emb [B, M, D], both L2-normalised.
    """
    cosines = torch.einsum("btd,bmd->btm", text_emb, patch_emb)
    weights = grouping_weights(cosines, threshold)
    return F.normalize(torch.einsum("btm,bmd->btd", weights, patch_emb), dim=-1)


def grouping_loss(
    text_emb: Tensor,
    patch_emb: Tensor,
    scale: Tensor,
    threshold: float,
    mask: Tensor | None = None,
) -> Tensor:
    """Symmetric InfoNCE between t[b,k] and g[b,k] over every (image, slot) pair of all ranks.

    mask [B, T] (bool): pairs that take part; the others are neither rows nor negatives. Each
    rank returns its rows' summed loss x W / (valid pairs of all ranks), so averaging over
    ranks gives the single-process mean over the concatenated batch.
    """
    grouped = grouped_embeddings(text_emb, patch_emb, threshold)
    texts, grouped = text_emb.flatten(0, 1), grouped.flatten(0, 1)  # [B*T, D], row b*T + k
    valid = torch.ones(texts.shape[0], dtype=torch.bool, device=texts.device)
    if mask is not None:
        valid = mask.flatten().to(texts.device)
    all_texts = distributed.gather_with_grad(texts)  # [W*B*T, D]
    all_grouped = distributed.gather_with_grad(grouped)
    all_valid = distributed.gather(valid)
    targets = distributed.contrastive_targets(texts.shape[0], texts.device)
    blocked = torch.where(all_valid, 0.0, -math.inf).to(texts.dtype)  # invalid columns
    text_to_group = scale * texts @ all_grouped.T + blocked
    group_to_text = scale * grouped @ all_texts.T + blocked
    losses = F.cross_entropy(text_to_group, targets, reduction="none") + F.cross_entropy(
        group_to_text, targets, reduction="none"
    )
    summed = torch.where(valid, losses, torch.zeros_like(losses)).sum() / 2
    count = distributed.all_reduce_sum(valid.sum())
    return summed * distributed.world_size() / count.clamp(min=1)


class _ClampedScale(Objective):
    """Clamps one of the model's log temperatures to [0, ln max] after each optimizer step."""

    parameter = ""

    def __init__(self, cfg: MultiPositiveConfig | GroupingConfig):
        self.max_log_scale = math.log(cfg.max_logit_scale)

    @torch.no_grad()
    def after_optimizer_step(self, model: nn.Module) -> None:
        getattr(model, self.parameter).clamp_(0, self.max_log_scale)


@OBJECTIVES.register("multi_positive")
class MultiPositiveObjective(_ClampedScale):
    batch_coupled = True  # each slot's InfoNCE compares every image with every text
    Config = MultiPositiveConfig

    parameter = "logit_scale"

    def __call__(self, out: ModelOutput, batch: Batch) -> Tensor:
        return multi_positive_loss(out.image_emb, text_slots(out), out.logit_scale)


@OBJECTIVES.register("subcaption_grouping")
class GroupingObjective(_ClampedScale):
    Config = GroupingConfig

    parameter = "logit_scale_local"
    needs_patches = True
    batch_coupled = True  # an InfoNCE over every (image, slot) pair of the batch

    def __init__(self, cfg: GroupingConfig):
        super().__init__(cfg)
        self.threshold = cfg.threshold

    def __call__(self, out: ModelOutput, batch: Batch) -> Tensor:
        if out.patch_emb is None:
            raise ValueError("subcaption_grouping needs a model built with patch_emb=True")
        mask = getattr(batch, "text_mask", None)
        return grouping_loss(
            text_slots(out), out.patch_emb, out.logit_scale_local, self.threshold, mask
        )
