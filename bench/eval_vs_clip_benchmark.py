"""Evaluation speed and agreement: `vlp-eval` vs clip_benchmark's CLI on the demo eval sets.

BENCHMARKS.md section 4. Both tools score the same exported open_clip checkpoint
(vlp-small-clip) on the same eval sets in clip_benchmark's local webdataset layout, in fp32 on
the CPU. A round runs, alternating which tool goes first: each tool on the zero-shot set, each
on the retrieval set, and each on both sets as a user would run them (vlp-eval: one command
for both; clip_benchmark: one command per set, because its `--task auto` does not read
dataset_type.txt). Each run is one complete command, timed from start to exit. The rounds run on
two versions of the sets: images at the model's 64 px, and at 96 px, which both tools resize.
vlp-eval runs with its defaults (decoding workers: the cores it may use) unless --workers is
given.

clip_benchmark 1.6.2 runs unpatched in bench/.peers/clip_benchmark, which pins numpy < 2.4
(its accuracy code fails on numpy 2.4) and otherwise shares vlp's installed packages through a
.pth file, so both tools run the same torch and open_clip builds. vlp's model configs are
registered by a three-line wrapper before clip_benchmark's own `main`.

    .venv/bin/python bench/eval_vs_clip_benchmark.py             # as `make bench` would
    .venv/bin/python bench/eval_vs_clip_benchmark.py --quick     # smoke check
    .venv/bin/python bench/eval_vs_clip_benchmark.py --checkpoint runs/demo   # a trained run
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import sysconfig
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

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

NAME = "eval_vs_clip_benchmark"
MODEL = "vlp-small-clip"
VLP, PEER = "vlp-eval", "clip_benchmark"
SETS = ("shapes", "retrieval")
PEER_NUMPY = "numpy<2.4"
PEER_WORKERS = 1
"""clip_benchmark's default of 4 DataLoader workers (and any number above 1) fails on a
one-shard set with webdataset 1.x: a worker without a shard raises "No samples found ...
fewer shards than workers"."""
IMAGE_SIZES = (64, 96)
"""The sets' image sizes: the model's resolution (64), and larger images both tools resize."""
TOLERANCE = 0.001
"""Metric agreement goal: 0.1 point, as fractions."""
WRAPPER = (
    "import sys, open_clip; open_clip.add_model_config(sys.argv.pop(1)); "
    "from clip_benchmark.cli import main; sys.exit(main())"
)


@dataclass(frozen=True)
class Settings:
    eval_samples: int
    repeats: int
    batch_size: int
    vlp_workers: int | None
    """None: vlp-eval's default."""
    image_sizes: tuple[int, ...] = IMAGE_SIZES


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = Settings(
        eval_samples=40 if args.quick else args.eval_samples,
        repeats=1 if args.quick else args.repeats,
        batch_size=args.batch_size,
        vlp_workers=args.workers,
    )
    work = WORK / NAME
    try:
        peer_python = peer_environment()
    except PeerError as err:
        print(f"{NAME}: cannot set up clip_benchmark: {err}", file=sys.stderr)
        return 2
    weights, checkpoint = export_weights(work, args.checkpoint)
    runs, agreement = [], {}
    for size in settings.image_sizes:
        eval_dir = demo_sets(work, settings, size)
        runs += measure(settings, peer_python, eval_dir, weights, work / f"{size}px", size)
        agreement[f"{size}px"] = compare_metrics(work / f"{size}px")
    summary = summarize(runs, settings.image_sizes)
    print_report(summary, agreement)
    path = work / "results-quick.json" if args.quick else RESULTS / f"{NAME}.json"
    payload = {
        "benchmark": NAME,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "git": git_state(),
        "machine": {
            **machine_info(),
            "device": "cpu",
            "torch": dist_version(sys.executable, "torch"),
        },
        "settings": asdict(settings),
        "checkpoint": checkpoint,
        "tools": tool_info(peer_python, settings),
        "runs": runs,
        "summary": summary,
        "agreement": agreement,
    }
    write_results(path, payload)
    print(f"results: {path}")
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--eval-samples", type=int, default=1000, help="per eval set (1000)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (3)")
    parser.add_argument("--batch-size", type=int, default=256, help="both tools (256)")
    parser.add_argument(
        "--workers", type=int, help="vlp-eval's decode workers (default: vlp-eval's own)"
    )
    parser.add_argument(
        "--checkpoint",
        type=Path,
        help="a trained vlp-small-clip checkpoint or run directory (default: random init)",
    )
    parser.add_argument("--quick", action="store_true", help="40 samples, 1 round; bench/.work/")
    return parser.parse_args(argv)


# --- inputs and environments ---------------------------------------------------------------


