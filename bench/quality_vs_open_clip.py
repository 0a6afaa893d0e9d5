"""Quality and time-to-accuracy: vlp vs open_clip's trainer, both scored by clip_benchmark.

BENCHMARKS.md section 1 (quality). vlp-tiny-clip trains from scratch on Fashion-MNIST: the 60,000
training items (`vlp-shard fashion-mnist`, class-name captions) and 15,000 2x2 mosaics of them
(`--mosaic`, captions listing the four items), 75 shards read as one set. On mosaics alone both
tools stayed at 0.15-0.17 zero-shot acc1 from 2,048 to 20,480 samples (seed 0 each, chance 0.1):
a 16 px tile is no preparation for a 32 px item. Training by
`accelerate launch vlp/train.py` (the README's command) and by `open_clip_train.main` (its own
venv, as in train_vs_open_clip.py), with the same samples, batch, lr, warm-up, cosine schedule,
weight decay, AdamW betas/eps, gradient clipping and seed, for several seeds. Every S samples both
write a checkpoint (vlp: `checkpoint.every_steps`; open_clip, which checkpoints only at epoch
ends: epochs of S samples, so its data loader restarts every S samples, as it does for its users).
After training, clip_benchmark (unpatched, its own venv) scores every checkpoint of both tools:
zero-shot on the Fashion-MNIST test split (10,000 single items) and retrieval on 1,000 held-out
test mosaics (one sentence per tile as the text queries).

Reported: final metrics as mean and 95 % Student-t interval per tool and paired vlp − open_clip
differences (same seeds); the training clock each tool needs to reach open_clip's mean final
zero-shot acc1 (clock = checkpoint file written − command started: start-up and saves included,
scoring excluded), per run and on the mean curve over seeds (linear between checkpoints); the
final training loss (mean of the last five steps). Then an in-process parity check (vlp's .venv)
of the loss question: from the same initial weights and the same batches, do vlp's training step
and open_clip_train's step (ClipLoss / CoCaLoss, its AdamW groups) follow the same trajectory?

    .venv/bin/python bench/quality_vs_open_clip.py                  # `make studies` runs this
    .venv/bin/python bench/quality_vs_open_clip.py --seeds 0 1 2 3 4
    .venv/bin/python bench/quality_vs_open_clip.py --quick          # smoke check, bench/.work

Finished runs are kept in bench/.work/quality_vs_open_clip/records and reused: a stopped benchmark
continues where it stopped (--fresh starts over).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import quality_parity
from _common import (
    REPO,
    RESULTS,
    WORK,
    PeerError,
    dist_version,
    ensure_venv,
    git_state,
    machine_info,
    run_timed,
    write_results,
)
from eval_vs_clip_benchmark import WRAPPER as CLIP_BENCHMARK_WRAPPER
from eval_vs_clip_benchmark import peer_environment as clip_benchmark_environment
from train_vs_open_clip import PEER_WRAPPER, peer_probe, peer_requirements, peer_steps, vlp_steps

from vlp.study.stats import mean_interval, paired_difference

NAME = "quality_vs_open_clip"
HERE = WORK / NAME
DATA = HERE / "fashion-mosaic"
"""`vlp-shard fashion-mnist --mosaic`: 15,000 training mosaics and the eval sets."""
ITEMS = HERE / "fashion-items"
"""`vlp-shard fashion-mnist`: the 60,000 training items, one per image."""
TRAIN = HERE / "train"
"""Links to the shards of both, one numbered pattern: 75 shards, a fifth of them mosaics."""
MODEL = "vlp-tiny-clip"
MODEL_CONFIGS = REPO / "configs" / "models"
VLP, PEER = "vlp", "open_clip"
ZEROSHOT, RETRIEVAL = "fashion-mnist", "mosaic-retrieval-sentences"
METRICS = {
    "acc1": (ZEROSHOT, "acc1"),
    "acc5": (ZEROSHOT, "acc5"),
    "t2i_r1": (RETRIEVAL, "image_retrieval_recall@1"),
    "t2i_r5": (RETRIEVAL, "image_retrieval_recall@5"),
    "i2t_r1": (RETRIEVAL, "text_retrieval_recall@1"),
    "i2t_r5": (RETRIEVAL, "text_retrieval_recall@5"),
}
FINAL_STEPS = 5
GOAL_TIME_RATIO = 0.5


@dataclass(frozen=True)
class Settings:
    samples: int = 20_480
    every: int = 2_048
    """Samples between checkpoints (scored points): the same for both tools."""
    batch_size: int = 128
    lr: float = 2e-3
    warmup: int = 16
    weight_decay: float = 0.2
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    grad_clip: float = 1.0
    seeds: tuple[int, ...] = (0, 1, 2)
    vlp_workers: int = 2
    peer_workers: int = 1
    """train_vs_open_clip.py measured no gain from a second peer worker on 2 cores."""
    eval_batch: int = 256

    @property
    def steps(self) -> int:
        return self.samples // self.batch_size


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    s = Settings(seeds=tuple(args.seeds)) if not args.quick else quick_settings(args.seeds)
    records = HERE / ("records-quick" if args.quick else "records")
    if args.fresh:
        shutil.rmtree(records, ignore_errors=True)
    git_before = git_state()
    try:
        peer_python, cb_python = peer_environments()
    except PeerError as err:
        print(f"{NAME}: cannot set up a peer: {err}", file=sys.stderr)
        return 2
    ensure_data()
    try:
        runs = [
            run_or_reuse(tool, seed, s, peer_python, cb_python, records)
            for seed in s.seeds
            for tool in order(seed)
        ]
    except RuntimeError as err:  # a tool failed: its log says why
        print(f"{NAME}: {err}", file=sys.stderr)
        return 1
    summary = summarize(runs)
    parity = None if args.skip_parity else quality_parity.run(HERE, s.lr, s.warmup)
    print_report(summary, parity)
    payload = {
        "benchmark": NAME,
        "command": " ".join([os.path.relpath(sys.executable), *sys.argv]),
        "git": git_before,
        "git_at_end": git_state(),
        "machine": {
            **machine_info(),
            "open_clip_torch": dist_version(sys.executable, "open_clip_torch"),
            "peer_open_clip_torch": dist_version(peer_python, "open_clip_torch"),
            "clip_benchmark": dist_version(cb_python, "clip_benchmark"),
        },
        "settings": {**asdict(s), "model": MODEL, "commands": example_commands(s, peer_python)},
        "runs": runs,
        "summary": summary,
        "parity": parity,
    }
    path = HERE / "results-quick.json" if args.quick else RESULTS / f"{NAME}.json"
    write_results(path, payload)
    figure(runs, summary, path.with_suffix(".png"))
    print(f"results: {path}")
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=list(Settings.seeds))
    parser.add_argument("--quick", action="store_true", help="tiny budget, results in bench/.work")
    parser.add_argument("--fresh", action="store_true", help="retrain runs recorded before")
    parser.add_argument("--skip-parity", action="store_true")
    return parser.parse_args(argv)


def quick_settings(seeds: list[int]) -> Settings:
    return Settings(samples=1024, every=512, seeds=tuple(seeds[:1]))


def order(seed: int) -> tuple[str, str]:
    """The tools alternate which goes first, so a drift in the machine's load favours neither."""
    return (VLP, PEER) if seed % 2 == 0 else (PEER, VLP)


