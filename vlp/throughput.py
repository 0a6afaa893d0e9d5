"""Tokens and model FLOPs of the batches a process trains on, for tokens/s, TFLOP/s and MFU.

A model's forward FLOPs per sample are a polynomial of degree 2 in the text length L (linear
layers grow with L, attention with L²); everything else a sample costs does not depend on L. At
start-up `FlopModel` counts (torch's FlopCounterMode) the forward of one sample with 1 and with 2
text slots at three lengths and fits, exactly, text(L) = F₂(L) − F₁(L), the cost of one text slot,
and rest(L) = 2F₁(L) − F₂(L), the image tower, heads and (CoCa) decoder at L with its vocabulary
projection at the L − 1 positions that have a target. A batch of B images with T slots, text cut
to Lt, decoder text to Ld and n caption targets then costs

    B·rest(Ld) + B·T·text(Lt) [+ B·text(Ld) when the decoder reads its own text]
    − p·(B·(Ld − 1) − n)        (p: one vocabulary projection, 2·width·vocab)

forward FLOPs, and a training step three times that (backward ≈ 2 × forward). Tokens are the
positions the towers process: image patches (ViT towers; none for a CNN) and text positions.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from vlp.model import longest

LENGTHS = (4, 8, 12)
"""Text lengths the fit counts at; 3 points fit a degree-2 polynomial exactly."""
BACKWARD_FACTOR = 3.0
"""Training FLOPs / forward FLOPs: the backward pass costs about twice the forward."""
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0}
"""Dense bf16 peaks of common GPUs (vendor figures), matched against the device name."""


class FlopModel:
    """Forward FLOPs of a batch, from counts of one sample at three text lengths."""

    def __init__(self, model: nn.Module, context_length: int):
        self.context, self.pad_id = context_length, model.pad_id
        self.projection = _projection_flops(model)
        self.patches = _image_patches(model)
        one, two = ([self._count(model, slots, n) for n in LENGTHS] for slots in (1, 2))
        self.text = np.polyfit(LENGTHS, [b - a for a, b in zip(one, two, strict=True)], 2)
        self.rest = np.polyfit(LENGTHS, [2 * a - b for a, b in zip(one, two, strict=True)], 2)

    @torch.no_grad()
    def _count(self, model: nn.Module, slots: int, length: int) -> float:
        """Forward FLOPs of one sample as training runs it; in eval mode, so no batch-norm
        statistic or dropout draw of the training run changes, without nn.MultiheadAttention's
        inference fast path (a fused kernel that training never takes)."""
        param, training = next(model.parameters()), model.training
        size = model.clip.visual.image_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        images = torch.zeros(1, 3, *size, device=param.device)
        text = torch.full((1, slots, self.context), self.pad_id, device=param.device)
        text[..., :length] = 1 if self.pad_id != 1 else 2
        fast_path = torch.backends.mha.get_fastpath_enabled()
        model.eval()
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            with FlopCounterMode(display=False) as counter:
                model(images, text)
        finally:
            model.train(training)
            torch.backends.mha.set_fastpath_enabled(fast_path)
        return float(counter.get_total_flops())

    def forward_flops(self, text: torch.Tensor, decoder_text: torch.Tensor | None) -> float:
        """text [B, T, L] token ids; decoder_text [B, L] or None (the decoder reads slot 0)."""
        batch, slots = text.shape[:2]
        text_length = longest(text, self.pad_id)
        decoder = text[:, 0] if decoder_text is None else decoder_text
        decoder_length = text_length if decoder_text is None else longest(decoder, self.pad_id)
        flops = batch * np.polyval(self.rest, decoder_length)
        flops += batch * slots * np.polyval(self.text, text_length)
        if decoder_text is not None:
            flops += batch * np.polyval(self.text, decoder_length)
        if self.projection:
            targets = int((decoder[:, 1:decoder_length] != self.pad_id).sum())
            flops -= self.projection * (batch * (decoder_length - 1) - targets)
        return float(flops)

    def tokens(self, text: torch.Tensor, decoder_text: torch.Tensor | None) -> int:
        """Image patches plus text positions the towers process for this batch."""
        batch, slots = text.shape[:2]
        count = batch * (self.patches + slots * longest(text, self.pad_id))
        if decoder_text is not None:
            count += batch * longest(decoder_text, self.pad_id)
        return count


def _projection_flops(model: nn.Module) -> float:
    """One position's vocabulary projection (CoCa), 0 without a decoder."""
    decoder = getattr(model.clip, "text_decoder", None)
    if decoder is None:
        return 0.0
    return 2.0 * decoder.text_projection.numel()


def _image_patches(model: nn.Module) -> int:
    """Patch tokens of a ViT image tower (open_clip's grid), 0 for other towers."""
    grid = getattr(model.clip.visual, "grid_size", None)
    return int(np.prod(grid)) if grid is not None else 0


class WorkCounter:
    """Tokens and training FLOPs of the batches this process took since the last `take`, and
    the device's peak TFLOP/s (None: unknown) for the MFU."""

    def __init__(self, flops: FlopModel, peak: float | None = None):
        self.model, self.peak, self.tokens, self.flops = flops, peak, 0, 0.0

    def add(self, batch: Any) -> None:
        self.tokens += self.model.tokens(batch.text, batch.decoder_text)
        self.flops += BACKWARD_FACTOR * self.model.forward_flops(batch.text, batch.decoder_text)

    def take(self) -> dict[str, float]:
        work = {"tokens": float(self.tokens), "flops": self.flops}
        self.tokens, self.flops = 0, 0.0
        return work


def peak_tflops(given: float | None, device: torch.device, precision: str) -> float | None:
    """The device's peak TFLOP/s: `train.peak_tflops`, else a known GPU's bf16 peak."""
    if given is not None or device.type != "cuda" or precision != "bf16":
        return given
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in BF16_PEAK_TFLOPS.items() if key in name), None)
