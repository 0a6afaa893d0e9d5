"""Training objectives: registered terms, each an unweighted scalar, combined by weight.

A term subclasses `Objective` and is registered in OBJECTIVES under its config section's name;
its `Config` (a TermConfig dataclass in the term's module, checking itself) becomes the section
`objectives.NAME` (vlp.config.objectives_schema). It is built from that section alone and called
as `term(out: ModelOutput, batch: Batch) -> Tensor` (None: it adds nothing at this step). Its
class-level flags say what it needs, and it overrides only the hooks it uses. Adding a term is
one module (imported below) and no other edit. `WeightedObjective` builds the terms whose weight
is non-zero and sums them.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from vlp.config import TermConfig
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
    Config: ClassVar[type[TermConfig]] = TermConfig
    """The term's config section `objectives.NAME` (a TermConfig dataclass that checks itself)."""

    def __init__(self, cfg: TermConfig) -> None:
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
        """`objectives_cfg`: the `objectives` section (vlp.config.objectives_schema)."""
        self.terms: dict[str, Objective] = {}
        self.weights: dict[str, float] = {}
        for name, term_cfg in objectives_cfg.active().items():
            self.terms[name] = OBJECTIVES.get(name)(term_cfg)
            self.weights[name] = term_cfg.weight

    @property
    def needs_patches(self) -> bool:
        return any(term.needs_patches for term in self.terms.values())

    def __call__(self, out: ModelOutput, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        values = {name: term(out, batch) for name, term in self.terms.items()}
        # None: e.g. a term whose method switched it off for now
        values = {name: value for name, value in values.items() if value is not None}
        total = self.weighted_sum(values, torch.zeros((), device=out.image_emb.device))
        logs = {f"loss/{name}": value.detach() for name, value in values.items()}
        logs["loss/total"] = total.detach()
        return total, logs

    def weighted_sum(self, values: dict[str, Tensor], start: Tensor, divisor: int = 1) -> Tensor:
        """start + sum_k weight_k * value_k / divisor, added in the order of `values` (the one
        weighted sum: GradCache adds its parts with it too)."""
        total = start
        for name, value in values.items():
            weighted = self.weights[name] * value
            total = total + (weighted / divisor if divisor != 1 else weighted)
        return total

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


# The terms register on import, and their registration order is the order of the config's
# sections and of the total's sum (floating-point addition: changing it changes the numbers).
# isort: off
from vlp.objectives import contrastive  # noqa: E402,F401
from vlp.objectives import siglip  # noqa: E402,F401
from vlp.objectives import caption  # noqa: E402,F401
from vlp.objectives import geometry  # noqa: E402,F401
from vlp.objectives import dreamlip  # noqa: E402,F401
from vlp.objectives import prototype  # noqa: E402,F401
# isort: on
