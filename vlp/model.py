"""Models: open_clip towers wrapped to return named outputs.

The wrapper keeps the open_clip model as `self.clip` untouched, so `model.clip.state_dict()` is
an open_clip state dict (that is what checkpoints export), and adds only what open_clip lacks:
several texts per image ([B, T, L] in, [B, T, D] out), patch embeddings in the joint space and
a second learnable temperature for DreamLIP's grouping loss, text towers that skip trailing padding
where that leaves every output unchanged, and a CoCa caption path that decodes only up to the
batch's longest caption and projects to the vocabulary only where there is a target.
"""

from __future__ import annotations

import difflib
import json
import math
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from open_clip.modified_resnet import ModifiedResNet
from safetensors import SafetensorError
from torch import Tensor, nn

from vlp.config import PACKAGED_CONFIGS, ConfigError, ModelConfig
from vlp.openclip_compat import (
    can_trim_coca_text,
    can_trim_text,
    check_patch_projection,
    clip_text,
    coca_image,
    coca_text,
    decoder_states,
    image_with_patches,
)
from vlp.prototypes import ProjectionHead
from vlp.runlayout import OPEN_CLIP_CONFIG_FILE, TOKENIZER_FILES

MODEL_CONFIG_DIR = PACKAGED_CONFIGS / "models"
"""vlp's own open_clip model configs; every JSON dropped here is available by name."""

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
    """[N, V] decoder logits at the N caption positions that have a target (CoCa only)."""
    caption_targets: Tensor | None = None
    """[N] the tokens those positions predict (the caption shifted by one; CoCa only)."""
    patch_emb: Tensor | None = None
    """[B, M, D] L2-normalised patch tokens in the joint space (when the model was built with
    patch_emb=True)."""
    logit_scale_local: Tensor | None = None
    """() exp(logit_scale_local): the grouping loss's temperature's inverse (with patch_emb)."""
    image_proto: Tensor | None = None
    """[B, P] L2-normalised prototype-head outputs of the image embeddings (with heads)."""
    text_proto: Tensor | None = None
    """[B, P] the same for text slot 0."""
    logit_scale_proto: Tensor | None = None
    """() exp(logit_scale_proto): the prototype losses' temperature's inverse (with heads)."""
    logit_bias: Tensor | None = None
    """() the open_clip model's learnable logit bias (SigLIP), where its config has one."""


