"""Models: open_clip towers wrapped to return named outputs.

The wrapper keeps the open_clip model as `self.clip` untouched, so `model.clip.state_dict()` is
an open_clip state dict (that is what checkpoints export), and adds only what open_clip lacks:
several texts per image ([B, T, L] in, [B, T, D] out) and a CoCa caption path that decodes only
up to the batch's longest caption.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
from torch import Tensor, nn

MODEL_CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "models"
"""vlp's own open_clip model configs; every JSON dropped here is available by name."""

IGNORE_INDEX = -100
"""Target value the caption loss skips (F.cross_entropy's default ignore_index)."""

_registered: set[Path] = set()


def register_model_configs(*directories: Path | str) -> list[str]:
    """Register vlp's model configs (and any extra directories) with open_clip; return all names."""
    for directory in (MODEL_CONFIG_DIR, *map(Path, directories)):
        if directory.resolve() not in _registered:
            open_clip.add_model_config(directory)
            _registered.add(directory.resolve())
    return open_clip.list_models()


@dataclass
class ModelOutput:
    image_emb: Tensor
    """[B, D] L2-normalised image embeddings."""
    text_emb: Tensor
    """[B, D] L2-normalised embeddings of text slot 0 (the caption contrastive losses use)."""
    logit_scale: Tensor
    """() exp(logit_scale): the contrastive temperature's inverse."""
    text_emb_all: Tensor | None = None
    """[B, T, D] every text slot, when the batch has several texts per image."""
    caption_logits: Tensor | None = None
    """[B, L', V] decoder logits, L' = the batch's longest caption - 1 (CoCa only)."""
    caption_targets: Tensor | None = None
    """[B, L'] the tokens those positions predict (caption shifted by one), IGNORE_INDEX at
    padding (CoCa only)."""


class VLPModel(nn.Module):
    """An open_clip CLIP or CoCa model with vlp's forward."""

    def __init__(self, clip: nn.Module, pad_id: int = 0):
        super().__init__()
        self.clip = clip
        self.pad_id = pad_id
        self.has_decoder = hasattr(clip, "text_decoder")

    @property
    def logit_scale(self) -> nn.Parameter:
        return self.clip.logit_scale

    def forward(self, images: Tensor, text: Tensor, decoder_text: Tensor | None = None):
        """images [B, 3, H, W]; text [B, T, L] token ids; decoder_text [B, L] or None (slot 0)."""
        batch, slots, length = text.shape
        if self.has_decoder:
            image_emb, image_tokens = self.clip._encode_image(images, normalize=True)
            text_latent, text_tokens = self.clip._encode_text(text.reshape(-1, length))
        else:
            image_emb = self.clip.encode_image(images, normalize=True)
            text_latent = self.clip.encode_text(text.reshape(-1, length), normalize=True)
        text_all = text_latent.reshape(batch, slots, -1)
        out = ModelOutput(
            image_emb=image_emb,
            text_emb=text_all[:, 0],
            logit_scale=self.clip.logit_scale.exp(),
            text_emb_all=text_all if slots > 1 else None,
        )
        if self.has_decoder:
            if decoder_text is None:
                decoder_text = text[:, 0]
                decoder_tokens = text_tokens.reshape(batch, slots, length, -1)[:, 0]
            else:
                decoder_tokens = self.clip._encode_text(decoder_text)[1]
            out.caption_logits, out.caption_targets = self._caption(
                image_tokens, decoder_tokens, decoder_text
            )
        return out

    def _caption(self, image_tokens: Tensor, token_embs: Tensor, tokens: Tensor):
        """Teacher forcing: position i predicts token i+1. The shift happens here and only here.

        Decoding stops at the batch's longest caption: the decoder is causal, so dropping
        trailing padding leaves every kept position's logits unchanged. Padding targets become
        IGNORE_INDEX (cross-entropy's default ignore value).
        """
        valid = tokens != self.pad_id  # [B, L]
        length = int(valid.any(0).nonzero().max()) + 1 if valid.any() else 2
        targets = tokens[:, 1:length].masked_fill(~valid[:, 1:length], IGNORE_INDEX)
        logits = self.clip.text_decoder(image_tokens, token_embs[:, : length - 1])
        return logits, targets  # [B, length-1, V], [B, length-1]


def build_model(model_cfg: Any) -> tuple[VLPModel, Any, Any, Any]:
    """(model, train transform, eval transform, tokenizer) from the model config slice."""
    register_model_configs(*model_cfg.config_dirs)
    name = model_cfg.name
    if name not in open_clip.list_models():
        raise ValueError(f"unknown model {name!r}; known: {', '.join(open_clip.list_models())}")
    kwargs: dict[str, Any] = {}
    if model_cfg.hf_text_model is not None:
        kwargs["text_cfg"] = _hf_text_cfg(name, model_cfg.hf_text_model)
    clip, train_transform, eval_transform = open_clip.create_model_and_transforms(
        name, pretrained=model_cfg.pretrained, **kwargs
    )
    tokenizer = (
        open_clip.HFTokenizer(model_cfg.hf_text_model, context_length=clip.context_length)
        if model_cfg.hf_text_model is not None
        else open_clip.get_tokenizer(name)
    )
    if model_cfg.pretrained is None and hasattr(clip, "text_decoder"):
        init_decoder_projection(clip.text_decoder)
    if model_cfg.lock_image:
        clip.lock_image_tower()
    if model_cfg.lock_text:
        clip.lock_text_tower()
    if model_cfg.grad_checkpointing:
        clip.set_grad_checkpointing(True)
    return (
        VLPModel(clip, pad_id=getattr(clip, "pad_id", 0)),
        train_transform,
        eval_transform,
        tokenizer,
    )


def init_decoder_projection(decoder: nn.Module) -> None:
    """Initialise the CoCa decoder's vocabulary projection.

    open_clip 3.3 builds it with torch.empty and never initialises it (its MultimodalTransformer
    .init_parameters is never called and would fail if it were), so a fresh CoCa starts from
    uninitialised memory: garbage logits, or NaN when deterministic algorithms are on.
    """
    with torch.no_grad():
        nn.init.normal_(decoder.text_projection, std=decoder.width**-0.5)


def _hf_text_cfg(name: str, path: str) -> dict[str, Any]:
    """The config's text tower replaced by a local Hugging Face model (offline)."""
    if not Path(path).is_dir():
        raise ValueError(f"model.hf_text_model: {path} is not a local model folder")
    config = json.loads(json.dumps(open_clip.get_model_config(name)))
    text_cfg = config["text_cfg"]
    text_cfg.update(
        hf_model_name=path,
        hf_tokenizer_name=path,
        hf_proj_type="linear",
        hf_pooler_type="mean_pooler",
    )
    for key in ("width", "heads", "layers", "vocab_size"):
        text_cfg.pop(key, None)
    return text_cfg


@torch.no_grad()
def export_state_dict(model: VLPModel) -> dict[str, Tensor]:
    """The open_clip model's own weights, contiguous and on CPU (for safetensors)."""
    return {k: v.detach().cpu().contiguous() for k, v in model.clip.state_dict().items()}
