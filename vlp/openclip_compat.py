"""Every open_clip internal vlp relies on, in one place.

open_clip's public API encodes whole padded contexts, returns no patch tokens and no decoder
states, and (in 3.3) cannot generate captions with transformers 5. vlp does those itself over
open_clip's own modules: the functions here read their attributes, which open_clip may rename in
any release. `INTERNALS` lists each attribute by the class that owns it and `missing_internals`
checks a model against the installed open_clip (tests/test_openclip_compat.py names what is
gone); pyproject.toml keeps open_clip_torch below its next, untested, major version.
"""

from __future__ import annotations

import inspect

import open_clip
import torch
import torch.nn.functional as F
from open_clip.transformer import TextTransformer, VisionTransformer, text_global_pool
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from vlp.config import ConfigError

INTERNALS: dict[str, tuple[str, ...]] = {
    "CLIP": ("attn_mask", "text_pool_type", "token_embedding", "positional_embedding",
             "transformer", "ln_final", "text_projection"),
    "CoCa": ("_encode_image", "_encode_text", "text", "text_decoder"),
    "TextTransformer": ("cls_emb", "attn_mask", "use_pad_mask", "_build_additive_mask",
                        "token_embedding", "positional_embedding", "transformer", "ln_final",
                        "text_projection", "context_length"),
    "VisionTransformer": ("_embeds", "_pool", "transformer", "ln_post", "proj", "conv1"),
    "MultimodalTransformer": ("attn_mask", "batch_first", "resblocks", "cross_attn",
                              "grad_checkpointing", "ln_final", "text_projection"),
    "cross-attention block": ("attn", "ln_1", "ln_1_kv", "ls_1", "ls_2", "ln_2", "mlp"),
}  # fmt: skip
"""The attributes vlp reads, by the open_clip class (or part) that owns them."""
POOL_PARAMETERS = ("x", "text", "pool_type", "eos_token_id")
"""open_clip.transformer.text_global_pool's parameters, as vlp passes them."""


def missing_internals(model: nn.Module) -> list[str]:
    """'Owner.attribute' for every internal of INTERNALS that this open_clip CLIP or CoCa (and
    its towers) lacks; empty when vlp can use it as it is."""
    parts: dict[str, object] = {}
    if type(model) is open_clip.CLIP:
        parts["CLIP"] = model
    if isinstance(model, open_clip.CoCa):
        decoder = model.text_decoder
        parts.update(CoCa=model, TextTransformer=model.text, MultimodalTransformer=decoder)
        parts["cross-attention block"] = decoder.cross_attn[0]
    if type(model.visual) is VisionTransformer:
        parts["VisionTransformer"] = model.visual
    missing = [
        f"{owner}.{name}"
        for owner, part in parts.items()
        for name in INTERNALS[owner]
        if not hasattr(part, name)
    ]
    found = tuple(inspect.signature(text_global_pool).parameters)
    if found[: len(POOL_PARAMETERS)] != POOL_PARAMETERS:
        missing.append(f"text_global_pool{POOL_PARAMETERS} (found {found})")
    return missing


def can_trim_text(clip: nn.Module, pools: tuple[str, ...] = ("argmax", "eos", "first")) -> bool:
    """Whether dropping trailing padding leaves open_clip's CLIP text embeddings unchanged.

    True for the classic CLIP text tower with a causal mask and a pooled position that does not
    move (one of `pools`): every kept position sees the same tokens, and the pooled one is kept
    (a caller that cuts at the argmax token passes ("argmax",)). CoCa: can_trim_coca_text.
    """
    return (
        type(clip) is open_clip.CLIP
        and getattr(clip, "attn_mask", None) is not None
        and getattr(clip, "text_pool_type", None) in pools
    )


def clip_text(clip: nn.Module, tokens: Tensor) -> Tensor:
    """open_clip's CLIP.encode_text, un-normalised, on tokens [N, L'] cut after the batch's last
    caption token (it always adds the full-length positional table, so it cannot be fed less);
    with can_trim_text, equal to encode_text on the full rows."""
    length = tokens.shape[1]
    cast = clip.transformer.get_cast_dtype()
    x = clip.token_embedding(tokens).to(cast) + clip.positional_embedding[:length].to(cast)
    x = clip.ln_final(clip.transformer(x, attn_mask=clip.attn_mask[:length, :length]))
    x = text_global_pool(
        x, tokens, clip.text_pool_type, eos_token_id=getattr(clip, "text_eos_id", None)
    )
    return _project(x, clip.text_projection)


