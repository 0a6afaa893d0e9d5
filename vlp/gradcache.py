"""Gradient accumulation that keeps the whole contrastive batch (GradCache, Gao et al. 2021).

With `train.grad_accum = k` a plain accumulation step gives the contrastive loss only one
micro-batch of candidates at a time. Here, for one optimizer step over micro-batches 1..k:

1. every micro-batch is encoded without a graph; the embeddings are kept (k x B rows, small);
2. the batch-coupled terms (those with `batch_coupled = True`, e.g. the contrastive loss) run
   once on the concatenated embeddings, and their gradient with respect to every embedding
   row (and the temperature) is cached;
3. each micro-batch is encoded again with a graph (same RNG state as in 1), and backward runs
   on  <embeddings, cached gradient>  plus that micro-batch's other terms / k.

The coupled terms' parameter gradients then equal those of one step on the k x B batch, at the
activation memory of one micro-batch, for one more forward pass per micro-batch. The other terms
(e.g. captioning) are averaged over micro-batches, as in plain accumulation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from vlp.model import ModelOutput

CACHED = ("image_emb", "text_emb", "text_emb_all", "patch_emb")
"""ModelOutput fields the coupled terms may read, cached per row."""
SHARED = ("logit_scale", "logit_bias", "logit_scale_local")
"""ModelOutput scalars of the whole batch the coupled terms may read (None: the model has none)."""


@dataclass
class MergedBatch:
    """What coupled terms read from a batch, over all micro-batches: the text slots' layout."""

    text_mask: Tensor
    """[k*B, T] the micro-batches' masks, concatenated."""
    num_negatives: int


def coupled_terms(objective: Any) -> dict[str, Any]:
    return {n: t for n, t in objective.terms.items() if t.batch_coupled}


def grad_cache_step(
    forward: Callable[[Any], ModelOutput],
    objective: Any,
    batches: Sequence[Any],
    backward: Callable[[Tensor], None],
    no_sync: Callable[[], contextlib.AbstractContextManager],
) -> dict[str, Tensor]:
    """Accumulate one optimizer step's gradients over `batches`; returns the logged terms.

    forward(batch) -> ModelOutput; backward(loss) runs the backward pass (accelerate's);
    no_sync() suspends DDP's gradient all-reduce (used for every micro-batch but the last).
    """
    states, outputs = [], []
    for batch in batches:
        states.append(_rng_state())
        with torch.no_grad():
            outputs.append(forward(batch))
    merged, leaves = _merged_leaves(outputs)
    coupled = coupled_terms(objective)
    merged_batch = _merged_batch(batches)
    values = {name: term(merged, merged_batch) for name, term in coupled.items()}
    logs = {f"loss/{name}": value.detach() for name, value in values.items()}
    total = objective.weighted_sum(values, torch.zeros((), device=merged.image_emb.device))
    grads = torch.autograd.grad(total, list(leaves.values()), allow_unused=True)
    # a field no coupled term reads (the logit bias of a model trained without SigLIP) has none
    cached = {f: g for f, g in zip(leaves, grads, strict=True) if g is not None}
    others = {n: t for n, t in objective.terms.items() if n not in coupled}
    rows = [len(out.image_emb) for out in outputs]
    for index, batch in enumerate(batches):
        _set_rng_state(states[index])
        last = index == len(batches) - 1
        with contextlib.nullcontext() if last else no_sync():
            out = forward(batch)
            values = {name: term(out, batch) for name, term in others.items()}
            values = {name: value for name, value in values.items() if value is not None}
            for name, value in values.items():
                key = f"loss/{name}"
                logs[key] = logs.get(key, 0.0) + value.detach() / len(batches)
            surrogate = _surrogate(out, cached, index, rows)
            backward(objective.weighted_sum(values, surrogate, divisor=len(batches)))
    logs["loss/total"] = total.detach() + sum(
        objective.weights[n] * logs[f"loss/{n}"] for n in others if f"loss/{n}" in logs
    )
    return logs


def _merged_batch(batches: Sequence[Any]) -> MergedBatch | None:
    """The micro-batches' slot layout (None for inputs without one, e.g. plain tuples)."""
    if not all(hasattr(batch, "text_mask") for batch in batches):
        return None
    mask = torch.cat([batch.text_mask for batch in batches])
    return MergedBatch(mask, getattr(batches[0], "num_negatives", 0))


def _merged_leaves(outputs: list[ModelOutput]) -> tuple[ModelOutput, dict[str, Tensor]]:
    """One ModelOutput of the concatenated micro-batches, built from fresh leaf tensors."""
    leaves: dict[str, Tensor] = {}
    for field in CACHED:
        parts = [getattr(out, field) for out in outputs]
        if parts[0] is not None:
            leaves[field] = torch.cat(parts).detach().requires_grad_()
    for field in SHARED:
        if getattr(outputs[0], field) is not None:
            leaves[field] = getattr(outputs[0], field).detach().requires_grad_()
    merged = ModelOutput(
        image_emb=leaves["image_emb"],
        text_emb=leaves["text_emb"],
        logit_scale=leaves["logit_scale"],
        text_emb_all=leaves.get("text_emb_all"),
        patch_emb=leaves.get("patch_emb"),
        logit_scale_local=leaves.get("logit_scale_local"),
        logit_bias=leaves.get("logit_bias"),
    )
    return merged, leaves


def _surrogate(out: ModelOutput, cached: dict[str, Tensor], index: int, rows: list[int]):
    """sum <output, cached gradient> over this micro-batch's rows: its backward gives the
    coupled terms' parameter gradients through this micro-batch."""
    start = sum(rows[:index])
    total = torch.zeros((), device=out.image_emb.device)
    for field, grad in cached.items():
        if field in SHARED:
            # one parameter shared by all micro-batches: counted once, in the last one, whose
            # backward DDP synchronises and where it must see every parameter used
            if index == len(rows) - 1:
                total = total + (getattr(out, field) * grad).sum()
            continue
        value = getattr(out, field)
        total = total + (value * grad[start : start + len(value)].to(value.dtype)).sum()
    return total


def _rng_state() -> tuple[Tensor, list[Tensor]]:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple[Tensor, list[Tensor]]) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda:
        torch.cuda.set_rng_state_all(cuda)