# --- set-up ------------------------------------------------------------------------------


def peer_environments() -> tuple[Path, Path]:
    """open_clip_train's venv (webdataset 0.2.86) and clip_benchmark's (numpy < 2.4)."""
    peer = ensure_venv("open_clip", peer_requirements(), peer_probe(), dict(os.environ))
    HERE.mkdir(parents=True, exist_ok=True)
    (HERE / "peer_main.py").write_text(PEER_WRAPPER.format(name=NAME))
    return peer, clip_benchmark_environment()


def ensure_data() -> None:
    """Mosaics (and the eval sets) and single items, then one training folder of links to
    both tools' shards: items first, mosaics after, numbered as one pattern."""
    for out, mosaic in ((DATA, True), (ITEMS, False)):
        if not (out / "eval" / ZEROSHOT / "dataset_type.txt").exists():
            print(f"building Fashion-MNIST shards in {out.relative_to(REPO)} ...", flush=True)
            command = [
                sys.executable,
                "-m",
                "data_tools",
                "fashion-mnist",
                str(out),
                "--workers",
                str(os.cpu_count()),
                *(["--mosaic"] if mosaic else []),
            ]
            subprocess.run(command, check=True, cwd=REPO)
    shards = sorted((ITEMS / "train").glob("*.tar")) + sorted((DATA / "train").glob("*.tar"))
    if len(list(TRAIN.glob("*.tar"))) != len(shards):
        shutil.rmtree(TRAIN, ignore_errors=True)
        TRAIN.mkdir(parents=True)
        for index, shard in enumerate(shards):
            (TRAIN / f"{index:05d}.tar").symlink_to(shard.resolve())


def shard_pattern() -> str:
    last = len(list(TRAIN.glob("*.tar"))) - 1
    return f"{TRAIN.relative_to(REPO)}/{{00000..{last:05d}}}.tar"