def can_trim_coca_text(clip: nn.Module) -> bool:
    """Whether coca_text applies: open_clip's own causal CoCa text tower."""
    text = getattr(clip, "text", None)
    return (
        type(text) is TextTransformer
        and text.cls_emb is not None
        and text.attn_mask is not None
        and not text.use_pad_mask
    )


def coca_text(text: nn.Module, tokens: Tensor, keep: int) -> tuple[Tensor, Tensor]:
    """CoCa's text tower on tokens [N, L] cut to `keep` positions: (un-normalised embeddings
    [N, D], token states [N, keep, W]).

    open_clip appends the CLS token after the full padded context. Cut to the longest caption
    + 1 (open_clip's CLS mask lets CLS see the first padding position), with CLS keeping its
    full-context positional embedding, every kept output equals open_clip's: tokens are causal,
    and CLS never sees the padding dropped.
    """
    full = tokens.shape[1]
    tokens = tokens[:, :keep]
    cast = text.transformer.get_cast_dtype()
    cls = text.cls_emb.to(cast).expand(tokens.shape[0], 1, -1)
    x = torch.cat([text.token_embedding(tokens).to(cast), cls], dim=1)
    positions = torch.cat([text.positional_embedding[:keep], text.positional_embedding[full:]])
    x = x + positions.to(cast)
    mask = text.attn_mask[: keep + 1, : keep + 1] + text._build_additive_mask(
        tokens, keep + 1, x.dtype
    )
    x = text.transformer(x, attn_mask=mask)
    return _project(text.ln_final(x[:, -1]), text.text_projection), x[:, :-1]


def _project(x: Tensor, projection: nn.Module | Tensor | None) -> Tensor:
    if isinstance(projection, nn.Linear):
        return projection(x)
    return x if projection is None else x @ projection


def image_with_patches(visual: nn.Module, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(un-normalised image embeddings [B, D], the tower's usual token output (CoCa's decoder
    input), un-normalised patch embeddings [B, M, D]) from one pass of the image tower.

    open_clip's VisionTransformer.forward, also keeping the transformer's output: the patch
    tokens (CLS dropped) before any attention pooler, through the tower's own ln_post and
    projection, the same map that takes CLIP's CLS token to the joint space.
    """
    x = visual.transformer(visual._embeds(images))
    pooled, tokens = visual._pool(x)
    return pooled @ visual.proj, tokens, visual.ln_post(x[:, 1:]) @ visual.proj


def check_patch_projection(visual: nn.Module) -> None:
    """Patch embeddings need open_clip's ViT whose ln_post and proj fit its token width."""
    if type(visual) is not VisionTransformer or visual.proj is None:
        raise ConfigError(
            "objectives.subcaption_grouping needs patch embeddings: the model's image tower must "
            "be open_clip's VisionTransformer with a projection (not a timm or ResNet tower)"
        )
    width = visual.conv1.out_channels
    if visual.ln_post.normalized_shape[0] != width or visual.proj.shape[0] != width:
        raise ConfigError(
            f"objectives.subcaption_grouping needs patch embeddings, but the image tower's width "
            f"{width} differs from its projection's input {visual.proj.shape[0]} (a CoCa needs "
            "embed_dim equal to vision width): choose such a model config"
        )


def decoder_states(decoder: nn.Module, image_tokens: Tensor, text_embs: Tensor) -> Tensor:
    """open_clip's MultimodalTransformer.forward without its final vocabulary projection.

    image_tokens [B, I, W], text_embs [B, L, W] -> [B, L, W] after ln_final.
    """
    length = text_embs.shape[1]
    mask = decoder.attn_mask[:length, :length]
    if not decoder.batch_first:
        image_tokens, text_embs = image_tokens.transpose(0, 1), text_embs.transpose(0, 1)
    for block, cross in zip(decoder.resblocks, decoder.cross_attn, strict=True):
        if decoder.grad_checkpointing:
            text_embs = checkpoint(block, text_embs, None, None, mask, use_reentrant=False)
            text_embs = checkpoint(
                cross, text_embs, image_tokens, image_tokens, None, use_reentrant=False
            )
        else:
            text_embs = block(text_embs, attn_mask=mask)
            text_embs = cross(text_embs, k_x=image_tokens, v_x=image_tokens)
    if not decoder.batch_first:
        text_embs = text_embs.transpose(0, 1)
    return decoder.ln_final(text_embs)


