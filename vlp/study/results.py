"""What the runs wrote, summarised: study.json's content.

A run's final value of a metric is its last evaluation (`eval/<set>/<metric>` in
RUN/metrics.jsonl, at train.steps unless the evaluator's at_end is off), or a score command's
`metrics` (RUN/scores/<name>.json, as `<name>/<metric>`). Its curve is every evaluation of the
metric over samples seen (step x data.batch_size x train.grad_accum). Wall time enters as the
metric `wall/seconds`, so it gets the same intervals and paired differences.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from vlp.checkpoint import versions
from vlp.provenance import git_state, machine_info
from vlp.runlayout import METRICS_FILE
from vlp.study.report import WALL
from vlp.study.runner import is_finished, score_path, wall_time
from vlp.study.spec import Run, Study
from vlp.study.stats import CONFIDENCE, mean_interval, paired_difference

EVAL_PREFIX = "eval/"


def run_record(study: Study, run: Run) -> dict[str, Any]:
    """One run's entry in study.json: where it is, and if finished its metrics and curves."""
    record: dict[str, Any] = {
        "group": run.group,
        "variant": run.variant,
        "seed": run.seed,
        "run_dir": str(run.run_dir),
        "finished": is_finished(run),
    }
    if not record["finished"]:
        return record
    final, curves = _evaluations(run)
    for name in study.scores:
        path = score_path(run, name)
        if path.is_file():  # else its command failed, and the study says so
            scores = json.loads(path.read_text())["metrics"]  # checked by runner._score_problem
            final.update({f"{name}/{k}": float(v) for k, v in scores.items()})
    seconds, attempts = wall_time(run)
    final[WALL] = seconds
    record.update(
        samples=run.config.train.steps * run.samples_per_step,
        attempts=attempts,
        final=final,
        curves=curves,
    )
    return record


def _evaluations(run: Run) -> tuple[dict[str, float], dict[str, list[list[float]]]]:
    """Last value and the (samples seen, value) curve of every eval metric of the run."""
    curves: dict[str, dict[int, float]] = {}
    for line in (run.run_dir / METRICS_FILE).read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a kill (the trainer drops it)
            continue
        for key, value in record.items():
            if key.startswith(EVAL_PREFIX) and isinstance(value, int | float):
                # a resumed run re-logs the steps after its checkpoint: the later record wins
                curves.setdefault(key.removeprefix(EVAL_PREFIX), {})[record["step"]] = value
    final = {key: points[max(points)] for key, points in curves.items()}
    per_step = run.samples_per_step
    return final, {
        key: [[step * per_step, value] for step, value in sorted(points.items())]
        for key, points in curves.items()
    }


def summarize(study: Study, runs: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    """study.json: settings, every run, and per group and metric the estimates."""
    finished = [r for r in runs if r["finished"]]
    return {
        "study": str(study.path),
        "config": str(study.config),
        "output_dir": str(study.output_dir),
        "baseline": study.baseline,
        "variants": study.variants,
        "groups": {g: o for g, o in study.groups.items() if g},
        "seeds": study.seeds,
        "headline": study.headline,
        "confidence": CONFIDENCE,
        "intervals": "Student t over seeds; differences paired on the seeds both runs have",
        "runs_finished": len(finished),
        "runs_total": len(runs),
        "seconds": {
            "runs": sum(r["final"][WALL] for r in finished),
            "this_invocation": seconds,
        },
        "git": git_state(),
        "machine": machine_info(),
        "versions": versions(),
        "results": {group: _group_results(study, finished, group) for group in study.groups},
        "runs": runs,
    }


def _group_results(study: Study, runs: list[dict[str, Any]], group: str) -> dict[str, Any]:
    """metric -> {"variants": {v: estimate + per-seed values}, "differences": {v: ...}}."""
    mine = [r for r in runs if r["group"] == group]
    metrics = list(dict.fromkeys(m for r in mine for m in r["final"]))
    results = {}
    for metric in metrics:
        values = {
            v: {
                r["seed"]: r["final"][metric]
                for r in mine
                if r["variant"] == v and metric in r["final"]  # an evaluator may have failed
            }
            for v in study.variants
        }
        estimates = {
            v: {**mean_interval(list(seeds.values())).to_dict(), "seeds": seeds}
            for v, seeds in values.items()
            if seeds
        }
        base = values[study.baseline]
        differences = {}
        for variant, seeds in values.items():
            if variant != study.baseline:
                diff = paired_difference(seeds, base)
                differences[variant] = None if diff is None else diff.to_dict()
        results[metric] = {"variants": estimates, "differences": differences}
    return results


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Written to a temporary name and renamed: a reader never sees half a file."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(payload, indent=1) + "\n")
    os.replace(temporary, path)
