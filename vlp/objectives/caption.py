"""CoCa captioning: token cross-entropy of the decoder on the caption's tokens (never padding)."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from vlp import distributed
from vlp.config import ConfigError, TermConfig
from vlp.data.pipeline import Batch
from vlp.model import ModelOutput
from vlp.objectives import OBJECTIVES, Objective


@dataclass
class CaptionConfig(TermConfig):
    weight: float = 0.0
    """CoCa captioning loss; needs a model with a text decoder (open_clip's default is 2.0)."""
    label_smoothing: float = 0.0

    def checks(self) -> list[tuple[bool, str, str]]:
        return [(0 <= self.label_smoothing < 1, "label_smoothing", "in [0, 1)")]


@OBJECTIVES.register("caption")
class CaptionObjective(Objective):
    """The model has already shifted the targets and left out padding (ModelOutput.caption_*)."""

    Config = CaptionConfig

    def __init__(self, cfg: CaptionConfig):
        self.cfg = cfg
        self.label_smoothing = cfg.label_smoothing

    def check_model(self, model: nn.Module) -> None:
        if not model.has_decoder:
            raise ConfigError(
                f"objectives.caption.weight={self.cfg.weight} but the model has no text decoder: "
                "set it to 0 or use a CoCa model (model.name)"
            )

    def __call__(self, out: ModelOutput, batch: Batch) -> Tensor:
        """Mean token cross-entropy over the global batch's caption tokens.

        Each rank returns its token sum scaled by W / (global token count); gradient averaging
        over ranks then yields exactly the single-process mean, even when ranks hold captions
        of different lengths.
        """
        if out.caption_logits is None:
            raise ValueError("the caption objective needs a model with a text decoder (CoCa)")
        targets = out.caption_targets  # [N]: only positions with a caption token
        summed = F.cross_entropy(
            out.caption_logits, targets, reduction="sum", label_smoothing=self.label_smoothing
        )
        tokens = distributed.all_reduce_sum(targets.new_tensor(targets.numel()))
        return summed * distributed.world_size() / tokens.clamp(min=1)
