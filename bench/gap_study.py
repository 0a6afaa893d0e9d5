"""Contrastive gap study: CLIP vs CUA vs CUAXU at embedding dims 32/64/128 on two datasets.

METHODS.md §4, methods/dreamlip_gap.md §2.5. Every run trains the tiny CLIP (its embedding dim
overridden) from scratch for the same steps, batch and samples, with the temperature fixed at
0.01 as in the reference study, then scores at the end (eval during training, so the geometry
curves are in each run's metrics.jsonl):

- demo: the generated shapes shards; eval on data/demo/eval/{shapes,retrieval};
- fashion-mnist: 2x2 Fashion-MNIST mosaics (one sentence per tile); zero-shot on the
  Fashion-MNIST test split, retrieval and geometry on 1,000 mosaics drawn with another seed.

Variants: CLIP = contrastive; CUA = + uniformity + alignment; CUAXU = CUA + cross_uniformity
(every weight 1). Results: bench/results/gap_study.json (or bench/.work/ with --quick).

    .venv/bin/python bench/gap_study.py             # 18 runs, about an hour on 2 shared cores
    .venv/bin/python bench/gap_study.py --quick     # 10 steps per run, a smoke test
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, RESULTS, WORK, git_state, machine_info, write_results  # noqa: E402

GAP_WORK = WORK / "gap"
DIMS = (32, 64, 128)
VARIANTS = {
    "CLIP": [],
    "CUA": ["objectives.uniformity.weight=1", "objectives.alignment.weight=1"],
    "CUAXU": [
        "objectives.uniformity.weight=1",
        "objectives.alignment.weight=1",
        "objectives.cross_uniformity.weight=1",
    ],
}
METRICS = (
    "gap",
    "matched_cosine",
    "linear_separability",
    "uniformity",
    "alignment",
    "text_retrieval_recall@1",
    "image_retrieval_recall@1",
)
CURVE = ("gap", "linear_separability", "uniformity", "alignment", "text_retrieval_recall@1")
PAPER = {  # methods/dreamlip_gap.md §2.5: MS-COCO val, ViT-B/32 fine-tuned, τ = 0.01, batch 64
    (128, "CLIP"): (0.661, 0.567, 1.000, 0.276, 0.268),
    (128, "CUA"): (0.082, 0.728, 0.726, 0.258, 0.254),
    (128, "CUAXU"): (0.127, 0.637, 0.817, 0.267, 0.269),
    (64, "CLIP"): (0.314, 0.825, 1.000, 0.259, 0.255),
    (64, "CUA"): (0.068, 0.773, 0.648, 0.251, 0.245),
    (64, "CUAXU"): (0.136, 0.694, 0.769, 0.259, 0.250),
    (32, "CLIP"): (0.104, 0.909, 0.782, 0.238, 0.241),
    (32, "CUA"): (0.068, 0.813, 0.586, 0.235, 0.229),
    (32, "CUAXU"): (0.122, 0.758, 0.682, 0.238, 0.240),
}
PAPER_KEYS = ("gap", "matched_cosine", "linear_separability", "i2t_r1", "t2i_r1")


def main() -> None:
    args = parse_args()
    if args.readme_only:
        update_readme(json.loads((RESULTS / "gap_study.json").read_text()))
        return
    datasets = prepare_datasets(args)
    models = write_model_configs()
    runs = []
    for dataset, data in datasets.items():
        for dim in DIMS:
            for variant, overrides in VARIANTS.items():
                runs.append(train_and_score(args, dataset, data, dim, variant, overrides, models))
                print(summary_line(runs[-1]), flush=True)
    out = (GAP_WORK / "gap_study.json") if args.quick else RESULTS / "gap_study.json"
    results = payload(args, runs)
    write_results(out, results)
    print(f"wrote {out}")
    if not args.quick:
        update_readme(results)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=120, help="optimizer steps per run")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--temperature", type=float, default=0.01, help="fixed temperature")
    parser.add_argument("--demo-dir", type=Path, default=REPO / "data" / "demo")
    parser.add_argument(
        "--fashion-mnist-idx", type=Path, default=Path("/usr/share/datasets/fashion-mnist")
    )
    parser.add_argument(
        "--quick", action="store_true", help="10 steps per run; results in bench/.work"
    )
    parser.add_argument(
        "--readme-only", action="store_true", help="only rewrite the README tables from the results"
    )
    args = parser.parse_args()
    if args.quick:
        args.steps = 10
    return args


def shard(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "data_tools", *args], cwd=REPO, check=True)


def prepare_datasets(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Training shards and eval sets of both datasets (built when missing)."""
    demo = args.demo_dir
    if not (demo / "train").is_dir():
        shard("demo", str(demo))
    fm = GAP_WORK / "fashion-mnist"
    if not (fm / "train" / "manifest.json").is_file():
        idx = ["--idx-dir", str(args.fashion_mnist_idx)]
        shard("fashion-mnist", str(fm), "--mosaic", "--num-samples", "9600", *idx)
        shard("fashion-mnist", str(fm / "heldout"), "--mosaic", "--num-samples", "1000",
              "--seed", "1", *idx)  # fmt: skip
    retrieval = fm / "retrieval"
    if not (retrieval / "dataset_type.txt").is_file():
        build_retrieval_set(fm / "heldout" / "train", retrieval)
    return {
        "demo": {
            "shards": str(demo / "train" / "{00000..00009}.tar"),
            "eval": {
                "zeroshot": demo / "eval" / "shapes",
                "retrieval": demo / "eval" / "retrieval",
            },
        },
        "fashion-mnist": {
            "shards": str(fm / "train" / "{00000..00009}.tar"),
            "eval": {"zeroshot": fm / "eval" / "fashion-mnist", "retrieval": retrieval},
        },
    }


