"""The model, batch and step shared by the 1-process and 2-process runs of test_distributed."""

import open_clip
import torch

from vlp.config import load_config
from vlp.model import VLPModel, new_clip, register_model_configs
from vlp.objectives import WeightedObjective

CAPTIONS = [
    "a red circle",
    "a small blue star and a large green cross",
    "two shapes: a white heart and a purple hexagon in the corner",
    "a cyan diamond",
    "an orange square",
    "a pink triangle, a yellow star and a blue circle",
    "a heart",
    "three shapes",
]


def build(overrides: list[str] | tuple[str, ...] = ()):
    """The model and objective; `overrides` are config overrides of the objectives."""
    register_model_configs()
    torch.manual_seed(0)
    clip = new_clip("vlp-tiny-coca").double()
    cfg = load_config(None, ["data.train_shards=x", "objectives.caption.weight=2", *overrides])
    model, objective = VLPModel(clip, pad_id=clip.pad_id), WeightedObjective(cfg.objectives)
    objective.prepare_model(model)
    return model, objective


def batch():
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(len(CAPTIONS), 3, 32, 32, generator=generator, dtype=torch.float64)
    text = open_clip.get_tokenizer("vlp-tiny-coca")(CAPTIONS)[:, None]
    return images, text


def loss_and_grads(model, objective, images, text, accelerator=None):
    loss, _ = objective(model(images, text), None)
    return loss, backward_and_grads(model, loss, accelerator)


def backward_and_grads(model, loss, accelerator=None) -> dict[str, torch.Tensor]:
    """Backward (accelerate's under DDP) and every parameter's gradient, by name."""
    if accelerator is None:
        loss.backward()
    else:
        accelerator.backward(loss)
    module = model.module if hasattr(model, "module") else model  # unwrap DDP
    return {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}
