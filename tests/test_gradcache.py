"""train.grad_cache: accumulated gradients equal those of one step on the whole batch."""

from __future__ import annotations

import contextlib

import torch

from tests.distributed_reference import batch, build
from vlp.config import load_config
from vlp.gradcache import grad_cache_step
from vlp.model import VLPModel, new_clip, register_model_configs
from vlp.objectives import WeightedObjective


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _halves(images, text):
    half = len(images) // 2
    return [(images[:half], text[:half]), (images[half:], text[half:])]


def _grad_cache(model, objective, micro_batches):
    return grad_cache_step(
        lambda b: model(*b),
        objective,
        micro_batches,
        lambda loss: loss.backward(),
        contextlib.nullcontext,
    )


def test_contrastive_gradients_equal_the_whole_batch_and_caption_the_accumulated_mean():
    model, objective = build()  # tiny CoCa in float64, contrastive 1 + caption 2
    images, text = batch()
    micro = _halves(images, text)
    # reference: contrastive loss on all 8 rows at once + caption loss averaged over halves
    # (what plain accumulation gives the caption term too)
    contrastive = objective.terms["contrastive"](model(images, text), None)
    caption = sum(objective.terms["caption"](model(*b), None) for b in micro) / 2
    (contrastive + 2 * caption).backward()
    reference = _grads(model)

    model, objective = build()
    logs = _grad_cache(model, objective, micro)
    cached = _grads(model)
    assert cached.keys() == reference.keys() and len(cached) > 20
    for name, grad in reference.items():
        torch.testing.assert_close(cached[name], grad, atol=1e-10, rtol=1e-8, msg=name)
    torch.testing.assert_close(logs["loss/contrastive"], contrastive.detach())
    torch.testing.assert_close(logs["loss/total"], (contrastive + 2 * caption).detach())


def test_plain_accumulation_would_not_match():
    """The comparison above can fail: per-micro-batch contrastive losses give other grads."""
    model, objective = build()
    images, text = batch()
    objective.terms["contrastive"](model(images, text), None).backward()
    whole = _grads(model)["clip.visual.proj"]
    model, objective = build()
    for b in _halves(images, text):
        (objective.terms["contrastive"](model(*b), None) / 2).backward()
    assert not torch.allclose(_grads(model)["clip.visual.proj"], whole, atol=1e-6)


CUAXU = (
    "objectives.uniformity.weight=1",
    "objectives.alignment.weight=1",
    "objectives.cross_uniformity.weight=1",
    "objectives.caption.weight=0",
)


def test_gap_terms_see_the_whole_batch():
    """Uniformity couples every pair of rows, so GradCache must run it on all micro-batches."""
    model, objective = build(CUAXU)
    images, text = batch()
    objective(model(images, text), None)[0].backward()
    reference = _grads(model)
    model, objective = build(CUAXU)
    logs = _grad_cache(model, objective, _halves(images, text))
    assert {"loss/uniformity", "loss/cross_uniformity", "loss/alignment"} <= logs.keys()
    cached = _grads(model)
    for name, grad in reference.items():
        torch.testing.assert_close(cached[name], grad, atol=1e-10, rtol=1e-8, msg=name)


DREAMLIP = (
    "objectives.contrastive.weight=0",
    "objectives.caption.weight=0",
    "objectives.multi_positive.weight=1",
    "objectives.subcaption_grouping.weight=1",
)


def _dreamlip():
    """A tiny CoCa with patch embeddings in float64, DreamLIP's two terms."""
    register_model_configs()
    torch.manual_seed(0)
    clip = new_clip("vlp-tiny-coca").double()
    objective = WeightedObjective(load_config(None, ["data.train_shards=x", *DREAMLIP]).objectives)
    model = VLPModel(clip, pad_id=clip.pad_id, patch_emb=objective.needs_patches)
    objective.prepare_model(model)
    return model, objective


def test_dreamlip_terms_see_the_whole_batch():
    """Both couple the batch (every image against every slot), so GradCache caches them too,
    patch embeddings and the grouping temperature included."""
    images, text = batch()
    text = torch.cat([text, text.flip(0)], dim=1)  # [B, 2, L]: two slots per image
    model, objective = _dreamlip()
    objective(model(images, text), None)[0].backward()
    reference = _grads(model)
    model, objective = _dreamlip()
    logs = _grad_cache(model, objective, _halves(images, text))
    assert {"loss/multi_positive", "loss/subcaption_grouping"} <= logs.keys()
    cached = _grads(model)
    assert cached.keys() == reference.keys() and "logit_scale_local" in cached
    for name, grad in reference.items():
        torch.testing.assert_close(cached[name], grad, atol=1e-10, rtol=1e-8, msg=name)