def build_retrieval_set(shards: Path, out: Path) -> None:
    """A retrieval eval set from held-out training shards: their images with their captions."""
    images = out.parent / "retrieval-images"
    images.mkdir(parents=True, exist_ok=True)
    rows = []
    for tar_path in sorted(shards.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            members = {m.name: m for m in tar.getmembers()}
            for name in sorted(n for n in members if n.endswith(".jpg")):
                key = name.removesuffix(".jpg")
                (images / name).write_bytes(tar.extractfile(members[name]).read())
                caption = tar.extractfile(members[key + ".txt"]).read().decode()
                rows.append({"image": name, "caption": caption})
    table = out.parent / "retrieval.csv"
    with table.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, ["image", "caption"])
        writer.writeheader()
        writer.writerows(rows)
    shard("eval-set", "retrieval", str(out), "--table", str(table), "--root", str(images),
          "--image-col", "image", "--caption-col", "caption")  # fmt: skip


def write_model_configs() -> Path:
    """vlp-tiny-clip with embed_dim 32, 64 and 128, as gap-tiny-clip-d{dim}."""
    base = json.loads((REPO / "configs" / "models" / "vlp-tiny-clip.json").read_text())
    folder = GAP_WORK / "models"
    folder.mkdir(parents=True, exist_ok=True)
    for dim in DIMS:
        (folder / f"gap-tiny-clip-d{dim}.json").write_text(json.dumps({**base, "embed_dim": dim}))
    return folder


