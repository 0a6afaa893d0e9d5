"""ProtoCLIP against CLIP at equal samples: zero-shot, linear probe, clustering quality, time.

    python bench/protoclip_comparison.py [--steps 300] [--seeds 0 1] [--quick]

For each dataset (the generated demo shapes; Fashion-MNIST single items, whose captions name the
class) and each variant (CLIP; ProtoCLIP without back translation; ProtoCLIP; ProtoCLIP with the
external MiniLM teacher), one training run per seed of vlp-tiny-clip with the same batch, steps
and samples; ProtoCLIP runs in episodes of 2 shards (the first without prototypes). Each final
checkpoint is scored on the dataset's labelled eval set: zero-shot acc1, linear-probe accuracy
(logistic regression on the image embeddings, a stratified half for training, the other half
for testing) and the adjusted mutual information between the labels and a k-means of the image
embeddings into as many clusters as classes. Wall time is the whole run (feature passes and
clustering included); variants alternate within each seed, so the machine's drift favours none.
Writes bench/results/protoclip_comparison.json and the README table.
"""

from __future__ import annotations

import argparse
import json
import shutil
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
        "eval": "data/demo/eval/shapes",
    },
    "fashion-mnist": {
        "build": ["fashion-mnist", "data/fashion"],
        "shards": "data/fashion/train/{00000..00059}.tar",
        "eval": "data/fashion/eval/fashion-mnist",
    },
}
PROTO = [
    "objectives.prototype.weight=1",
    "prototypes.episode_shards=2",
    "prototypes.clusters=200",
    "prototypes.head_hidden=256",
    "prototypes.head_dim=64",
]
VARIANTS: dict[str, list[str]] = {
    "clip": [],
    "protoclip-no-pbt": [*PROTO, "objectives.prototype.back_translation=false"],
    "protoclip": PROTO,
    "protoclip+teacher": [*PROTO, "objectives.prototype_external.weight=1"],
}
METRICS = ("acc1", "linear_probe", "ami")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--quick", action="store_true", help="40 steps, one seed; bench/.work")
    parser.add_argument(
        "--summary-only", action="store_true", help="re-summarise the results file's runs"
    )
    return parser.parse_args(argv)


def ensure_data(dataset: str) -> None:
    spec = DATASETS[dataset]
    if not (REPO / spec["eval"] / "dataset_type.txt").exists():
        subprocess.run([sys.executable, "-m", "data_tools", *spec["build"]], cwd=REPO, check=True)


def train(dataset: str, variant: str, seed: int, args: argparse.Namespace) -> tuple[Path, float]:
    run_dir = WORK / "protoclip" / dataset / f"{variant}-s{seed}"
    shutil.rmtree(run_dir, ignore_errors=True)
    cfg = load_config(
        None,
        [
            "model.name=vlp-tiny-clip",
            f"data.train_shards={DATASETS[dataset]['shards']}",
            f"data.batch_size={args.batch_size}",
            f"data.workers={args.workers}",
            f"train.steps={args.steps}",
            "train.lr=1e-3",
            f"train.warmup_steps={max(1, args.steps // 10)}",
            f"train.log_every_steps={max(1, args.steps // 5)}",
            f"train.seed={seed}",
            f"checkpoint.every_steps={args.steps}",
            "checkpoint.keep=1",
            f"run.output_dir={run_dir}",
            "run.trackers=[]",
            *VARIANTS[variant],
        ],
    )
    started = time.perf_counter()
    Trainer(cfg).train()
    return run_dir, time.perf_counter() - started


