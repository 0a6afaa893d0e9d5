"""CoCa captioning: token cross-entropy of the decoder on the caption, padding ignored."""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor

from vlp.objectives import OBJECTIVES


@OBJECTIVES.register("caption")
class CaptionObjective:
    """The model has already shifted and selected positions (see ModelOutput.caption_logits)."""

    def __init__(self, cfg: Any):
        self.label_smoothing = cfg.label_smoothing

    def __call__(self, out: Any, batch: Any) -> Tensor:
        if out.caption_logits is None:
            raise ValueError("the caption objective needs a model with a text decoder (CoCa)")
        return F.cross_entropy(
            out.caption_logits, out.caption_targets, label_smoothing=self.label_smoothing
        )
