"""Training and eval curves from a run's metrics.jsonl.

One JSON object per line with a "step": training records (`loss/*`, `lr`, `samples_per_s`,
`tflops`, `mfu`, `data_wait`, ...) and eval records (`eval/<set>/<metric>`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.figure import Figure

EVAL_PREFIX = "eval/"
GEOMETRY_CURVES = ("gap", "linear_separability", "matched_cosine")
"""Geometry metrics drawn over training (all roughly within [0, 2])."""
UNIFORMITY_CURVES = ("uniformity", "cross_uniformity", "alignment")
"""The gap-closing terms' own quantities on the eval pairs (uniformities ≤ 0, alignment ≥ 0)."""


@dataclass(frozen=True)
class Panel:
    title: str
    keys: list[str]
    ylabel: str = ""
    label: Callable[[str], str] = str
    """Legend text of a key."""


def read_metrics(path: Path) -> tuple[list[dict[str, Any]], int]:
    """Records with an integer step, and how many lines could not be read.

    A run that is still training may be halfway through writing its last line; such lines
    are counted, not fatal.
    """
    records, unreadable = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            unreadable += 1
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
        else:
            unreadable += 1
    return records, unreadable


def series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of every record holding a finite number under `key`."""
    points = [
        (r["step"], float(r[key]))
        for r in records
        if isinstance(r.get(key), int | float) and math.isfinite(r[key])
    ]
    return [p[0] for p in points], [p[1] for p in points]


def _keys(records: list[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(key for record in records for key in record if key != "step"))


def training_panels(records: list[dict[str, Any]]) -> list[Panel]:
    keys = _keys(records)
    panels = [
        Panel("losses", [k for k in keys if k.startswith("loss/")], "loss", _after_slash),
        Panel("learning rate", [k for k in keys if k == "lr"], "lr"),
        Panel("throughput", [k for k in keys if k == "samples_per_s"], "samples / s"),
        Panel("achieved TFLOP/s", [k for k in keys if k == "tflops"], "TFLOP/s"),
        Panel("MFU", [k for k in keys if k == "mfu"], "fraction of peak"),
        Panel("data wait", [k for k in keys if k == "data_wait"], "fraction of step time"),
    ]
    return [p for p in panels if p.keys]


def eval_panels(records: list[dict[str, Any]]) -> list[Panel]:
    """A panel of scores per eval set; geometry and uniformity/alignment across the sets."""
    keys = [k for k in _keys(records) if k.startswith(EVAL_PREFIX) and k.count("/") == 2]
    names = list(dict.fromkeys(k.split("/")[1] for k in keys))
    panels = [
        Panel(f"eval: {name}", [k for k in keys if _is_score(k, name)], "score", _after_slash)
        for name in names
    ]
    for title, metrics in (
        ("embedding geometry", GEOMETRY_CURVES),
        ("uniformity and alignment", UNIFORMITY_CURVES),
    ):
        chosen = [k for k in keys if k.split("/")[2] in metrics]
        panels.append(Panel(title, chosen, "", lambda k: k.removeprefix(EVAL_PREFIX)))
    return [p for p in panels if p.keys]


def _is_score(key: str, name: str) -> bool:
    _, set_name, metric = key.split("/")
    is_score = metric in ("acc1", "acc5", "mean_per_class_recall") or "_recall@" in metric
    return set_name == name and is_score


def _after_slash(key: str) -> str:
    return key.rsplit("/", 1)[-1]


def plot_panels(records: list[dict[str, Any]], panels: list[Panel], title: str, path: Path) -> None:
    """Panels in a two-column grid, one line per key against the training step."""
    columns = 2 if len(panels) > 1 else 1
    rows = math.ceil(len(panels) / columns)
    figure = Figure(figsize=(6.2 * columns, 3.6 * rows), layout="constrained")
    figure.suptitle(title, fontsize=13)
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for ax, panel in zip(axes, panels, strict=False):
        _draw_panel(ax, records, panel)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    figure.savefig(path, dpi=110)


def _draw_panel(ax: Axes, records: list[dict[str, Any]], panel: Panel) -> None:
    for key in panel.keys:
        steps, values = series(records, key)
        # eval records are sparse: markers make single points visible
        marker = "o" if len(steps) < 30 else None
        ax.plot(steps, values, marker=marker, markersize=3, label=panel.label(key))
    ax.set_title(panel.title)
    ax.set_xlabel("step")
    ax.set_ylabel(panel.ylabel)
    ax.grid(alpha=0.3)
    if len(panel.keys) > 1:
        ax.legend(fontsize=8)
