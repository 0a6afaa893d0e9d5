"""The evaluation tasks by name, and which one `auto` picks for a dataset."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from eval.captioning import TASK as CAPTIONING
from eval.captioning import evaluate_captioning
from eval.datasets import EvalSet
from eval.errors import UsageError
from eval.geometry import geometry_metrics
from eval.linear_probe import TASK as LINEAR_PROBE
from eval.linear_probe import evaluate_linear_probe
from eval.models import EvalModel
from eval.options import EvalOptions
from eval.results import EvalResult
from eval.retrieval import evaluate_zeroshot_retrieval, run_zeroshot_retrieval
from eval.selection import TASK as SELECTION
from eval.selection import evaluate_image_caption_selection
from eval.zero_shot import evaluate_zeroshot_classification
from vlp.runlayout import AUTO_TASK

GEOMETRY = "geometry"


def evaluate_geometry(model: EvalModel, dataset: EvalSet, options: EvalOptions) -> EvalResult:
    """Geometry metrics alone, on each image of a retrieval set paired with its first caption."""
    outputs = run_zeroshot_retrieval(model, dataset, options)
    images, texts = outputs.first_caption_pairs()
    details = {
        "num_pairs": len(images),
        "geometry_pairs": "each image with its first caption",
        "dataset_root": str(dataset.root),
    }
    return EvalResult(
        dataset.name, GEOMETRY, geometry_metrics(images, texts, options.seed), details
    )


@dataclass(frozen=True)
class Task:
    name: str
    dataset_kind: str
    """The dataset_type.txt kind the task needs."""
    run: Callable[[EvalModel, EvalSet, EvalOptions], EvalResult]


TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task("zeroshot_classification", "classification", evaluate_zeroshot_classification),
        Task("zeroshot_retrieval", "retrieval", evaluate_zeroshot_retrieval),
        Task(GEOMETRY, "retrieval", evaluate_geometry),
        Task(CAPTIONING, "retrieval", evaluate_captioning),
        Task(LINEAR_PROBE, "classification", evaluate_linear_probe),
        Task(SELECTION, SELECTION, evaluate_image_caption_selection),
    )
}
AUTO = AUTO_TASK
AUTO_TASKS = {
    "classification": "zeroshot_classification",
    "retrieval": "zeroshot_retrieval",
    SELECTION: SELECTION,
}
"""What `--task auto` runs per dataset kind (retrieval includes the geometry metrics; a
selection set is a retrieval set marked by its task.txt)."""


def task_for(name: str, dataset: EvalSet) -> Task:
    """The task `name` (or auto's choice) for `dataset`; a usage error if they do not fit."""
    if name == AUTO:
        name = AUTO_TASKS[dataset.kind]
    if name not in TASKS:
        raise UsageError(f"unknown task {name!r}; expected {AUTO} or one of {', '.join(TASKS)}")
    task = TASKS[name]
    if task.dataset_kind != dataset.kind:
        raise UsageError(
            f"{dataset.root}: task {name} needs a {task.dataset_kind} set, but dataset_type.txt "
            f"says {dataset.kind}; use --task auto"
        )
    return task


def evaluate(model: EvalModel, dataset: EvalSet, task: str, options: EvalOptions) -> EvalResult:
    """Run `task` (a name from TASKS, or "auto") on `dataset`; the entry point for callers."""
    return task_for(task, dataset).run(model, dataset, options)