def score(run_dir: Path, eval_dir: str, seed: int) -> dict[str, float]:
    """Zero-shot acc1, linear-probe accuracy and AMI of k-means, on the eval set's images."""
    from sklearn.cluster import KMeans
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import adjusted_mutual_info_score
    from sklearn.model_selection import train_test_split

    from eval.checkpoints import resolve_checkpoint
    from eval.datasets import open_eval_set
    from eval.models import load_model
    from eval.options import EvalOptions
    from eval.zero_shot import run_zeroshot_classification

    model = load_model(resolve_checkpoint(run_dir), device="cpu")
    dataset = open_eval_set(REPO / eval_dir)
    outputs = run_zeroshot_classification(model, dataset, EvalOptions(workers=0))
    x, y = outputs.images.embeddings.numpy(), outputs.labels.numpy()
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.5, stratify=y, random_state=seed
    )
    probe = LogisticRegression(max_iter=2000).fit(x_train, y_train)
    clusters = KMeans(len(dataset.classnames), n_init=10, random_state=seed).fit_predict(x)
    return {
        "acc1": outputs.scores.acc1,
        "linear_probe": float(probe.score(x_test, y_test)),
        "ami": float(adjusted_mutual_info_score(y, clusters)),
    }


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per dataset and variant: mean of each metric over seeds; time relative to CLIP."""
    summary: dict[str, Any] = {}
    for dataset in sorted({r["dataset"] for r in runs}):
        mine = [r for r in runs if r["dataset"] == dataset]
        clip_seconds = {r["seed"]: r["seconds"] for r in mine if r["variant"] == "clip"}
        for variant in VARIANTS:
            own = [r for r in mine if r["variant"] == variant]
            if not own:
                continue
            cell = {m: round(statistics.mean(r["metrics"][m] for r in own), 4) for m in METRICS}
            cell["seconds"] = round(statistics.median(r["seconds"] for r in own), 1)
            ratios = [r["seconds"] / clip_seconds[r["seed"]] for r in own]
            cell["time_vs_clip"] = round(statistics.median(ratios), 2)
            cell["seeds"] = len(own)
            summary[f"{dataset}/{variant}"] = cell
    return summary


def readme_table(summary: dict[str, Any], steps: int, batch: int, seeds: int) -> str:
    lines = [
        f"<!-- PROTOCLIP:START (bench/protoclip_comparison.py: vlp-tiny-clip, {steps * batch:,} "
        f"samples per run, mean of {seeds} seeds) -->",
        "| data | variant | zero-shot acc1 | linear probe | AMI | wall time vs CLIP |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for key, cell in summary.items():
        dataset, variant = key.split("/")
        lines.append(
            f"| {dataset} | {variant} | {cell['acc1']:.3f} | {cell['linear_probe']:.3f} | "
            f"{cell['ami']:.3f} | {cell['time_vs_clip']:.2f}x |"
        )
    return "\n".join([*lines, "<!-- PROTOCLIP:END -->"])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.summary_only:
        return resummarise(RESULTS / "protoclip_comparison.json")
    if args.quick:
        args.steps, args.seeds = 40, args.seeds[:1]
    runs = []
    for dataset in args.datasets:
        ensure_data(dataset)
        for seed in args.seeds:
            order = list(VARIANTS) if seed % 2 == 0 else list(reversed(VARIANTS))
            for variant in order:
                run_dir, seconds = train(dataset, variant, seed, args)
                metrics = score(run_dir, DATASETS[dataset]["eval"], seed)
                runs.append(dict(dataset=dataset, variant=variant, seed=seed, seconds=seconds))
                runs[-1]["metrics"] = metrics
                print(f"{dataset} {variant} seed {seed}: {metrics}, {seconds:.0f} s", flush=True)
    summary = summarize(runs)
    payload = {
        "benchmark": "protoclip_comparison",
        "command": " ".join(["bench/protoclip_comparison.py", *(argv or sys.argv[1:])]),
        "git": git_state(),
        "machine": machine_info(),
        "settings": {**vars(args), "variants": VARIANTS},
        "runs": runs,
        "summary": summary,
    }
    out = (
        WORK / "protoclip" / "results-quick.json"
        if args.quick
        else RESULTS / "protoclip_comparison.json"
    )
    write_results(out, payload)
    table = readme_table(summary, args.steps, args.batch_size, len(args.seeds))
    print(table)
    if not args.quick:
        write_readme(table)
    print(f"results: {out}")
    return 0


def resummarise(path: Path) -> int:
    payload = json.loads(path.read_text())
    payload["summary"] = summarize(payload["runs"])
    write_results(path, payload)
    settings = payload["settings"]
    table = readme_table(
        payload["summary"], settings["steps"], settings["batch_size"], len(settings["seeds"])
    )
    write_readme(table)
    print(table)
    return 0


def write_readme(table: str) -> None:
    readme = REPO / "README.md"
    text = readme.read_text()
    start, end = text.find("<!-- PROTOCLIP:START"), text.find("<!-- PROTOCLIP:END -->")
    if start >= 0 and end > start:
        readme.write_text(text[:start] + table + text[end + len("<!-- PROTOCLIP:END -->") :])


if __name__ == "__main__":
    raise SystemExit(main())
