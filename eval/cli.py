"""`vlp-eval` (also `python -m eval`): score a checkpoint on eval sets, or write a run report.

vlp-eval --checkpoint PATH --dataset DIR [--dataset DIR ...] [--task auto|...] [--output F]
vlp-eval report RUN_DIR [--dataset DIR ...] [--output DIR]
vlp-eval export CHECKPOINT OUT      (open_clip's hub layout: eval/export.py)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from eval.errors import UsageError
from eval.export import EXPORT, build_export_parser, run_export
from eval.options import EvalOptions
from vlp.config import CAPTION_METHODS, GenerationConfig, ProbeConfig

PROG = "vlp-eval"
REPORT = "report"
TASK_CHOICES = (
    "auto",
    "zeroshot_classification",
    "zeroshot_retrieval",
    "geometry",
    "captioning",
    "linear_probe",
    "image_caption_selection",
)
"""Mirrors eval.tasks.TASKS; kept literal so `--help` answers without importing torch."""


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == [REPORT]:
        return _guarded(lambda: run_report(build_report_parser().parse_args(args[1:])))
    if args[:1] == [EXPORT]:
        return _guarded(lambda: run_export(build_export_parser(PROG).parse_args(args[1:])))
    return _guarded(lambda: run_eval(build_parser().parse_args(args)))


def _guarded(action: Callable[[], int]) -> int:
    try:
        return action()
    except UsageError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Zero-shot classification, retrieval and embedding-geometry metrics of a "
        "checkpoint on eval sets in clip_benchmark's layout. "
        f"`{PROG} {REPORT} RUN_DIR ...` writes a run report instead (see `{PROG} {REPORT} -h`); "
        f"`{PROG} {EXPORT} CHECKPOINT OUT` writes open_clip's hub layout.",
    )
    parser.add_argument(
        "--checkpoint",
        required=True,
        metavar="PATH",
        help="a vlp checkpoint directory, a run directory (its latest checkpoint) or an "
        "open_clip weights file (with --model)",
    )
    parser.add_argument(
        "--dataset",
        required=True,
        nargs="+",
        action="extend",
        metavar="DIR",
        help="eval set directories (repeatable)",
    )
    parser.add_argument(
        "--model", metavar="NAME", help="open_clip model name (default: from the checkpoint)"
    )
    parser.add_argument(
        "--task",
        default="auto",
        choices=TASK_CHOICES,
        help="auto (default) reads each set's dataset_type.txt: classification sets get "
        "zeroshot_classification, retrieval sets zeroshot_retrieval (with geometry), and "
        "sets marked by a task.txt image_caption_selection (several such sets of one "
        "directory also get their mean, named after the directory); captioning (a CoCa on a "
        "retrieval set) and linear_probe (a classification set with a train/ split) are asked "
        "for by name",
    )
    parser.add_argument(
        "--output",
        metavar="FILE",
        help="JSON result file (x.json); a directory (a path without a suffix) for one "
        "{dataset}_{task}.json per result; or a template using {dataset} {task} {model} "
        "{pretrained} {language}",
    )
    _add_run_options(parser)
    return parser


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--batch-size", type=int, default=256, metavar="N", help="images per batch (default 256)"
    )
    parser.add_argument(
        "--workers", type=int, default=None, metavar="N",
        help="image decoding processes (default: the CPU cores this process may use)",
    )  # fmt: skip
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    parser.add_argument(
        "--precision", default="fp32", choices=("fp32", "bf16", "fp16"), help="(default fp32)"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the linear-separability split (default 0)"
    )
    parser.add_argument(
        "--recall-k", type=int, nargs="+", default=[1, 5, 10], metavar="K", help="(1 5 10)"
    )
    parser.add_argument(
        "--retrieval-method",
        default="auto",
        choices=("auto", "exact", "faiss", "faiss-ivf"),
        help="exact: chunked exact scores; faiss: exact inner-product index; faiss-ivf: "
        "approximate inverted-file index; auto: exact below --faiss-threshold, else faiss-ivf",
    )
    parser.add_argument(
        "--faiss-threshold",
        type=int,
        default=1_000_000,
        metavar="N",
        help="gallery size from which auto uses faiss-ivf (default 1000000)",
    )
    parser.add_argument(
        "--embeddings-dir",
        metavar="DIR",
        help="retrieval: write image and caption embeddings to memory-mapped .npy files in DIR "
        "and search them a block at a time, for sets whose embeddings exceed RAM",
    )
    _add_caption_options(parser)
    _add_probe_options(parser)


_FLAGS = {
    "caption": {
        "method": "--caption-method",
        "num_beams": "--num-beams",
        "max_tokens": "--max-caption-tokens",
        "min_tokens": "--min-caption-tokens",
        "no_repeat_ngram": "--no-repeat-ngram",
        "length_penalty": "--length-penalty",
    },
    "probe": {
        "val_proportion": "--probe-val-proportion",
        "epochs": "--probe-epochs",
        "lr": "--probe-lr",
        "batch_size": "--probe-batch-size",
    },
}
"""The command-line flag of each GenerationConfig and ProbeConfig field."""


def _add_caption_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("captioning (CoCa models)")
    caption, flags = GenerationConfig(), _FLAGS["caption"]
    group.add_argument(
        flags["method"],
        dest="caption_method",
        default=caption.method,
        choices=CAPTION_METHODS,
        help=f"decoding (default {caption.method})",
    )
    for key, metavar, kind, what in (
        ("num_beams", "K", int, "beams per image with beam search"),
        ("max_tokens", "N", int, "most tokens per caption"),
        ("min_tokens", "N", int, "fewest tokens before a caption may end"),
        ("no_repeat_ngram", "N", int, "never repeat an N-gram within a caption; 0: off"),
        ("length_penalty", "X", float, "beam search ranks captions by log-prob / length**X"),
    ):
        default = getattr(caption, key)
        group.add_argument(flags[key], dest=f"caption_{key}", type=kind, default=default,
                           metavar=metavar, help=f"{what} (default {default})")  # fmt: skip
    group.add_argument(
        "--meteor", action="store_true", help="also score METEOR (Java; about 30 s to start)"
    )


def _add_probe_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("linear probe (clip_benchmark's protocol)")
    probe, flags = ProbeConfig(), _FLAGS["probe"]
    for key, metavar, kind, what in (
        ("val_proportion", "P", float, "share of train/ held out to choose the weight decay"),
        ("epochs", "N", int, "epochs of each fit"),
        ("lr", "LR", float, "AdamW learning rate"),
        ("batch_size", "N", int, "batch of each fit"),
    ):
        default = getattr(probe, key)
        group.add_argument(flags[key], dest=f"probe_{key}", type=kind, default=default,
                           metavar=metavar, help=f"{what} (default {default})")  # fmt: skip


def run_eval(args: argparse.Namespace) -> int:
    from eval.checkpoints import resolve_checkpoint
    from eval.datasets import open_eval_set

    options = _options(args)
    # everything the user named is checked before the model is loaded, paths before torch is
    datasets = [open_eval_set(Path(d)) for d in args.dataset]
    ref = resolve_checkpoint(Path(args.checkpoint), args.model)

    from eval import selection
    from eval.models import load_model
    from eval.results import markdown_tables, output_paths, write_result
    from eval.tasks import task_for

    plan = [(dataset, task_for(args.task, dataset)) for dataset in datasets]
    planned = [(dataset.name, task.name) for dataset, task in plan]
    chosen = [dataset.root for dataset, task in plan if task.name == selection.TASK]
    overall = selection.overall_groups(chosen)
    planned += [(selection.overall_name(parent), selection.TASK) for parent in overall]
    paths = (
        output_paths(args.output, planned, ref.model_name, str(ref.weights)) if args.output else []
    )
    model = load_model(ref, args.device, args.precision)
    results = []
    for dataset, task in plan:
        start = time.perf_counter()
        result = task.run(model, dataset, options)
        result.details.update(seconds=round(time.perf_counter() - start, 3), step=model.step)
        results.append(result)
    results += selection.overall_results(results)
    for path, result in zip(paths, results, strict=False):
        write_result(path, result, model.name, model.pretrained)
    step = f", step {model.step}" if model.step is not None else ""
    print(f"## {model.name} ({model.pretrained}{step})\n")
    print(markdown_tables(results), end="")
    for path in paths:
        print(f"wrote {path}", file=sys.stderr)
    for result in results:
        if result.details.get("retrieval_method") == "faiss-ivf":
            note = "recall@k from faiss's approximate IVF index (exact: --retrieval-method exact)"
            print(f"{PROG}: note: {result.dataset}: {note}", file=sys.stderr)
    return 0


def _options(args: argparse.Namespace) -> EvalOptions:
    caption = GenerationConfig(**{k: getattr(args, "caption_" + k) for k in _FLAGS["caption"]})
    probe = ProbeConfig(**{k: getattr(args, "probe_" + k) for k in _FLAGS["probe"]})
    for section, config, checks in (
        ("caption", caption, caption.checks()),
        ("probe", probe, probe.checks()),
    ):
        for ok, key, expected in checks:
            if not ok:
                flag = _FLAGS[section][key]
                raise UsageError(f"{flag} {getattr(config, key)}: must be {expected}")
    try:
        return EvalOptions(
            batch_size=args.batch_size,
            workers=_default_workers() if args.workers is None else args.workers,
            recall_ks=tuple(args.recall_k),
            retrieval_method=args.retrieval_method,
            faiss_threshold=args.faiss_threshold,
            embeddings_dir=_embeddings_dir(args.embeddings_dir),
            seed=args.seed,
            caption=caption,
            meteor=args.meteor,
            probe=probe,
        )
    except ValueError as err:
        raise UsageError(str(err)) from err


def _embeddings_dir(directory: str | None) -> str | None:
    """DIR of --embeddings-dir, created now so that a bad path fails before the model loads."""
    if directory is None:
        return None
    try:
        Path(directory).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        message = f"--embeddings-dir {directory}: cannot create it ({err.strerror})"
        raise UsageError(message) from err
    if not os.access(directory, os.W_OK):
        raise UsageError(f"--embeddings-dir {directory}: not writable")
    return directory


def build_report_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"{PROG} {REPORT}",
        description="Write RUN_DIR's report: report.md with training curves from "
        "metrics.jsonl and, for each --dataset, metrics and figures of the latest checkpoint "
        "(modality-gap projection, confusion matrix, retrieval examples).",
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a training run directory")
    parser.add_argument(
        "--dataset", nargs="+", action="extend", default=[], metavar="DIR", help="eval sets"
    )
    parser.add_argument(
        "--checkpoint",
        metavar="PATH",
        help="checkpoint to evaluate (default: the run's latest complete checkpoint)",
    )
    parser.add_argument("--model", metavar="NAME", help="open_clip model name override")
    parser.add_argument(
        "--output", metavar="DIR", help="report directory (default: RUN_DIR/report)"
    )
    parser.add_argument(
        "--examples", type=int, default=4, metavar="N", help="retrieval examples (default 4)"
    )
    _add_run_options(parser)
    return parser


def run_report(args: argparse.Namespace) -> int:
    from eval.report import write_report

    run_dir = Path(args.run_dir)
    output = Path(args.output) if args.output else run_dir / "report"
    path = write_report(
        run_dir,
        [Path(d) for d in args.dataset],
        output,
        checkpoint=Path(args.checkpoint) if args.checkpoint else None,
        model_name=args.model,
        device=args.device,
        precision=args.precision,
        options=_options(args),
        num_examples=args.examples,
    )
    print(f"wrote {path}")
    return 0


def _default_workers() -> int:
    """The CPU cores this process may use (imported here: torch loads with vlp.distributed)."""
    from vlp.distributed import cpu_cores

    return cpu_cores()
