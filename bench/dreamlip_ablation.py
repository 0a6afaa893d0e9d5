"""DreamLIP's step-time cost: training steps with and without its objectives, alternated.

    python bench/dreamlip_ablation.py [--timing-steps 15] [--models clip coca]   (make bench)

The quality study (CLIP on weak raw captions, on long captions, and with DreamLIP's
multi-positive loss; zero-shot and retrieval, three seeds) is studies/dreamlip.yaml, run by
`vlp-study` (`make studies`). What is left here is the speed figure a study cannot give: the step
time (data wait excluded) of the plain and the DreamLIP trainer, built from
studies/dreamlip_base.yaml and the study's multi_positive overrides (with sub-caption grouping
too for the CoCa, whose ViT has the patch tokens grouping needs), alternating steps in one
process, so only the ratio counts on a shared machine. Writes
bench/results/dreamlip_ablation.json.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from _common import REPO, RESULTS, WORK, git_state, machine_info, write_results

from vlp.config import load_config
from vlp.trainer import Trainer

STUDY = REPO / "studies" / "dreamlip.yaml"
MODELS = {
    "clip": ([], []),  # the study's own model: the demo CLIP
    "coca": (["model.name=vlp-tiny-coca", "objectives.caption.weight=2"],
             ["objectives.subcaption_grouping.weight=1"]),
}  # fmt: skip
"""Model -> (overrides of both trainers, extra overrides of the DreamLIP trainer)."""


def step_time_ratio(model: str, args: argparse.Namespace) -> dict[str, Any]:
    """Median step seconds (data wait excluded) of plain vs DreamLIP, alternating steps."""
    study = yaml.safe_load(STUDY.read_text())
    shared, extra = MODELS[model]
    variants = {"plain": study["variants"][study["baseline"]],
                "dreamlip": [*study["variants"]["multi_positive"], *extra]}  # fmt: skip
    trainers = {}
    for variant, overrides in variants.items():
        run_dir = WORK / "dreamlip" / "timing" / f"{model}-{variant}"
        shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run each time, never a resume
        settings = [f"run.output_dir={run_dir}", "run.trackers=[]", "train.steps=100000"]
        config = load_config(REPO / study["config"], [*shared, *overrides, *settings])
        trainer = Trainer(config)
        trainers[variant] = (trainer, trainer.method.batches(0, None))
    times: dict[str, list[float]] = {name: [] for name in trainers}
    for repeat in range(args.timing_warmup + args.timing_steps):
        for name, (trainer, batches) in trainers.items():
            started = time.perf_counter()
            _, wait = trainer.train_step(batches)
            if repeat >= args.timing_warmup:
                times[name].append(time.perf_counter() - started - wait)
    ratios = [d / p for d, p in zip(times["dreamlip"], times["plain"], strict=True)]
    return {
        "plain_step_s": times["plain"],
        "dreamlip_step_s": times["dreamlip"],
        "median_ratio": statistics.median(ratios),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["clip", "coca"], choices=["clip", "coca"])
    parser.add_argument("--timing-steps", type=int, default=15)
    parser.add_argument("--timing-warmup", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS / "dreamlip_ablation.json")
    args = parser.parse_args()
    results = {
        "benchmark": "dreamlip_step_time",
        "command": " ".join(sys.argv),
        "git": git_state(),
        "machine": {**machine_info(), "note": "shared with other jobs; compare ratios only"},
        "settings": {**vars(args), "out": str(args.out), "study": str(STUDY.relative_to(REPO))},
        "step_time": {model: step_time_ratio(model, args) for model in args.models},
    }
    write_results(args.out, results)
    for model, timing in results["step_time"].items():
        print(f"step time {model}+dreamlip / {model}: {timing['median_ratio']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