def coca_caption_context(coca: nn.Module) -> int:
    """The positions a CoCa's causal text tower and decoder can both hold."""
    decoder_context = coca.text_decoder.attn_mask.shape[0]
    return min(getattr(coca.text, "context_length", decoder_context), decoder_context)


def coca_image(coca: nn.Module, images: Tensor) -> tuple[Tensor, Tensor]:
    """A CoCa's (un-normalised image embeddings [B, D], image tokens [B, I, W] for its decoder)."""
    return coca._encode_image(images, normalize=False)


def coca_cross_cache(coca: nn.Module, images: Tensor) -> list[tuple[Tensor, Tensor]]:
    """For caption decoding: each decoder cross-attention block's keys and values over the
    image tokens of (B, 3, H, W) images, computed once per image (cross_keys_values)."""
    decoder = coca.text_decoder
    if not decoder.batch_first:
        raise ValueError("caption generation needs a batch-first open_clip decoder")
    image_tokens = coca_image(coca, images)[1]  # (B, I, W)
    return [cross_keys_values(block, image_tokens) for block in decoder.cross_attn]


def coca_next_logits(
    coca: nn.Module, prefixes: Tensor, cache: list[tuple[Tensor, Tensor]]
) -> Tensor:
    """(A * G, t) token prefixes, G consecutive rows per image of `cache` (A images) ->
    (A * G, V) float32 logits of the token after each prefix. The causal text tower and the
    decoder's self-attention run on the whole prefix: their states over a prefix equal those
    of the full sequence at the same positions."""
    decoder = coca.text_decoder
    x = coca._encode_text(prefixes, normalize=False)[1]  # (A * G, t, W)
    length = x.shape[1]
    mask = decoder.attn_mask[:length, :length]
    for block, cross, keys_values in zip(decoder.resblocks, decoder.cross_attn, cache, strict=True):
        x = cross_block(cross, block(x, attn_mask=mask), *keys_values)
    last = decoder.ln_final(x[:, -1])  # (A * G, W)
    return (last @ decoder.text_projection).float()


def cross_keys_values(block: nn.Module, image_tokens: Tensor) -> tuple[Tensor, Tensor]:
    """A decoder cross-attention block's keys and values of (B, I, W) image tokens: (B, H, I,
    W / H) each, as its nn.MultiheadAttention projects them (after the block's ln_1_kv)."""
    attn = block.attn
    width = attn.embed_dim
    normed = block.ln_1_kv(image_tokens)
    keys = F.linear(
        normed, attn.in_proj_weight[width : 2 * width], attn.in_proj_bias[width : 2 * width]
    )
    values = F.linear(normed, attn.in_proj_weight[2 * width :], attn.in_proj_bias[2 * width :])
    return _heads(keys, attn.num_heads), _heads(values, attn.num_heads)


def cross_block(block: nn.Module, x: Tensor, keys: Tensor, values: Tensor) -> Tensor:
    """A decoder cross-attention block (pre-norm attention over the image, then MLP) on text
    states x (A * G, t, W), with cached keys and values (A, H, I, W / H) of A images.

    Cross-attention has no mask, so the G prefixes of an image are stacked along the query
    axis and share its keys and values.
    """
    attn = block.attn
    rows, length, width = x.shape
    images = keys.shape[0]
    queries = block.ln_1(x)
    q = F.linear(queries, attn.in_proj_weight[:width], attn.in_proj_bias[:width])
    q = _heads(q.reshape(images, rows // images * length, width), attn.num_heads)
    out = F.scaled_dot_product_attention(q, keys, values)  # (A, H, G * t, W / H)
    x = x + block.ls_1(attn.out_proj(out.transpose(1, 2).reshape(rows, length, width)))
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def _heads(x: Tensor, num_heads: int) -> Tensor:
    """(N, L, W) -> (N, H, L, W / H)."""
    return x.unflatten(2, (num_heads, -1)).transpose(1, 2)