# --- training ----------------------------------------------------------------------------


def base_config() -> Path:
    path = HERE / "base.yaml"
    path.write_text(f"model:\n  name: {MODEL}\nobjectives:\n  contrastive:\n    weight: 1.0\n")
    return path


def vlp_command(s: Settings, seed: int, out: Path) -> list[str]:
    every = s.every // s.batch_size
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    return [
        accelerate,
        "launch",
        "--num_processes",
        "1",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "vlp/train.py",
        "--config",
        str(base_config()),
        f"data.train_shards={shard_pattern()}",
        f"data.batch_size={s.batch_size}",
        f"data.workers={s.vlp_workers}",
        f"train.steps={s.steps}",
        f"train.lr={s.lr}",
        f"train.warmup_steps={s.warmup}",
        f"train.weight_decay={s.weight_decay}",
        f"train.beta1={s.beta1}",
        f"train.beta2={s.beta2}",
        f"train.eps={s.eps}",
        f"train.grad_clip={s.grad_clip}",
        f"train.seed={seed}",
        "train.log_every_steps=1",
        f"checkpoint.every_steps={every}",
        f"checkpoint.keep={s.steps // every}",
        f"run.output_dir={out}",
        "resume=null",
    ]


def peer_command(s: Settings, seed: int, out: Path, python: Path) -> list[str]:
    return [
        str(python),
        str(HERE / "peer_main.py"),
        str(MODEL_CONFIGS),
        "--model",
        MODEL,
        "--train-data",
        shard_pattern(),
        "--dataset-type",
        "webdataset",
        "--train-num-samples",
        str(s.every),
        "--epochs",
        str(s.samples // s.every),
        "--batch-size",
        str(s.batch_size),
        "--workers",
        str(s.peer_workers),
        "--device",
        "cpu",
        "--lr",
        str(s.lr),
        "--warmup",
        str(s.warmup),
        "--lr-scheduler",
        "cosine",
        "--wd",
        str(s.weight_decay),
        "--beta1",
        str(s.beta1),
        "--beta2",
        str(s.beta2),
        "--eps",
        str(s.eps),
        "--grad-clip-norm",
        str(s.grad_clip),
        "--precision",
        "fp32",
        "--seed",
        str(seed),
        "--log-every-n-steps",
        "1",
        "--save-frequency",
        "1",
        "--zeroshot-frequency",
        "0",
        "--report-to",
        "",
        "--logs",
        str(out.parent),
        "--name",
        out.name,
    ]


def example_commands(s: Settings, peer_python: Path) -> dict[str, list[str]]:
    out = HERE / "runs" / "RUN"
    commands = {VLP: vlp_command(s, 0, out), PEER: peer_command(s, 0, out, peer_python)}
    return {k: [a.replace(f"{REPO}/", "") for a in v] for k, v in commands.items()}


def run_or_reuse(
    tool: str, seed: int, s: Settings, peer_python: Path, cb_python: Path, records: Path
) -> dict[str, Any]:
    """One training run and its scores; a run recorded before with these settings is reused."""
    label = f"{tool}-s{seed}"
    record_file = records / f"{label}.json"
    if record_file.exists():
        record = json.loads(record_file.read_text())
        if record["settings"] == record_settings(s):
            print(f"{label}: recorded before, reused", flush=True)
            return record
    out = HERE / "runs" / label
    shutil.rmtree(out, ignore_errors=True)
    log = HERE / "logs" / f"{label}.log"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "CUDA_VISIBLE_DEVICES": ""}
    print(f"{label}: training {s.samples} samples ...", flush=True)
    launched = time.time()
    if tool == VLP:
        result = run_timed(vlp_command(s, seed, out), log, env)
        steps = vlp_steps(out / "metrics.jsonl", s.batch_size)
    else:
        result = run_timed(peer_command(s, seed, out, peer_python), log, env)
        steps = peer_steps(log, None)
    if len(steps) != s.steps:
        raise RuntimeError(f"{label}: {len(steps)} steps logged, {s.steps} expected; see {log}")
    points = checkpoints(tool, out, launched, s)
    print(f"{label}: {result.seconds:.0f} s; scoring {len(points)} checkpoints ...", flush=True)
    score(points, label, cb_python, s)
    record = {
        "tool": tool,
        "seed": seed,
        "settings": record_settings(s),
        "seconds": round(result.seconds, 2),
        "others_cpu_share": round(result.others_cpu_share, 3),
        "first_step_seconds": round(steps[0].ended - launched, 2),
        "final_loss": round(sum(x.loss for x in steps[-FINAL_STEPS:]) / FINAL_STEPS, 4),
        "loss_every_step": [round(x.loss, 4) for x in steps],
        "points": [{k: v for k, v in p.items() if k != "weights"} for p in points],
    }
    write_results(record_file, record)
    return record


