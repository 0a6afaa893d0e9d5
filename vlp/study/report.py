"""study.md and the figures, from study.json's content alone (bench/readme_table.py reuses
`headline_table` on a committed study.json; nothing here imports torch)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

WALL = "wall/seconds"
"""Each run's training wall time, summarised like a metric."""
ONE_SEED = "(1 seed)"
"""What a cell says where an interval is undefined."""
FIGURES_DIR = "figures"


def estimate_cell(estimate: dict[str, Any] | None, signed: bool = False) -> str:
    """`0.512 ± 0.034`, a difference as `+0.020 [-0.010, 0.050]`, or `0.512 (1 seed)`."""
    if estimate is None:
        return "–"
    # three decimals for scores and geometry, one for seconds and other large quantities
    spec = ("+" if signed else "") + (".3f" if abs(estimate["mean"]) < 10 else ".1f")
    mean = format(estimate["mean"], spec)
    if estimate["low"] is None:
        return f"{mean} {ONE_SEED}"
    if signed:
        return f"{mean} [{format(estimate['low'], spec)}, {format(estimate['high'], spec)}]"
    return f"{mean} ± {format((estimate['high'] - estimate['low']) / 2, spec)}"


def metric_sets(results: dict[str, Any]) -> dict[str, list[str]]:
    """Metrics by their set (the part before the first '/'), in first-seen order."""
    sets: dict[str, list[str]] = {}
    for metric in results:
        sets.setdefault(metric.split("/", 1)[0], []).append(metric)
    return sets


def set_table(payload: dict[str, Any], metrics: list[str], group_results: dict) -> list[str]:
    """Rows: metrics. Columns: the baseline, then each variant and its difference."""
    baseline = payload["baseline"]
    others = [v for v in payload["variants"] if v != baseline]
    header = ["metric", f"{baseline} (baseline)"]
    for variant in others:
        header += [variant, f"Δ {variant}"]
    lines = [_row(header), "|" + " --- |" * len(header)]
    for metric in metrics:
        entry = group_results[metric]
        cells = [metric.split("/", 1)[1], estimate_cell(entry["variants"].get(baseline))]
        for variant in others:
            cells.append(estimate_cell(entry["variants"].get(variant)))
            cells.append(estimate_cell(entry["differences"].get(variant), signed=True))
        lines.append(_row(cells))
    return lines


def headline_table(payload: dict[str, Any]) -> str:
    """One row per group and variant, one column per headline metric (all when none given)."""
    groups = payload["results"]
    metrics = payload["headline"] or list(dict.fromkeys(m for g in groups.values() for m in g))
    named = any(groups)
    header = (["group"] if named else []) + ["variant", *metrics]
    lines = [_row(header), "|" + " --- |" * len(header)]
    for group, results in groups.items():
        for variant in payload["variants"]:
            cells = ([group] if named else []) + [variant]
            for metric in metrics:
                entry = results.get(metric, {"variants": {}, "differences": {}})
                cell = estimate_cell(entry["variants"].get(variant))
                if variant != payload["baseline"] and entry["differences"].get(variant):
                    cell += f"; Δ {estimate_cell(entry['differences'][variant], signed=True)}"
                cells.append(cell)
            lines.append(_row(cells))
    return "\n".join(lines)


def markdown(payload: dict[str, Any], figures: list[Path]) -> str:
    lines = [f"# Study {Path(payload['study']).stem}", "", *_setup(payload), ""]
    if payload["headline"]:
        lines += ["## Summary", "", headline_table(payload), ""]
    for group, results in payload["results"].items():
        if group:
            lines += [f"## Group {group}", ""]
        for name, metrics in metric_sets(results).items():
            title = "wall time (seconds per run)" if name == WALL.split("/")[0] else name
            lines += [f"### {title}", "", *set_table(payload, metrics, results), ""]
    lines += _runs_table(payload)
    lines += ["## Figures", ""] + [f"![{p.stem}]({FIGURES_DIR}/{p.name})" for p in figures]
    return "\n".join(lines) + "\n"


