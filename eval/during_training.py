"""Evaluators during training: the config's `eval.<name>` entries, run on rank 0 at their steps.

Rank 0 opens every eval set at start-up. One that is missing or malformed costs a warning line
and is switched off, so a mistyped path never stops a run. Evaluation borrows the live model:
eval mode, no gradients and private RNG streams, so the run continues exactly as if nothing had
happened (exact resume holds with or without evaluators).
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from eval.datasets import EvalSet, open_eval_set
from eval.errors import UsageError
from eval.linear_probe import TASK as LINEAR_PROBE
from eval.linear_probe import train_split
from eval.models import EvalModel
from eval.options import EvalOptions
from eval.tasks import AUTO, TASKS, evaluate
from vlp import distributed
from vlp.config import ConfigError, EvalConfig

HEADLINE = (
    "acc1", "image_retrieval_recall@1", "text_retrieval_recall@1", "gap", "acc", "Bleu_4",
    "CIDEr", "lp_acc1",
)  # fmt: skip
"""The metrics an evaluation's one-line summary shows (those its task has)."""
CAPTION_EXAMPLES = 2
"""Generated captions a captioning evaluation prints under its summary."""


class TrainingEvaluators:
    """The evaluators that opened, and when each is due; see `open_evaluators`."""

    def __init__(
        self,
        schedule: dict[str, EvalConfig],
        datasets: dict[str, EvalSet],
        total_steps: int,
        message: Callable[[str], None],
    ):
        self.schedule = schedule
        """Every rank's view: the evaluators that opened on rank 0."""
        self.datasets = datasets
        """Rank 0 only (empty elsewhere)."""
        self.total_steps = total_steps
        self.message = message

    def due(self, step: int) -> list[str]:
        return [
            name
            for name, cfg in self.schedule.items()
            if (cfg.every_steps > 0 and step % cfg.every_steps == 0)
            or (cfg.at_end and step == self.total_steps)
        ]

    def run(self, step: int, model: EvalModel) -> dict[str, float]:
        """`{"eval/<name>/<metric>": value}` of the evaluators due at `step`, on every rank.

        Collective when any is due: rank 0 evaluates while the others wait for its metrics. An
        eval set that turns out unreadable is reported and switched off on every rank.
        """
        names = self.due(step)
        if not names:
            return {}
        record: dict[str, float] = {}
        failed: list[str] = []
        if distributed.rank() == 0:
            with isolated(model.module, model.device):
                for name in names:
                    try:
                        record.update(self._evaluate(name, step, model))
                    except UsageError as err:
                        self.message(f"warning: eval.{name} switched off at step {step}: {err}")
                        failed.append(name)
        record, failed = distributed.broadcast_object((record, failed))
        for name in failed:
            del self.schedule[name]
        return record

    def _evaluate(self, name: str, step: int, model: EvalModel) -> dict[str, float]:
        cfg = self.schedule[name]
        options = EvalOptions(
            batch_size=cfg.batch_size, workers=cfg.workers, caption=cfg.caption, probe=cfg.probe
        )
        started = time.perf_counter()
        result = evaluate(model, self.datasets[name], cfg.type, options)
        seconds = time.perf_counter() - started
        shown = [f"{k} {v:.4f}" for k, v in result.metrics.items() if k in HEADLINE]
        self.message(f"eval {name} at step {step}: {', '.join(shown)} ({seconds:.1f} s)")
        for example in result.details.get("examples", [])[:CAPTION_EXAMPLES]:
            references = " | ".join(example["references"])
            self.message(f"  {example['key']}: “{example['caption']}” (references: {references})")
        return {f"eval/{name}/{metric}": value for metric, value in result.metrics.items()}


def open_evaluators(
    configs: dict[str, EvalConfig], total_steps: int, message: Callable[[str], None]
) -> TrainingEvaluators:
    """Rank 0 opens each eval set; missing or malformed ones are reported and left out.

    Collective: every rank learns which evaluators rank 0 kept, so all wait at the same steps.
    A type that does not fit its (existing) set is a ConfigError on every rank.
    """
    datasets: dict[str, EvalSet] = {}
    problem = None
    if distributed.rank() == 0:
        for name, cfg in configs.items():
            try:
                dataset = open_eval_set(Path(cfg.dataset))
                mismatch = _type_mismatch(name, cfg, dataset)
                if mismatch is None and cfg.type == LINEAR_PROBE:
                    train_split(dataset)  # a missing train/ split counts as a missing set
            except UsageError as err:
                message(
                    f"warning: eval.{name} switched off: {err} (write the set with `vlp-shard "
                    f"eval-set` or `vlp-shard demo`, or fix eval.{name}.dataset)"
                )
                continue
            datasets[name] = dataset
            problem = problem or mismatch
    kept, problem = distributed.broadcast_object((list(datasets), problem))
    if problem is not None:
        raise ConfigError(problem)
    return TrainingEvaluators({n: configs[n] for n in kept}, datasets, total_steps, message)


def _type_mismatch(name: str, cfg: EvalConfig, dataset: EvalSet) -> str | None:
    if cfg.type == AUTO or TASKS[cfg.type].dataset_kind == dataset.kind:
        return None
    return (
        f"eval.{name}.type: {cfg.type} needs a {TASKS[cfg.type].dataset_kind} set, but "
        f"{dataset.root} is a {dataset.kind} set; use auto"
    )


@contextlib.contextmanager
def isolated(module: torch.nn.Module, device: torch.device) -> Iterator[None]:
    """`module` in eval mode, with the global RNGs saved and restored around the block.

    DataLoaders draw their seeds from torch's global generator and evaluators may use numpy's
    or Python's; restoring all three keeps the training stream, and so exact resume, intact.
    Each submodule gets its own mode back (a frozen tower may stay in eval mode in training).
    """
    modes = {submodule: submodule.training for submodule in module.modules()}
    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            module.eval()
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        for submodule, training in modes.items():
            submodule.train(training)
