"""Results in clip_benchmark's JSON shape, so `clip_benchmark build` merges ours with theirs.

    {"dataset": "wds/shapes", "model": "vlp-small-clip", "pretrained": "PATH/model.safetensors",
     "task": "zeroshot_classification", "metrics": {"acc1": ...}, "language": "en",
     "details": {...}}

`clip_benchmark build` reads one JSON object per file (a list fails), copies every top-level
key but `metrics` into a CSV column and needs `model` and `pretrained` to be strings. vlp's extras
(per-class recall, counts, checkpoint step) therefore sit under the single key `details`, which
becomes one extra column there, and `metrics` holds only numbers.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eval.errors import UsageError

LANGUAGE = "en"
OUTPUT_FIELDS = ("dataset", "task", "model", "pretrained", "language")
"""Placeholders an --output template may use, as clip_benchmark's --output does."""


@dataclass
class EvalResult:
    dataset: str
    """clip_benchmark's name for the set: wds/<directory name>."""
    task: str
    metrics: dict[str, float]
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self, model: str, pretrained: str) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "model": model,
            "pretrained": pretrained,
            "task": self.task,
            "metrics": self.metrics,
            "language": LANGUAGE,
            "details": self.details,
        }


def output_paths(
    output: str, planned: list[tuple[str, str]], model: str, pretrained: str
) -> list[Path]:
    """Where each result goes: a template, a directory, or one file for a single result.

    A template uses clip_benchmark's placeholders ({dataset}, {task}, {model}, {pretrained},
    {language}); a directory (an existing one, a path ending in "/", or one without a file
    suffix such as `runs/demo/eval`) gets `{dataset}_{task}.json` files. `planned` lists the
    (dataset, task) of each result, so a bad --output fails before any work; several results
    for one file is a usage error.
    """
    is_template = "{" in output
    if not is_template and (
        output.endswith("/") or not Path(output).suffix or Path(output).is_dir()
    ):
        output, is_template = str(Path(output) / "{dataset}_{task}.json"), True
    if len(planned) > 1 and not is_template:
        raise UsageError(
            f"--output {output}: {len(planned)} results need one file each; use a directory "
            "or a template such as 'results/{dataset}_{task}.json'"
        )
    paths = [_format(output, dataset, task, model, pretrained) for dataset, task in planned]
    if len(set(paths)) < len(paths):
        raise UsageError(
            f"--output {output}: several results map to the same file; the template needs "
            "{dataset} and {task}, and the datasets distinct directory names"
        )
    return paths


def _format(template: str, dataset: str, task: str, model: str, pretrained: str) -> Path:
    values = {
        "dataset": dataset.removeprefix("wds/").replace("/", "_"),
        "task": task,
        "model": model,
        "pretrained": Path(pretrained).name,
        "language": LANGUAGE,
    }
    try:
        return Path(template.format(**values))
    except (KeyError, IndexError, ValueError) as err:
        raise UsageError(
            f"--output {template}: bad placeholder ({err}); known: "
            + ", ".join(f"{{{name}}}" for name in OUTPUT_FIELDS)
        ) from err


def write_result(path: Path, result: EvalResult, model: str, pretrained: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # NaN is written as clip_benchmark writes it (json.dump's NaN), e.g. acc5 with < 5 classes
    path.write_text(json.dumps(result.to_json(model, pretrained), indent=2) + "\n")


def markdown_tables(results: list[EvalResult]) -> str:
    """One table per task: a row per metric, a column per dataset."""
    sections = []
    for task in dict.fromkeys(r.task for r in results):
        group = [r for r in results if r.task == task]
        names = list(dict.fromkeys(name for r in group for name in r.metrics))
        lines = [
            f"### {task}",
            "",
            "| metric | " + " | ".join(r.dataset for r in group) + " |",
            "|---|" + "---:|" * len(group),
        ]
        for name in names:
            cells = [format_value(r.metrics.get(name, math.nan)) for r in group]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        sections.append("\n".join(lines))
    return "\n\n".join(sections) + "\n"


def format_value(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.4f}"