def _setup(payload: dict[str, Any]) -> list[str]:
    seeds = ", ".join(map(str, payload["seeds"]))
    hours = payload["seconds"]["runs"] / 3600
    lines = [
        f"Study file `{payload['study']}`, base config `{payload['config']}`, seeds {seeds}; "
        f"{payload['runs_finished']} of {payload['runs_total']} runs finished, "
        f"{hours:.2f} h of training in all.",
        "",
        f"`a ± h`: mean over seeds and the half-width of its {payload['confidence']:.0%} "
        "Student-t interval. `Δ m [lo, hi]`: mean paired difference against the baseline "
        f"over the seeds both have, with its interval. `{ONE_SEED}`: one value, so no interval.",
        "",
        "| variant | overrides |",
        "| --- | --- |",
    ]
    for variant, overrides in payload["variants"].items():
        label = f"{variant} (baseline)" if variant == payload["baseline"] else variant
        lines.append(_row([label, " ".join(f"`{o}`" for o in overrides) or "–"]))
    if payload["groups"]:
        lines += ["", "| group | overrides |", "| --- | --- |"]
        lines += [_row([g, " ".join(f"`{o}`" for o in o_)]) for g, o_ in payload["groups"].items()]
    return lines


def _runs_table(payload: dict[str, Any]) -> list[str]:
    lines = ["## Runs", "", "| run | seconds | attempts | directory |", "| --- | --- | --- | --- |"]
    for run in payload["runs"]:
        name = " ".join(str(p) for p in (run["group"], run["variant"], f"seed {run['seed']}") if p)
        if run["finished"]:
            cells = [name, f"{run['final'][WALL]:.0f}", str(run["attempts"]), run["run_dir"]]
        else:
            cells = [name, "not finished", "–", run["run_dir"]]
        lines.append(_row(cells))
    return [*lines, ""]


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def write_figures(payload: dict[str, Any], folder: Path) -> list[Path]:
    """Per group and metric set: final values with intervals; eval curves over samples seen."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for group, results in payload["results"].items():
        prefix = f"{group}-" if group else ""
        for name, metrics in metric_sets(results).items():
            path = folder / f"{prefix}{name}-final.png"
            _save(_final_figure(payload, results, metrics, f"{prefix}{name}"), path)
            written.append(path)
            runs = [r for r in payload["runs"] if r["finished"] and r["group"] == group]
            if any(len(r["curves"].get(m, [])) > 1 for r in runs for m in metrics):
                path = folder / f"{prefix}{name}-curves.png"
                _save(_curve_figure(payload, runs, metrics, f"{prefix}{name}"), path)
                written.append(path)
    return written


def _grid(count: int, title: str) -> tuple[Figure, list]:
    columns = min(4, count)
    rows = -(-count // columns)
    figure = Figure(figsize=(3.6 * columns, 2.9 * rows), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for unused in axes[count:]:
        unused.set_visible(False)
    figure.suptitle(title)
    return figure, list(axes[:count])


def _final_figure(payload, results, metrics: list[str], title: str) -> Figure:
    """Each variant's mean with its interval (none with one seed) and its seeds as dots."""
    figure, axes = _grid(len(metrics), f"{title}: final values")
    variants = list(payload["variants"])
    for ax, metric in zip(axes, metrics, strict=True):
        for x, variant in enumerate(variants):
            estimate = results[metric]["variants"].get(variant)
            if estimate is None:
                continue
            half = None if estimate["low"] is None else (estimate["high"] - estimate["low"]) / 2
            ax.errorbar([x], [estimate["mean"]], yerr=half, fmt="o", capsize=4, color=f"C{x}")
            seeds = list(estimate["seeds"].values())
            ax.scatter(np.full(len(seeds), x + 0.15), seeds, s=10, color=f"C{x}", alpha=0.5)
        ax.set_xticks(range(len(variants)), variants, rotation=30, ha="right")
        ax.set_title(metric.split("/", 1)[1], fontsize=9)
    return figure


def _curve_figure(payload, runs, metrics: list[str], title: str) -> Figure:
    """Per variant the mean over seeds at each evaluation, shaded from the lowest seed's value
    to the highest's (steps where every seed of the variant has a value)."""
    figure, axes = _grid(len(metrics), f"{title}: evaluations over training")
    for ax, metric in zip(axes, metrics, strict=True):
        for i, variant in enumerate(payload["variants"]):
            curves = [dict(map(tuple, r["curves"].get(metric, []))) for r in runs
                      if r["variant"] == variant]  # fmt: skip
            shared = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
            if not shared:
                continue
            values = np.array([[c[s] for s in shared] for c in curves])
            ax.plot(shared, values.mean(axis=0), color=f"C{i}", label=variant)
            ax.fill_between(shared, values.min(axis=0), values.max(axis=0), color=f"C{i}",
                            alpha=0.2, linewidth=0)  # fmt: skip
        ax.set_title(metric.split("/", 1)[1], fontsize=9)
        ax.set_xlabel("samples seen")
    axes[0].legend(fontsize=8)
    return figure


def _save(figure: Figure, path: Path) -> None:
    figure.savefig(path, dpi=90)
