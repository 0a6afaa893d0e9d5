"""Training objectives: registered terms, each an unweighted scalar, combined by weight.

A term subclasses `Objective`, is registered in OBJECTIVES under its config section's name, is
built from that section alone, and is called as `term(out: ModelOutput, batch: Batch) -> Tensor`
(None: it adds nothing at this step). Its class-level flags say what it needs, and it overrides
only the hooks it uses; `WeightedObjective` builds the terms whose weight is non-zero.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from vlp.data.pipeline import Batch
from vlp.model import ModelOutput
from vlp.registry import Registry


class Objective:
    """One term: flags with their defaults, and hooks that do nothing unless overridden."""

    needs_patches: ClassVar[bool] = False
    """The model must return patch embeddings (ModelOutput.patch_emb)."""
    batch_coupled: ClassVar[bool] = False
    """A row's loss depends on other rows: train.grad_cache computes it on the whole batch."""
    method: ClassVar[str | None] = None
    """The stateful method (vlp/method.py) the term needs, by its registered name."""

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg

    def __call__(self, out: ModelOutput, batch: Batch) -> Tensor | None:
        raise NotImplementedError

    def prepare_model(self, model: nn.Module) -> None:
        """Once, before the optimizer is built (e.g. freeze the term's temperature)."""

    def check_model(self, model: nn.Module) -> None:
        """Once, after the model is built: raise ConfigError if it cannot serve the term."""

    def after_optimizer_step(self, model: nn.Module) -> None:
        """After each optimizer step (e.g. clamp the term's temperature)."""

    def set_state(self, state: Any) -> None:
        """The term's method passes its current state (e.g. an episode's clusters)."""


OBJECTIVES: Registry[type[Objective]] = Registry("objective")


class WeightedObjective:
    """total = sum_k weight_k * term_k; logs every term (unweighted) and the total."""

    def __init__(self, objectives_cfg: Any):
        self.terms: dict[str, Objective] = {}
        self.weights: dict[str, float] = {}
        for name, term_cfg in objectives_cfg.active().items():
            self.terms[name] = OBJECTIVES.get(name)(term_cfg)
            self.weights[name] = term_cfg.weight

    @property
    def needs_patches(self) -> bool:
        return any(term.needs_patches for term in self.terms.values())

    def __call__(self, out: ModelOutput, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        logs: dict[str, Tensor] = {}
        total = torch.zeros((), device=out.image_emb.device)
        for name, term in self.terms.items():
            value = term(out, batch)
            if value is None:  # e.g. a term whose method switched it off for now
                continue
            logs[f"loss/{name}"] = value.detach()
            total = total + self.weights[name] * value
        logs["loss/total"] = total.detach()
        return total, logs

    def prepare_model(self, model: nn.Module) -> None:
        for term in self.terms.values():
            term.prepare_model(model)

    def check_model(self, model: nn.Module) -> None:
        for term in self.terms.values():
            term.check_model(model)

    def after_optimizer_step(self, model: nn.Module) -> None:
        for term in self.terms.values():
            term.after_optimizer_step(model)

    def set_state(self, state: Any) -> None:
        for term in self.terms.values():
            term.set_state(state)


from vlp.objectives import (  # noqa: E402,F401  (registers the terms)
    caption,
    contrastive,
    dreamlip,
    geometry,
    prototype,
    siglip,
)
