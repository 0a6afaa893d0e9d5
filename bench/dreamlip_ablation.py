"""DreamLIP ablation: plain CLIP / CoCa against the same model with DreamLIP's objectives.

    python bench/dreamlip_ablation.py [--steps 200] [--batch-size 64] [--subcaptions 3]

For each dataset (the generated demo shapes, Fashion-MNIST 2x2 mosaics) and each variant, one
training run of the same model, seed, batch and number of samples; then zero-shot acc1 and
retrieval recall@1/5 with single-sentence queries (one per object or tile) and with the full
long captions, all on held-out sets. The step-time cost of the DreamLIP terms is measured by
alternating training steps of the plain and the DreamLIP trainer in one process (the machine is
shared, so only the ratio is meaningful). Writes bench/results/dreamlip_ablation.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import RESULTS, WORK, git_state, machine_info, write_results  # noqa: E402
from vlp.config import load_config  # noqa: E402
from vlp.train import Trainer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATASETS: dict[str, dict[str, Any]] = {
    "demo": {
        "build": ["demo", "data/demo"],
        "shards": "data/demo/train/{00000..00009}.tar",
        "eval": {
            "zeroshot": "data/demo/eval/shapes",
            "sentences": "data/demo/eval/retrieval-sentences",
            "long": "data/demo/eval/retrieval-long",
        },
    },
    "fashion-mosaic": {
        "build": ["fashion-mnist", "data/fashion-mosaic", "--mosaic"],
        "shards": "data/fashion-mosaic/train/{00000..00014}.tar",
        "eval": {
            "zeroshot": "data/fashion-mosaic/eval/fashion-mnist",
            "sentences": "data/fashion-mosaic/eval/mosaic-retrieval-sentences",
            "long": "data/fashion-mosaic/eval/mosaic-retrieval-long",
        },
    },
}
PLAIN = {
    "clip": ["model.name=vlp-tiny-clip"],
    "coca": ["model.name=vlp-tiny-coca", "objectives.caption.weight=2"],
}
METRICS = [
    ("zeroshot", "acc1"),
    *[
        (view, f"{direction}_retrieval_recall@{k}")
        for view in ("sentences", "long")
        for direction in ("image", "text")
        for k in (1, 5)
    ],
]


def dreamlip(subcaptions: int) -> list[str]:
    return [
        "data.caption=subcaptions",
        f"data.subcaptions.num={subcaptions}",
        "objectives.contrastive.weight=0",
        "objectives.multi_positive.weight=1",
        "objectives.subcaption_grouping.weight=1",
    ]


def variants(subcaptions: int) -> dict[str, list[str]]:
    return {
        **{name: overrides for name, overrides in PLAIN.items()},
        **{f"{n}+dreamlip": [*o, *dreamlip(subcaptions)] for n, o in PLAIN.items()},
    }


def overrides_for(dataset: str, run_dir: Path, args: argparse.Namespace) -> list[str]:
    spec = DATASETS[dataset]
    evals = [f"eval.{name}.dataset={path}" for name, path in spec["eval"].items()]
    return [
        f"data.train_shards={spec['shards']}",
        f"data.batch_size={args.batch_size}",
        f"data.workers={args.workers}",
        f"train.steps={args.steps}",
        "train.lr=1e-3",
        f"train.warmup_steps={max(1, args.steps // 10)}",
        f"train.log_every_steps={max(1, args.steps // 5)}",
        f"checkpoint.every_steps={args.steps}",
        "checkpoint.keep=1",
        f"run.output_dir={run_dir}",
        "run.trackers=[]",
        *evals,
    ]


def ensure_data(dataset: str) -> None:
    spec = DATASETS[dataset]
    if all((REPO / path / "dataset_type.txt").exists() for path in spec["eval"].values()):
        return
    command = [sys.executable, "-m", "data_tools", *spec["build"]]
    subprocess.run(command, cwd=REPO, check=True)


def train_and_score(dataset: str, variant: str, overrides: list[str], args) -> dict[str, Any]:
    run_dir = WORK / "dreamlip" / dataset / variant
    if run_dir.exists():
        subprocess.run(["rm", "-rf", str(run_dir)], check=True)
    cfg = load_config(None, [*overrides_for(dataset, run_dir, args), *overrides])
    started = time.perf_counter()
    Trainer(cfg).train()
    seconds = time.perf_counter() - started
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    final = {k: v for record in records for k, v in record.items()}
    metrics = {f"{view}/{name}": final[f"eval/{view}/{name}"] for view, name in METRICS}
    losses = {k: v for k, v in final.items() if k.startswith("loss/")}
    return {"metrics": metrics, "final_losses": losses, "seconds": seconds}


def step_time_ratio(model: str, args) -> dict[str, Any]:
    """Median step seconds (data wait excluded) of plain vs DreamLIP, alternating steps."""
    trainers = {}
    for name, overrides in (
        ("plain", PLAIN[model]),
        ("dreamlip", [*PLAIN[model], *dreamlip(args.subcaptions)]),
    ):
        run_dir = WORK / "dreamlip" / "timing" / f"{model}-{name}"
        cfg = load_config(
            None,
            [*overrides_for("demo", run_dir, args)[:-3], *overrides, "train.steps=100000"],
        )
        trainer = Trainer(cfg)
        trainers[name] = (trainer, iter(trainer.loader))
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


def markdown(results: dict[str, Any]) -> str:
    header = (
        "| data | variant | zero-shot acc1 | sentence t→i R@1 / R@5 | sentence i→t R@1 / R@5 "
        "| long t→i R@1 / R@5 | long i→t R@1 / R@5 |"
    )
    lines = [header, "|" + " --- |" * 7]
    for dataset, runs in results["runs"].items():
        for variant, run in runs.items():
            m = run["metrics"]

            def pair(view: str, direction: str, m=m) -> str:
                at1 = m[f"{view}/{direction}_retrieval_recall@1"]
                return f"{at1:.3f} / {m[f'{view}/{direction}_retrieval_recall@5']:.3f}"

            cells = [
                dataset,
                variant,
                f"{m['zeroshot/acc1']:.3f}",
                pair("sentences", "image"),
                pair("sentences", "text"),
                pair("long", "image"),
                pair("long", "text"),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--subcaptions", type=int, default=3, help="K sub-captions per image")
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--variants", nargs="+", default=None)
    parser.add_argument("--timing-models", nargs="+", default=list(PLAIN), choices=list(PLAIN))
    parser.add_argument("--timing-steps", type=int, default=15)
    parser.add_argument("--timing-warmup", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS / "dreamlip_ablation.json")
    args = parser.parse_args()
    chosen = variants(args.subcaptions)
    if args.variants:
        chosen = {name: chosen[name] for name in args.variants}
    results: dict[str, Any] = {
        "benchmark": "dreamlip_ablation",
        "command": " ".join(sys.argv),
        "git": git_state(),
        "machine": {**machine_info(), "note": "shared with other jobs; compare ratios only"},
        "settings": {**vars(args), "out": str(args.out), "variants": chosen},
        "runs": {},
    }
    for dataset in args.datasets:
        ensure_data(dataset)
        results["runs"][dataset] = {}
        for variant, overrides in chosen.items():
            print(f"== {dataset} / {variant}", flush=True)
            results["runs"][dataset][variant] = train_and_score(dataset, variant, overrides, args)
            write_results(args.out, results)
    if args.timing_steps:
        ensure_data("demo")
        results["step_time"] = {m: step_time_ratio(m, args) for m in args.timing_models}
    write_results(args.out, results)
    print(markdown(results))
    for model, timing in results.get("step_time", {}).items():
        print(f"step time {model}+dreamlip / {model}: {timing['median_ratio']:.2f}x")


if __name__ == "__main__":
    main()
