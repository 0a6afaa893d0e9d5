"""bench/quality_vs_open_clip.py's arithmetic: time to a target accuracy and the summary."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def quality(monkeypatch):
    """The bench script as a module, its sibling modules importable as when it runs."""
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    spec = importlib.util.spec_from_file_location(
        "quality", REPO / "bench" / "quality_vs_open_clip.py"
    )
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "quality", module)
    spec.loader.exec_module(module)
    return module


def test_crossing_interpolates_between_checkpoints(quality):
    # 0.2 at 10 s, 0.6 at 20 s: 0.5 is reached three quarters of the way, at 17.5 s
    assert quality.crossing([10, 20, 30], [0.2, 0.6, 0.7], 0.5) == 17.5
    assert quality.crossing([10, 20], [0.55, 0.6], 0.5) == 10  # the first point is already there
    assert quality.crossing([10, 20], [0.2, 0.3], 0.5) is None


def _run(quality, tool, seed, accs, clocks, loss):
    points = [dict.fromkeys(quality.METRICS, 0.0) | {"acc1": a, "clock": c, "samples": i}
              for i, (a, c) in enumerate(zip(accs, clocks, strict=True))]  # fmt: skip
    return {"tool": tool, "seed": seed, "points": points, "final_loss": loss, "seconds": clocks[-1]}


def test_summary_pairs_seeds_and_times_the_mean_curve(quality):
    runs = [
        _run(quality, "vlp", 0, [0.3, 0.6], [10, 20], 2.0),
        _run(quality, "vlp", 1, [0.5, 0.8], [10, 20], 1.8),
        _run(quality, "open_clip", 0, [0.2, 0.4], [20, 40], 2.2),
        _run(quality, "open_clip", 1, [0.3, 0.6], [20, 40], 2.0),
    ]
    summary = quality.summarize(runs)
    assert summary["target_acc1"] == pytest.approx(0.5)
    assert summary["vlp_minus_open_clip"]["acc1"]["mean"] == pytest.approx(0.2)
    assert summary["vlp_minus_open_clip"]["final_loss"]["mean"] == pytest.approx(-0.2)
    reach = summary["time_to_target"]
    # vlp's mean curve is 0.4 at 10 s and 0.7 at 20 s: 0.5 at 13.33 s; open_clip's ends at 0.5
    assert reach["vlp"]["mean_curve_clock"] == pytest.approx(13.33)
    assert reach["open_clip"]["mean_curve_clock"] == pytest.approx(40)
    assert reach["open_clip"]["per_run"][0] == {"clock": None, "shortfall": 0.1}
    assert summary["time_ratio_vlp_over_open_clip"] == pytest.approx(13.33 / 40, abs=1e-3)
    assert summary["goal_time_met"] is True
    assert summary["goal_acc1_met"] is True
