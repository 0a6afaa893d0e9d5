"""Training objectives: registered terms, each an unweighted scalar, combined by weight.

A term is a class registered in OBJECTIVES, built from its own config slice, and called as
`term(out: ModelOutput, batch: Batch) -> Tensor`. It may define `prepare_model(model)` (run once,
before the optimizer is built: e.g. to freeze its temperature), `after_optimizer_step(model)`
(e.g. to clamp its temperature; `model` is the VLPModel in both) and `needs_patches = True` (the
model must return patch embeddings). An episodic term (`needs_episodes = True`, ProtoCLIP) gets
`set_episode(state)` at each episode's start and returns None where it does not train.
`WeightedObjective` builds the terms whose weight is non-zero.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from vlp.registry import Registry

OBJECTIVES: Registry[type] = Registry("objective")


class WeightedObjective:
    """total = sum_k weight_k * term_k; logs every term (unweighted) and the total."""

    def __init__(self, objectives_cfg: Any):
        self.terms = {}
        self.weights = {}
        for name, term_cfg in objectives_cfg.active().items():
            self.terms[name] = OBJECTIVES.get(name)(term_cfg)
            self.weights[name] = term_cfg.weight

    @property
    def needs_patches(self) -> bool:
        return any(getattr(term, "needs_patches", False) for term in self.terms.values())

    @property
    def needs_episodes(self) -> bool:
        return any(getattr(term, "needs_episodes", False) for term in self.terms.values())

    def __call__(self, out: Any, batch: Any) -> tuple[Tensor, dict[str, Tensor]]:
        logs: dict[str, Tensor] = {}
        total = torch.zeros((), device=out.image_emb.device)
        for name, term in self.terms.items():
            value = term(out, batch)
            if value is None:  # an episodic term outside its episodes
                continue
            logs[f"loss/{name}"] = value.detach()
            total = total + self.weights[name] * value
        logs["loss/total"] = total.detach()
        return total, logs

    def prepare_model(self, model: nn.Module) -> None:
        self._call_hooks("prepare_model", model)

    def after_optimizer_step(self, model: nn.Module) -> None:
        self._call_hooks("after_optimizer_step", model)

    def set_episode(self, episode: Any) -> None:
        self._call_hooks("set_episode", episode)

    def _call_hooks(self, hook_name: str, argument: Any) -> None:
        for term in self.terms.values():
            hook = getattr(term, hook_name, None)
            if hook is not None:
                hook(argument)


from vlp.objectives import (  # noqa: E402,F401  (registers the terms)
    caption,
    contrastive,
    dreamlip,
    geometry,
    prototype,
    siglip,
)