class VLPModel(nn.Module):
    """An open_clip CLIP or CoCa model with vlp's forward.

    With `patch_emb=True` the forward also returns the image tower's patch tokens projected into
    the joint space, and the model owns `logit_scale_local` (init ln(1/0.07)), a training-only
    parameter outside `self.clip`, so exported open_clip weights are unchanged. Likewise
    `add_prototype_heads` adds ProtoCLIP's training-only heads and `logit_scale_proto`.
    """

    def __init__(self, clip: nn.Module, pad_id: int = 0, patch_emb: bool = False):
        super().__init__()
        self.clip = clip
        self.pad_id = pad_id
        self.has_decoder = hasattr(clip, "text_decoder")
        self.trims_text = can_trim_text(clip)
        self.trims_coca_text = can_trim_coca_text(clip)
        # a CNN tower's convolutions run about 1.5x faster on a CPU with channels-last inputs
        # (oneDNN's native layout); a ViT's one patch convolution gains nothing, so its inputs
        # (and its numbers) stay as they are
        self.channels_last = isinstance(clip.visual, ModifiedResNet)
        self.patch_emb = patch_emb
        if patch_emb:
            check_patch_projection(clip.visual)
            self.logit_scale_local = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.has_heads = False

    def add_prototype_heads(self, hidden: int, dim: int, layers: int) -> None:
        """ProtoCLIP's image and text heads (independent weights) on the un-normalised joint
        embeddings, and `logit_scale_proto` (init ln(1/0.07)); before the optimizer is built."""
        embed_dim = self.clip.visual.output_dim
        self.image_head = ProjectionHead(embed_dim, hidden, dim, layers)
        self.text_head = ProjectionHead(embed_dim, hidden, dim, layers)
        self.logit_scale_proto = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.has_heads = True

    @property
    def logit_scale(self) -> nn.Parameter:
        return self.clip.logit_scale

    def temperatures(self) -> dict[str, Tensor]:
        """Every learnable temperature as its scale exp(t), and the logit bias, for the logs."""
        logs = {"logit_scale": self.logit_scale.detach().exp()}
        bias = getattr(self.clip, "logit_bias", None)  # SigLIP models only
        if bias is not None:
            logs["logit_bias"] = bias.detach()
        if self.patch_emb:
            logs["logit_scale_local"] = self.logit_scale_local.detach().exp()
        if self.has_heads:
            logs["logit_scale_proto"] = self.logit_scale_proto.detach().exp()
        return logs

    def forward(self, images: Tensor, text: Tensor, decoder_text: Tensor | None = None):
        """images [B, 3, H, W]; text [B, T, L] token ids; decoder_text [B, L] or None (slot 0)."""
        batch, slots, length = text.shape
        image_latent, image_tokens, patches = self._encode_image(images)
        # rows of [B*T, L] are image-major (b*T + k), so reshape restores [B, T, D] exactly
        text_latent, text_tokens = self._encode_texts(text.reshape(-1, length))
        text_latent = text_latent.reshape(batch, slots, -1)
        # normalised here, exactly as open_clip's encoders would (the heads read the latents)
        text_all = F.normalize(text_latent, dim=-1)
        out = ModelOutput(
            image_emb=F.normalize(image_latent, dim=-1),
            text_emb=text_all[:, 0],
            logit_scale=self.clip.logit_scale.exp(),
            text_emb_all=text_all if slots > 1 else None,
            patch_emb=patches,
            logit_scale_local=self.logit_scale_local.exp() if self.patch_emb else None,
            logit_bias=getattr(self.clip, "logit_bias", None),
        )
        if self.has_heads:
            out.image_proto, out.text_proto = self._heads(image_latent, text_latent[:, 0])
            out.logit_scale_proto = self.logit_scale_proto.exp()
        if self.has_decoder:
            if decoder_text is None:
                decoder_text = text[:, 0]
                decoder_tokens = text_tokens.unflatten(0, (batch, slots))[:, 0]
            else:
                decoder_tokens = self._encode_coca_text(decoder_text)[1]
            out.caption_logits, out.caption_targets = self._caption(
                image_tokens, decoder_tokens, decoder_text
            )
        return out

    @torch.no_grad()
    def prototype_features(self, images: Tensor, text: Tensor) -> tuple[Tensor, Tensor]:
        """Normalised head outputs ([B, P] image, [B, P] text) of images and tokens [B, L],
        without the decoder (ProtoCLIP's feature pass; the caller sets eval mode)."""
        image_latent = self._encode_image(images)[0]
        return self._heads(image_latent, self._encode_texts(text)[0])

    def _heads(self, image_latent: Tensor, text_latent: Tensor) -> tuple[Tensor, Tensor]:
        image = F.normalize(self.image_head(image_latent), dim=-1)
        return image, F.normalize(self.text_head(text_latent), dim=-1)

    def _encode_image(self, images: Tensor) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """(un-normalised image embeddings [B, D], the tower's token output for CoCa's decoder
        or None, normalised patch embeddings [B, M, D] with patch_emb or None)."""
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if self.patch_emb:
            return self._encode_image_with_patches(images)
        if self.has_decoder:
            return (*coca_image(self.clip, images), None)
        return self.clip.encode_image(images, normalize=False), None, None

    def _encode_texts(self, tokens: Tensor) -> tuple[Tensor, Tensor | None]:
        """(un-normalised text embeddings [N, D], CoCa's token states [N, L', W] or None)."""
        if self.has_decoder:
            return self._encode_coca_text(tokens, normalize=False)
        return self._encode_text(tokens, normalize=False), None

    def _encode_image_with_patches(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(un-normalised image embeddings [B, D], the tower's usual token output (CoCa's
        decoder input), normalised patch embeddings [B, M, D]) from one pass of the image tower."""
        pooled, tokens, patches = image_with_patches(self.clip.visual, images)
        return pooled, tokens, F.normalize(patches, dim=-1)

    def _encode_text(self, tokens: Tensor, normalize: bool = True) -> Tensor:
        """Text embeddings [N, D]; drops trailing padding where that is exact."""
        if not self.trims_text:
            return self.clip.encode_text(tokens, normalize=normalize)
        x = clip_text(self.clip, tokens[:, : longest(tokens, self.pad_id)])
        return F.normalize(x, dim=-1) if normalize else x

    def _encode_coca_text(self, tokens: Tensor, normalize: bool = True) -> tuple[Tensor, Tensor]:
        """CoCa text tower: (embeddings [N, D], token states [N, L', W]), L' = the longest
        caption + 1 where that is exact (openclip_compat.coca_text)."""
        if not self.trims_coca_text:
            return self.clip._encode_text(tokens, normalize=normalize)
        keep = min(tokens.shape[1], longest(tokens, self.pad_id) + 1)
        pooled, states = coca_text(self.clip.text, tokens, keep)
        return F.normalize(pooled, dim=-1) if normalize else pooled, states

    def _caption(self, image_tokens: Tensor, token_embs: Tensor, tokens: Tensor):
        """Teacher forcing: position i predicts token i+1. The shift happens here and only here.

        Decoding stops at the batch's longest caption: the decoder is causal, so dropping
        trailing padding leaves every kept position's states unchanged. The vocabulary
        projection, the largest matrix product of the model, runs only at positions whose
        target is a caption token, not padding.
        """
        length = max(2, longest(tokens, self.pad_id))
        targets = tokens[:, 1:length]
        valid = targets != self.pad_id
        decoder = self.clip.text_decoder
        states = decoder_states(decoder, image_tokens, token_embs[:, : length - 1])
        return states[valid] @ decoder.text_projection, targets[valid]  # [N, V], [N]


def longest(tokens: Tensor, pad_id: int) -> int:
    """1 + the last non-padding position over the whole batch (tokens [..., L])."""
    used = (tokens != pad_id).flatten(0, -2).any(0).nonzero()
    return int(used.max()) + 1 if len(used) else 1


def build_model(model_cfg: Any, patch_emb: bool = False) -> tuple[VLPModel, Any, Any, Any]:
    """(model, train transform, eval transform, tokenizer) from the model config slice.

    `patch_emb`: also return patch embeddings and own `logit_scale_local` (objectives that need
    them say so; see WeightedObjective.needs_patches)."""
    register_model_configs(*model_cfg.config_dirs)
    name = model_cfg.name
    if name not in open_clip.list_models():
        near = difflib.get_close_matches(name, open_clip.list_models(), n=3, cutoff=0.4)
        hint = f"; did you mean {', '.join(near)}?" if near else ""
        raise ConfigError(f"model.name: unknown model {name!r}{hint} (configs/models/*.json)")
    pretrained = model_cfg.pretrained
    if pretrained is not None and ("/" in pretrained or "." in pretrained):
        if not Path(pretrained).is_file():
            raise ConfigError(f"model.pretrained: {pretrained}: no such weights file")
    kwargs: dict[str, Any] = {}
    if model_cfg.hf_text_model is not None:
        kwargs["text_cfg"] = _hf_text_cfg(name, model_cfg.hf_text_model)
        kwargs["force_custom_text"] = True  # open_clip decides the class before applying kwargs
    try:  # open_clip reads torch files with weights_only=True: a pickle with code is refused
        clip, train_transform, eval_transform = open_clip.create_model_and_transforms(
            name, pretrained=model_cfg.pretrained, **kwargs
        )
    except (pickle.UnpicklingError, SafetensorError, EOFError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ConfigError(
            f"model.pretrained: {pretrained}: not loadable as plain tensors ({first}); "
            "use a safetensors or weights-only torch file"
        ) from None
    if model_cfg.hf_text_model is not None:
        context = kwargs["text_cfg"]["context_length"]
        tokenizer = open_clip.tokenizer.HFTokenizer(model_cfg.hf_text_model, context_length=context)
    else:
        tokenizer = open_clip.get_tokenizer(name)
    if model_cfg.pretrained is None and hasattr(clip, "text_decoder"):
        init_decoder_projection(clip.text_decoder)
    if model_cfg.lock_image:
        clip.lock_image_tower()
    if model_cfg.lock_text:
        clip.lock_text_tower()
    if model_cfg.grad_checkpointing:
        clip.set_grad_checkpointing(True)
    return (
        VLPModel(clip, pad_id=getattr(clip, "pad_id", 0), patch_emb=patch_emb),
        train_transform,
        eval_transform,
        tokenizer,
    )


def new_clip(name: str, **kwargs: Any) -> nn.Module:
    """A randomly initialised open_clip model, every parameter initialised.

    Use this, not `open_clip.create_model`, for a fresh model outside `build_model`: a CoCa's
    vocabulary projection is otherwise uninitialised memory (see `init_decoder_projection`)."""
    clip = open_clip.create_model(name, **kwargs)
    if hasattr(clip, "text_decoder"):
        init_decoder_projection(clip.text_decoder)
    return clip


def init_decoder_projection(decoder: nn.Module) -> None:
    """Initialise the CoCa decoder's vocabulary projection.

    open_clip 3.3 builds it with torch.empty and never initialises it (its MultimodalTransformer
    .init_parameters is never called and would fail if it were), so a fresh CoCa starts from
    uninitialised memory: garbage logits, or NaN when deterministic algorithms are on.
    """
    with torch.no_grad():
        nn.init.normal_(decoder.text_projection, std=decoder.width**-0.5)


@dataclass(frozen=True)
class OpenClipHub:
    """What makes a directory of open_clip weights loadable by path (`local-dir:DIR`): the hub
    config and, for a Hugging Face text tower, its tokenizer files."""

    config: dict[str, Any]
    files: tuple[Path, ...] = ()

    @classmethod
    def of(cls, model_cfg: ModelConfig, clip: nn.Module) -> OpenClipHub:
        """The model's open_clip config (its text tower the model.hf_text_model folder, by
        absolute path) and the preprocessing it was built with."""
        config = json.loads(json.dumps(open_clip.get_model_config(model_cfg.name)))
        files: tuple[Path, ...] = ()
        if model_cfg.hf_text_model is not None:
            folder = Path(model_cfg.hf_text_model).resolve()
            config["text_cfg"] = _hf_text_cfg(model_cfg.name, str(folder))
            files = tuple(folder / n for n in TOKENIZER_FILES if (folder / n).is_file())
        preprocess = open_clip.get_model_preprocess_cfg(clip)
        return cls({"model_cfg": config, "preprocess_cfg": preprocess}, files)

    def write(self, directory: Path) -> None:
        (directory / OPEN_CLIP_CONFIG_FILE).write_text(json.dumps(self.config, indent=2))
        for file in self.files:
            shutil.copy2(file, directory / file.name)


def _hf_text_cfg(name: str, path: str) -> dict[str, Any]:
    """The config's text tower replaced by a local Hugging Face model (offline)."""
    if not Path(path).is_dir():
        raise ConfigError(f"model.hf_text_model: {path} is not a local model folder")
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
    text_cfg.setdefault("context_length", 77)
    return text_cfg
