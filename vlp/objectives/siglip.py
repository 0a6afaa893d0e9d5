"""SigLIP (Zhai et al. 2023): a sigmoid loss on every image-text pair of the global batch.

For L2-normalised image and text embeddings x_i, y_j of a global batch of N pairs, with
z_ij = +1 if i = j else -1, a learnable temperature t = exp(t') and bias b:

    L = -(1/N) sum_i sum_j log sigmoid(z_ij (t x_i.y_j + b))

No softmax couples the rows, so each rank sums its own images against every text without
gathering logits: it scores its local texts first (the only block with positives), then passes
the text block around the ring (W-1 exchanges, vlp.distributed.ring_pass) and scores each block
it receives. The largest logits tensor is B x B (local), and each block's logits are recomputed
in the backward pass rather than kept, so memory does not grow with W. Each rank returns its
images' sum over N/W (its local batch): the mean over ranks is L, and DDP's gradient mean gives
the gradients of one process on the concatenated batch.

t' and b are the open_clip model's own `logit_scale` and `logit_bias`, so a model config with
`init_logit_bias` is needed (configs/models/vlp-*-clip-sigmoid.json: t' = ln 10, b = -10, the
paper's init); exported weights are an open_clip SigLIP-style model. Such a config's name must
not contain "siglip": open_clip then picks its SigLIP tokenizer, which downloads a vocabulary.
With `contrastive` also on, both terms share that temperature.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from vlp import distributed
from vlp.config import ConfigError, TermConfig
from vlp.data.pipeline import Batch
from vlp.model import ModelOutput
from vlp.objectives import OBJECTIVES, Objective


@dataclass
class SiglipConfig(TermConfig):
    weight: float = 0.0
    """SigLIP's pairwise sigmoid loss over the global batch (1.0 in SigLIP); needs a model
    config with a logit bias (init_logit_bias, e.g. vlp-tiny-clip-sigmoid)."""
    max_logit_scale: float = 100.0
    """The temperature's scale exp(logit_scale), shared with `contrastive`, is clamped to
    [1, this]."""

    def checks(self) -> list[tuple[bool, str, str]]:
        return [(self.max_logit_scale >= 1, "max_logit_scale", "at least 1")]


def pair_loss_sum(image: Tensor, text: Tensor, scale: Tensor, bias: Tensor, own: bool) -> Tensor:
    """-sum_ij log sigmoid(z_ij (scale x_i.y_j + bias)) of one [B, B] block of pairs.

    `own`: the block of the rank's own texts, whose diagonal holds the positive pairs (z = +1);
    every other pair is negative (z = -1). Summed in float32 at least (bf16 autocast too).
    """
    logits = scale * image @ text.T + bias  # [B_images, B_texts]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    signs = -torch.ones_like(logits)
    if own:
        signs.diagonal().fill_(1.0)
    return -F.logsigmoid(signs * logits).sum()


def siglip_loss(image_emb: Tensor, text_emb: Tensor, scale: Tensor, bias: Tensor) -> Tensor:
    """This rank's share of L times W: its images against every rank's texts, / local batch.

    image_emb, text_emb [B, D] L2-normalised local rows; scale = exp(t'), bias scalars.
    """
    blocks = [checkpoint(pair_loss_sum, image_emb, text_emb, scale, bias, True,
                         use_reentrant=False)]  # fmt: skip
    text = text_emb
    for _ in range(distributed.world_size() - 1):
        text = distributed.ring_pass(text)  # the texts of rank r-1, r-2, ...: never positives
        blocks.append(
            checkpoint(pair_loss_sum, image_emb, text, scale, bias, False, use_reentrant=False)
        )
    return torch.stack(blocks).sum() / image_emb.shape[0]


@OBJECTIVES.register("siglip")
class SiglipObjective(Objective):
    Config = SiglipConfig

    batch_coupled = True
    """Every image meets every text of the batch: train.grad_cache keeps the whole batch."""

    def __init__(self, cfg: SiglipConfig):
        self.max_log_scale = math.log(cfg.max_logit_scale)

    def __call__(self, out: ModelOutput, batch: Batch) -> Tensor:
        if out.logit_bias is None:
            raise ValueError("the siglip objective needs a model with a logit bias")
        return siglip_loss(out.image_emb, out.text_emb, out.logit_scale, out.logit_bias)

    def check_model(self, model: nn.Module) -> None:
        """A model without open_clip's logit bias is a config mistake (its init lives in the
        model config, so evaluation and exports rebuild the same model)."""
        if getattr(model.clip, "logit_bias", None) is None:
            raise ConfigError(
                "objectives.siglip needs a model with a learnable logit bias: use a model config "
                'with "init_logit_bias" (e.g. vlp-tiny-clip-sigmoid in configs/models/)'
            )

    @torch.no_grad()
    def after_optimizer_step(self, model: nn.Module) -> None:
        model.logit_scale.clamp_(0, self.max_log_scale)