def record_settings(s: Settings) -> dict[str, Any]:
    """What a recorded run must share with this benchmark to be reused (any seed list)."""
    return asdict(s) | {"seeds": None, "train_shards": shard_pattern()}


def checkpoints(tool: str, out: Path, launched: float, s: Settings) -> list[dict[str, Any]]:
    """(samples seen, training clock, weights file) of every checkpoint, in order."""
    if tool == VLP:
        from vlp.runlayout import CHECKPOINT_DIR, EXPORT_FILE, checkpoint_step, complete_checkpoints

        found = [
            (checkpoint_step(d) * s.batch_size, d / EXPORT_FILE)
            for d in complete_checkpoints(out / CHECKPOINT_DIR)
        ]
    else:
        found = [
            (int(p.stem.split("_")[1]) * s.every, p)
            for p in (out / "checkpoints").glob("epoch_*.pt")
        ]
    points = []
    for samples, weights in sorted(found):
        folder = weights.parent if tool == VLP else weights
        written = max(f.stat().st_mtime for f in [folder, *folder.glob("*")])
        points.append(
            {"samples": samples, "clock": round(written - launched, 2), "weights": str(weights)}
        )
    if [p["samples"] for p in points] != list(range(s.every, s.samples + 1, s.every)):
        raise RuntimeError(f"{out}: checkpoints at {[p['samples'] for p in points]} samples")
    return points


# --- scoring -----------------------------------------------------------------------------


def score(points: list[dict[str, Any]], label: str, python: Path, s: Settings) -> None:
    """clip_benchmark on every checkpoint (one process per task); metrics into `points`."""
    out = HERE / "scores" / label
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    models = out / "models.txt"
    models.write_text("".join(f"{MODEL},{p['weights']}\n" for p in points))
    tasks = {
        ZEROSHOT: ["--task", "zeroshot_classification"],
        RETRIEVAL: ["--task", "zeroshot_retrieval", "--recall_k", "1", "5", "10"],
    }
    for dataset, task in tasks.items():
        command = [
            str(python),
            "-c",
            CLIP_BENCHMARK_WRAPPER,
            str(MODEL_CONFIGS),
            "eval",
            "--pretrained_model",
            str(models),
            "--dataset",
            f"wds/{dataset}",
            "--dataset_root",
            str(DATA / "eval" / dataset),
            *task,
            "--output",
            str(out / "{pretrained_full_path}-{dataset}.json"),
            "--batch_size",
            str(s.eval_batch),
            "--num_workers",
            "1",
            "--no_amp",
        ]
        run_timed(command, HERE / "logs" / f"{label}-score-{dataset}.log")
    for point in points:
        slug = point["weights"].replace("/", "_")
        for key, (dataset, metric) in METRICS.items():
            result = json.loads((out / f"{slug}-{dataset.replace('/', '_')}.json").read_text())
            point[key] = result["metrics"][metric]


# --- summary -----------------------------------------------------------------------------


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    by_tool = {t: [r for r in runs if r["tool"] == t] for t in (VLP, PEER)}
    final = {
        t: {
            r["seed"]: r["points"][-1] | {"final_loss": r["final_loss"], "seconds": r["seconds"]}
            for r in rs
        }
        for t, rs in by_tool.items()
    }
    keys = [*METRICS, "final_loss", "seconds"]
    per_tool = {
        t: {k: mean_interval([v[k] for v in final[t].values()]).to_dict() for k in keys}
        for t in by_tool
    }
    difference = {}
    for k in keys:
        d = paired_difference(
            {s: v[k] for s, v in final[VLP].items()}, {s: v[k] for s, v in final[PEER].items()}
        )
        difference[k] = None if d is None else d.to_dict()
    target = per_tool[PEER]["acc1"]["mean"]
    reach = {t: time_to_target(rs, target) for t, rs in by_tool.items()}
    ratio = None
    if reach[VLP]["mean_curve_clock"] and reach[PEER]["mean_curve_clock"]:
        ratio = round(reach[VLP]["mean_curve_clock"] / reach[PEER]["mean_curve_clock"], 3)
    return {
        "seeds": sorted(final[VLP]),
        "final": per_tool,
        "vlp_minus_open_clip": difference,
        "target_acc1": target,
        "time_to_target": reach,
        "time_ratio_vlp_over_open_clip": ratio,
        "goal_time_ratio": GOAL_TIME_RATIO,
        "goal_time_met": ratio is not None and ratio <= GOAL_TIME_RATIO,
        "goal_acc1_met": _not_worse(difference["acc1"]),
    }


