"""How a method with state or a schedule plugs into the training loop without the loop naming it.

A `Method` owns a batch schedule (which stream of batches each optimizer step reads) and hooks
around the step: model preparation, optimizer-group learning rates, after-step updates, its
share of the stream's identity, and checkpoint state. The plain method reads one stream for the
whole run and does nothing else. A stateful method (ProtoCLIP's episodes, a teacher, an EMA, a
curriculum) subclasses `Method`, registers under a name in METHODS, and an objective term that
needs it says so with `method = "NAME"`; the trainer builds it (`method_class`) and calls only
the hooks below.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from vlp.config import Config, ConfigError
from vlp.data.pipeline import Batch
from vlp.registry import Registry

StateWriter = Callable[[Path], None]
"""Writes a method's files into a checkpoint directory being assembled."""


@dataclass
class Loop:
    """What the trainer lends a method: its config, devices and data pieces, all read-only."""

    cfg: Config
    global_batch: int
    """Samples per optimizer step over every process."""
    accelerator: Any
    open_loader: Callable[..., Any]
    """open_loader(consumed, seed=None, subset=None, fresh=False): the training DataLoader over
    a ShardSubset (None: the configured shards) seeded by `seed` (None: train.seed), `consumed`
    micro-batches in; `fresh` forgets the data positions restored from a checkpoint."""
    model: Callable[[], nn.Module]
    """The unwrapped VLPModel (built after the method, so a getter)."""
    objective: Any
    """The WeightedObjective (its `set_state` passes the method's state to the terms)."""
    worker_transform: Any
    tokenizer: Any
    to_input: Callable[[Tensor], Tensor]
    message: Callable[[str], None]


class Method:
    """The plain method: one batch stream from step 0 (or the resumed step), no hooks."""

    find_unused_parameters: bool = False
    """Some parameters get no gradient at some steps (DDP must look for them)."""
    visual_groups: bool = False
    """The optimizer puts the image tower in groups of its own (marked `visual`)."""
    not_shardable: str | None = None
    """Why FSDP cannot shard the model for this method (None: it calls only the forward)."""

    def __init__(self, loop: Loop) -> None:
        self.loop = loop

    def prepare_model(self, model: nn.Module) -> None:
        """Before the objectives' own preparation and the optimizer: add modules, freeze."""

    def batches(self, step: int, current: Iterator[Batch] | None) -> Iterator[Batch]:
        """The batch iterator optimizer step `step` reads: `current`, or a new stream."""
        if current is not None:
            return current
        return iter(self.loop.open_loader(step * self.loop.cfg.train.grad_accum))

    def group_lrs(self, step: int) -> dict[str, float]:
        """Learning rates of marked optimizer groups at `step`, by mark (e.g. `visual`)."""
        return {}

    def after_step(self, model: nn.Module) -> None:
        """After each optimizer step (e.g. clamp a temperature the method owns)."""

    def stream_identity(self) -> dict[str, Any]:
        """What of the method the batch stream depends on, by name (a resume must find it
        unchanged); merged into the checkpoint's data.stream."""
        return {}

    def state_writer(self, step: int) -> StateWriter | None:
        """What a checkpoint at `step` must hold of the method's state (None: nothing)."""
        return None

    def load_state(self, directory: Path) -> None:
        """Restore what `state_writer` wrote into a checkpoint directory."""


METHODS: Registry[type[Method]] = Registry("method")


def method_class(objective: Any) -> type[Method]:
    """The method the objective's terms ask for (`method = NAME` on a term), else the plain one."""
    wanted = sorted({term.method for term in objective.terms.values() if term.method})
    if len(wanted) > 1:
        raise ConfigError(f"objectives: the terms need different methods ({', '.join(wanted)})")
    return METHODS.get(wanted[0]) if wanted else Method