def train_and_score(args, dataset, data, dim, variant, overrides, models) -> dict[str, Any]:
    run_dir = GAP_WORK / "runs" / f"{dataset}-d{dim}-{variant}"
    every = max(1, args.steps // 4)
    settings = [
        f"model.name=gap-tiny-clip-d{dim}",
        f"model.config_dirs=[{models}]",
        f"data.train_shards={data['shards']}",
        f"data.batch_size={args.batch_size}",
        "data.workers=1",
        f"train.steps={args.steps}",
        f"train.lr={args.lr}",
        f"train.warmup_steps={max(1, args.steps // 10)}",
        f"train.log_every_steps={every}",
        f"objectives.contrastive.fixed_temperature={args.temperature}",
        f"checkpoint.every_steps={args.steps}",
        "checkpoint.keep=1",
        f"eval.zeroshot.dataset={data['eval']['zeroshot']}",
        f"eval.retrieval.dataset={data['eval']['retrieval']}",
        f"eval.retrieval.every_steps={every}",
        f"run.output_dir={run_dir}",
        "run.trackers=[tensorboard]",
        "resume=null",
        *overrides,
    ]
    started = time.perf_counter()
    log = run_dir.parent / f"{run_dir.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    base = log.parent / "base.yaml"  # the schema's defaults: CLIP only, no evaluators
    base.write_text("objectives:\n  contrastive:\n    weight: 1.0\n")
    with log.open("w") as handle:
        cmd = [sys.executable, "vlp/train.py", "--config", str(base), *settings]
        subprocess.run(cmd, cwd=REPO, check=True, stdout=handle, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - started
    return {
        "dataset": dataset,
        "dim": dim,
        "variant": variant,
        "seconds": round(seconds, 1),
        "samples": args.steps * args.batch_size,
        **final_metrics(run_dir / "metrics.jsonl"),
    }


def final_metrics(path: Path) -> dict[str, Any]:
    """The last evaluation's headline metrics (set names dropped), and the geometry curve."""
    last: dict[str, float] = {}
    curve = []
    for line in path.read_text().splitlines():
        record = json.loads(line)
        last.update({k: v for k, v in record.items() if k.startswith("eval/")})
        if "eval/retrieval/gap" in record:
            point = {m: round(record[f"eval/retrieval/{m}"], 4) for m in CURVE}
            curve.append({"step": record["step"], **point})
    wanted = {"eval/zeroshot/acc1": "zeroshot_acc1"}
    wanted.update({f"eval/retrieval/{m}": m for m in METRICS})
    final = {name: round(last[key], 4) for key, name in wanted.items() if key in last}
    return {**final, "curve": curve}


def summary_line(run: dict[str, Any]) -> str:
    skip = ("dataset", "dim", "variant", "curve")
    shown = ", ".join(f"{k} {v}" for k, v in run.items() if k not in skip)
    return f"{run['dataset']} d{run['dim']} {run['variant']}: {shown}"


def payload(args: argparse.Namespace, runs: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "benchmark": "gap_study",
        "description": __doc__.splitlines()[0],
        "machine": {**machine_info(), "note": "2 CPU cores shared with other jobs"},
        "git": git_state(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "settings": {
            "model": "vlp-tiny-clip (width 64, depth 2, 32 px) with embed_dim overridden",
            "steps": args.steps,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "fixed_temperature": args.temperature,
            "variants": VARIANTS,
            "geometry_pairs": "each retrieval-set image with its first caption",
        },
        "runs": runs,
        "paper": {
            "source": "methods/dreamlip_gap.md §2.5 (MS-COCO val, ViT-B/32 fine-tuned, batch 64)",
            "columns": PAPER_KEYS,
            "rows": [
                {"dim": d, "variant": v, **dict(zip(PAPER_KEYS, values, strict=True))}
                for (d, v), values in PAPER.items()
            ],  # fmt: skip
        },
    }


README_START, README_END = "<!-- GAP:START (bench/gap_study.py) -->", "<!-- GAP:END -->"
COLUMNS = {"demo": "demo", "fashion-mnist": "F-MNIST"}


GEOMETRY_COLUMNS = {
    "gap": ("gap", "gap"),
    "matched cos": ("matched_cosine", "matched_cosine"),
    "lin. sep.": ("linear_separability", "linear_separability"),
}
DOWNSTREAM_COLUMNS = {
    "i→t R@1": ("text_retrieval_recall@1", "i2t_r1"),
    "t→i R@1": ("image_retrieval_recall@1", "t2i_r1"),
}
"""Table column -> (our key, the paper row's key)."""


def tables(results: dict[str, Any]) -> str:
    """Geometry and downstream tables: the paper's value beside ours on each dataset."""
    ours = {(r["dataset"], r["dim"], r["variant"]): r for r in results["runs"]}
    paper = {(r["dim"], r["variant"]): r for r in results["paper"]["rows"]}
    sets = [d for d in COLUMNS if any(key[0] == d for key in ours)]
    acc1 = [f"acc1: {COLUMNS[d]}" for d in sets]
    geometry = _header(GEOMETRY_COLUMNS, sets, [])
    downstream = _header(DOWNSTREAM_COLUMNS, sets, acc1)
    for dim in sorted({key[1] for key in ours}, reverse=True):
        for variant in VARIANTS:
            runs = [ours.get((d, dim, variant)) for d in sets]
            ref = paper.get((dim, variant))
            zero_shot = [_cell(r, "zeroshot_acc1") for r in runs]
            geometry.append(_row([dim, variant, *_cells(GEOMETRY_COLUMNS, ref, runs)]))
            downstream.append(
                _row([dim, variant, *_cells(DOWNSTREAM_COLUMNS, ref, runs), *zero_shot])
            )
    return "\n".join(geometry) + "\n\n" + "\n".join(downstream)


def _header(columns: dict[str, Any], sets: list[str], extra: list[str]) -> list[str]:
    sources = ["paper", *(COLUMNS[d] for d in sets)]
    cells = ["D", "loss", *(f"{name}: {src}" for name in columns for src in sources), *extra]
    return [_row(cells), "|" + " --- |" * len(cells)]


def _cells(columns: dict[str, Any], ref: dict | None, runs: list[dict | None]) -> list[str]:
    cells = []
    for ours_key, paper_key in columns.values():
        cells += [_cell(ref, paper_key), *(_cell(r, ours_key) for r in runs)]
    return cells


def _cell(source: dict[str, Any] | None, key: str) -> str:
    return f"{source[key]:.3f}" if source and key in source else "–"


def _row(cells: list[Any]) -> str:
    return "| " + " | ".join(map(str, cells)) + " |"


def update_readme(results: dict[str, Any]) -> None:
    readme = REPO / "README.md"
    text = readme.read_text()
    if README_START not in text or README_END not in text:
        print(f"README.md has no {README_START} ... {README_END} block; tables:\n{tables(results)}")
        return
    head, rest = text.split(README_START, 1)
    tail = rest.split(README_END, 1)[1]
    readme.write_text(f"{head}{README_START}\n{tables(results)}\n{README_END}{tail}")
    print("updated the tables in README.md")


if __name__ == "__main__":
    main()
