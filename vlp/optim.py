"""AdamW with decay only on weight matrices, and the learning-rate schedule as a pure function."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


def lr_at(step: int, base_lr: float, warmup_steps: int, total_steps: int, min_lr: float = 0.0):
    """Learning rate for optimizer step `step` (0-based): linear warmup, then cosine to min_lr.

    Step s < warmup_steps uses base_lr * (s + 1) / warmup_steps, so the first step already trains
    and the last warmup step uses exactly base_lr; the cosine then reaches min_lr on the last
    step (when there are steps left after the warmup).
    """
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - 1 - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + 0.5 * (base_lr - min_lr) * (1 + math.cos(math.pi * progress))


def no_decay(name: str, param: nn.Parameter) -> bool:
    """Biases, norm gains and temperatures: every parameter below 2-D, and the logit scales."""
    return param.ndim < 2 or "logit_scale" in name or "logit_bias" in name


def build_optimizer(model: nn.Module, train_cfg: Any) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, weight decay on the matrices only.

    torch's fused kernel (CPU and CUDA) updates all parameters in one pass: on the CPU it is
    about 5x faster than the default for-each kernel, a quarter of a small model's step.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in named if not no_decay(n, p)]
    rest = [p for n, p in named if no_decay(n, p)]
    groups = [
        {"params": decay, "weight_decay": train_cfg.weight_decay},
        {"params": rest, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        groups,
        lr=train_cfg.lr,
        betas=(train_cfg.beta1, train_cfg.beta2),
        eps=train_cfg.eps,
        fused=True,
    )
