"""Symmetric InfoNCE (CLIP) with a learnable, clamped temperature, over the global batch."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlp import distributed
from vlp.objectives import OBJECTIVES


def clip_loss(image_emb: Tensor, text_emb: Tensor, scale: Tensor) -> Tensor:
    """Mean of image->text and text->image cross-entropy.

    image_emb, text_emb: [B, D] L2-normalised local rows. Each rank scores its own rows against
    the gathered columns of all ranks (`local loss`), so memory is O(B * W * B), and the mean over
    ranks equals the single-process loss on the concatenated batch.
    """
    all_image = distributed.gather_with_grad(image_emb)  # [W*B, D]
    all_text = distributed.gather_with_grad(text_emb)
    targets = distributed.contrastive_targets(image_emb.shape[0], image_emb.device)
    logits_per_image = scale * image_emb @ all_text.T  # [B, W*B]
    logits_per_text = scale * text_emb @ all_image.T
    return (
        F.cross_entropy(logits_per_image, targets) + F.cross_entropy(logits_per_text, targets)
    ) / 2


@OBJECTIVES.register("contrastive")
class ContrastiveObjective:
    batch_coupled = True
    """Every row's loss depends on every other row: train.grad_cache keeps the whole batch."""

    def __init__(self, cfg: Any):
        self.max_log_scale = math.log(cfg.max_logit_scale)
        self.fixed_temperature = cfg.fixed_temperature

    def __call__(self, out: Any, batch: Any) -> Tensor:
        return clip_loss(out.image_emb, out.text_emb, out.logit_scale)

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