def _not_worse(diff: dict[str, Any] | None) -> bool | None:
    """vlp's acc1 is not worse than the peer's beyond the interval of the paired difference."""
    if diff is None or diff["high"] is None:
        return None
    return diff["high"] >= 0


def time_to_target(runs: list[dict[str, Any]], target: float) -> dict[str, Any]:
    """Training clock at which acc1 first reaches `target`: per run, and on the mean curve (acc1
    and clock averaged over seeds at each checkpoint), linear between checkpoints."""
    per_run = {}
    for r in runs:
        clock = crossing(
            [p["clock"] for p in r["points"]], [p["acc1"] for p in r["points"]], target
        )
        best = max(p["acc1"] for p in r["points"])
        per_run[r["seed"]] = (
            {"clock": clock}
            if clock is not None
            else {"clock": None, "shortfall": round(target - best, 4)}
        )
    count = len(runs[0]["points"])
    clocks = [sum(r["points"][i]["clock"] for r in runs) / len(runs) for i in range(count)]
    accs = [sum(r["points"][i]["acc1"] for r in runs) / len(runs) for i in range(count)]
    mean_clock = crossing(clocks, accs, target)
    return {
        "per_run": per_run,
        "mean_curve_clock": mean_clock,
        "mean_curve_best_acc1": max(accs),
        "mean_curve": list(zip(clocks, accs, strict=True)),
    }


def crossing(clocks: list[float], values: list[float], target: float) -> float | None:
    """First clock where the piecewise-linear curve through (clock, value) reaches target; the
    curve starts at (0, -inf): a first checkpoint already above target counts at its clock."""
    for i, (clock, value) in enumerate(zip(clocks, values, strict=True)):
        if value >= target - 1e-12:
            if i == 0 or values[i - 1] == value:
                return round(clock, 2)
            share = (target - values[i - 1]) / (value - values[i - 1])
            return round(clocks[i - 1] + share * (clock - clocks[i - 1]), 2)
    return None


# --- report ------------------------------------------------------------------------------


def print_report(summary: dict[str, Any], parity: dict[str, Any] | None) -> None:
    print(f"\nseeds {summary['seeds']}; final metrics, mean [95 % interval]")
    for key, diff in summary["vlp_minus_open_clip"].items():
        cells = [_fmt(summary["final"][t][key]) for t in (VLP, PEER)]
        print(f"  {key:11s} vlp {cells[0]:28s} open_clip {cells[1]:28s} Δ {_fmt(diff)}")
    reach = summary["time_to_target"]
    print(
        f"time to open_clip's mean final acc1 {summary['target_acc1']:.4f} (mean curve): "
        f"vlp {reach[VLP]['mean_curve_clock']} s, open_clip {reach[PEER]['mean_curve_clock']} s,"
        f" ratio {summary['time_ratio_vlp_over_open_clip']} (goal ≤ {GOAL_TIME_RATIO})"
    )
    if parity:
        for model, p in parity["models"].items():
            print(f"parity {model}: max |Δ loss| over {p['steps']} steps {p['max_abs_diff']:.2e}")


def _fmt(e: dict[str, Any] | None) -> str:
    if e is None:
        return "-"
    if e["low"] is None:
        return f"{e['mean']:.4f}"
    return f"{e['mean']:.4f} [{e['low']:.4f}, {e['high']:.4f}]"


def figure(runs: list[dict[str, Any]], summary: dict[str, Any], path: Path) -> None:
    """Zero-shot acc1 against the training clock, one thin line per run, the mean curve thick."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for tool, colour in ((VLP, "tab:blue"), (PEER, "tab:orange")):
        for r in (r for r in runs if r["tool"] == tool):
            ax.plot(
                [p["clock"] for p in r["points"]],
                [p["acc1"] for p in r["points"]],
                color=colour,
                alpha=0.35,
                lw=1,
            )
        curve = summary["time_to_target"][tool]["mean_curve"]
        ax.plot(*zip(*curve, strict=True), color=colour, lw=2.5, label=f"{tool} (mean of seeds)")
    ax.axhline(
        summary["target_acc1"], color="grey", ls="--", lw=1, label="open_clip's mean final acc1"
    )
    ax.set_xlabel("training clock, s (start-up and checkpoint saves included)")
    ax.set_ylabel("zero-shot acc1, Fashion-MNIST test")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