def peer_environment() -> Path:
    """bench/.peers/clip_benchmark: numpy < 2.4 of its own, vlp's packages for the rest."""
    probe = "import numpy; assert tuple(map(int, numpy.__version__.split('.')[:2])) < (2, 4)"
    python = ensure_venv("clip_benchmark", [PEER_NUMPY], probe, dict(os.environ))
    # site-packages first, then the .pth's: the peer's numpy shadows vlp's
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    (Path(site) / "vlp_packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    check = subprocess.run(
        [str(python), "-c", f"{probe}; import clip_benchmark.cli, open_clip"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if check.returncode != 0:
        raise PeerError(f"clip_benchmark does not import in {python.parent.parent}: "
                        + (check.stderr.strip().splitlines() or ["?"])[-1])  # fmt: skip
    return python


def demo_sets(work: Path, settings: Settings, size: int) -> Path:
    out = work / f"demo-{settings.eval_samples}-{size}"
    if not (out / "eval" / "retrieval" / "dataset_type.txt").exists():
        command = [sys.executable, "-m", "data_tools", "demo", str(out), "--num-samples", "10",
                   "--eval-samples", str(settings.eval_samples),
                   "--image-size", str(size), "--workers", "2"]  # fmt: skip
        subprocess.run(command, check=True, cwd=REPO, capture_output=True)
    return out / "eval"


def export_weights(work: Path, checkpoint: Path | None) -> tuple[Path, dict[str, Any]]:
    """The open_clip weights file both tools load, and how it was made."""
    if checkpoint is not None:
        from eval.checkpoints import resolve_checkpoint

        ref = resolve_checkpoint(checkpoint, MODEL)
        return ref.weights, {"weights": str(ref.weights), "step": ref.step, "trained": True}
    weights = work / f"{MODEL}-random-seed0.safetensors"
    if not weights.exists():
        code = (
            "import sys, torch, open_clip; from safetensors.torch import save_file; "
            "from vlp.model import register_model_configs; register_model_configs(); "
            f"torch.manual_seed(0); m = open_clip.create_model({MODEL!r}); "
            "save_file({k: v.contiguous() for k, v in m.state_dict().items()}, sys.argv[1])"
        )
        work.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-c", code, str(weights)], check=True, cwd=REPO)
    note = "no trained checkpoint was given: randomly initialised (seed 0) weights"
    return weights, {"weights": str(weights.relative_to(REPO)), "trained": False, "note": note}


# --- runs ----------------------------------------------------------------------------------


def vlp_command(sets: list[Path], weights: Path, out: Path, settings: Settings) -> list[str]:
    workers = [] if settings.vlp_workers is None else ["--workers", str(settings.vlp_workers)]
    return [sys.executable, "-m", "eval", "--checkpoint", str(weights), "--model", MODEL,
            "--dataset", *map(str, sets), "--output", f"{out}/",
            "--batch-size", str(settings.batch_size), "--device", "cpu", *workers]  # fmt: skip


def peer_command(
    python: Path, root: Path, weights: Path, out: Path, settings: Settings
) -> list[str]:
    retrieval = ["--task", "zeroshot_retrieval", "--recall_k", "1", "5", "10"]
    return [str(python), "-c", WRAPPER, str(REPO / "configs" / "models"), "eval",
            "--model", MODEL, "--pretrained", str(weights),
            "--dataset", f"wds/{root.name}", "--dataset_root", str(root),
            "--output", str(out / f"{root.name}.json"), "--batch_size", str(settings.batch_size),
            "--num_workers", str(PEER_WORKERS), "--no_amp",
            *(retrieval if root.name == "retrieval" else [])]  # fmt: skip


def measure(
    settings: Settings, peer_python: Path, eval_dir: Path, weights: Path, work: Path, size: int
) -> list[dict[str, Any]]:
    """Alternating rounds (a warm-up round first, untimed); one record per timed command."""
    runs = []
    for round_index in range(settings.repeats + 1):
        order = (VLP, PEER) if round_index % 2 == 0 else (PEER, VLP)
        for job in (["shapes"], ["retrieval"], list(SETS)):
            for tool in order:
                wall, cpu = run_job(tool, job, settings, peer_python, eval_dir, weights, work)
                if round_index == 0:
                    continue
                name = "+".join(job)
                runs.append({"round": round_index, "tool": tool, "sets": name, "image_size": size,
                             "seconds": round(wall, 3), "cpu_seconds": round(cpu, 3)})  # fmt: skip
                print(f"{size} px round {round_index}: {tool:15s} {name:17s} {wall:6.2f} s wall "
                      f"{cpu:6.2f} s cpu", flush=True)  # fmt: skip
    return runs


def run_job(
    tool: str, job: list[str], settings: Settings, peer_python: Path, eval_dir: Path,
    weights: Path, work: Path,
) -> tuple[float, float]:  # fmt: skip
    """Wall seconds and CPU seconds (user + system, the command's whole process tree)."""
    out = work / "out" / tool
    out.mkdir(parents=True, exist_ok=True)
    logs = work / "logs"
    if tool == VLP:
        commands = [vlp_command([eval_dir / s for s in job], weights, out, settings)]
        names = ["+".join(job)]
    else:  # one command per set: clip_benchmark reads a set's task from --task only
        commands = [peer_command(peer_python, eval_dir / s, weights, out, settings) for s in job]
        names = job
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall = sum(
        run_timed(command, logs / f"{tool}-{name}.log").seconds
        for command, name in zip(commands, names, strict=True)
    )
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


# --- results -------------------------------------------------------------------------------


def compare_metrics(work: Path) -> dict[str, Any]:
    """|vlp − clip_benchmark| per metric, from the last round's result files."""
    pairs = {
        "shapes": ("shapes_zeroshot_classification.json", "shapes.json"),
        "retrieval": ("retrieval_zeroshot_retrieval.json", "retrieval.json"),
    }
    table, worst = {}, 0.0
    for name, (ours_file, theirs_file) in pairs.items():
        ours = json.loads((work / "out" / VLP / ours_file).read_text())["metrics"]
        theirs = json.loads((work / "out" / PEER / theirs_file).read_text())["metrics"]
        for metric, value in theirs.items():
            difference = abs(ours[metric] - value)
            worst = max(worst, difference)
            table[f"{name}/{metric}"] = {"vlp": ours[metric], "clip_benchmark": value,
                                         "abs_diff": difference}  # fmt: skip
    return {"tolerance": TOLERANCE, "max_abs_diff": worst, "within_tolerance": worst <= TOLERANCE,
            "metrics": table}  # fmt: skip


def summarize(runs: list[dict[str, Any]], sizes: tuple[int, ...]) -> dict[str, Any]:
    """Per image size, job and tool (key "SETS, N px"): median wall and CPU seconds; speedups =
    clip_benchmark / vlp-eval.

    The machine is shared, so wall times move with other tenants' load; CPU time moves less
    and is reported beside it.
    """
    summary: dict[str, Any] = {}
    for size in sizes:
        for job in ("shapes", "retrieval", "+".join(SETS)):
            mine = [r for r in runs if r["sets"] == job and r["image_size"] == size]
            row: dict[str, Any] = {}
            for measure_name in ("seconds", "cpu_seconds"):
                medians = {
                    tool: statistics.median(r[measure_name] for r in mine if r["tool"] == tool)
                    for tool in (VLP, PEER)
                }
                row[f"median_{measure_name}"] = medians
                row[f"speedup_{measure_name}"] = round(medians[PEER] / medians[VLP], 3)
            summary[f"{job}, {size} px"] = row
    return summary


def print_report(summary: dict[str, Any], agreement: dict[str, Any]) -> None:
    print(f"\n{'sets':24s} {'vlp-eval wall':>13s} {'peer wall':>10s} {'ratio':>6s} "
          f"{'vlp-eval cpu':>13s} {'peer cpu':>9s} {'ratio':>6s}")  # fmt: skip
    for job, row in summary.items():
        wall, cpu = row["median_seconds"], row["median_cpu_seconds"]
        ratios = row["speedup_seconds"], row["speedup_cpu_seconds"]
        print(
            f"{job:24s} {wall[VLP]:12.2f}s {wall[PEER]:9.2f}s {ratios[0]:5.2f}x "
            f"{cpu[VLP]:12.2f}s {cpu[PEER]:8.2f}s {ratios[1]:5.2f}x"
        )
    for size, result in agreement.items():
        verdict = "within" if result["within_tolerance"] else "OUTSIDE"
        print(f"metric agreement, {size}: max |diff| {result['max_abs_diff']:.2e} "
              f"({verdict} 0.1 point)")  # fmt: skip


def tool_info(peer_python: Path, settings: Settings) -> dict[str, Any]:
    return {
        VLP: {"version": dist_version(sys.executable, "vlp"), "precision": "fp32",
              "workers": settings.vlp_workers or "default (the cores it may use)"},
        PEER: {
            "version": dist_version(peer_python, "clip_benchmark"),
            "numpy": dist_version(peer_python, "numpy"),
            "environment": "bench/.peers/clip_benchmark: numpy < 2.4, other packages shared "
            "with .venv through a .pth (same torch and open_clip)",
            "options": f"--no_amp (fp32, as vlp-eval) --num_workers {PEER_WORKERS}",
        },
    }  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
