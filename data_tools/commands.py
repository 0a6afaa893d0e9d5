"""What each `vlp-shard` subcommand does, given its parsed arguments."""

from __future__ import annotations

import argparse
from pathlib import Path

from data_tools import layouts
from data_tools.errors import UsageError
from data_tools.evalsets import (
    ClassFolderSource,
    LabeledTableSource,
    RetrievalTableSource,
    read_templates,
    write_classification_set,
    write_retrieval_set,
    write_selection_set,
    write_train_split,
)
from data_tools.images import ImageOptions
from data_tools.sources import Source
from data_tools.verify import verify
from data_tools.writer import Summary, WriteOptions, write_dataset
from vlp.data import format as fmt

MAX_IMAGE_SIZE = 16384
"""Largest --image-size: a side beyond this is a typo, not a training resolution."""
MAX_COUNT = 2**40
"""Largest sample, shard and node count: beyond it a number is a typo (and overflows)."""
MAX_WORKERS = 1024


def image_options(args: argparse.Namespace, size: int = 256, mode: str = "keep_ratio"):
    options = ImageOptions(
        size=args.image_size if args.image_size is not None else size,
        resize_mode=args.resize_mode or mode,
        format=args.format,
        quality=args.quality,
        max_pixels=args.max_pixels,
    )
    if options.size < 8:
        raise UsageError(f"--image-size {options.size} is too small (minimum 8)")
    if options.size > MAX_IMAGE_SIZE:
        raise UsageError(f"--image-size {options.size} is too large (maximum {MAX_IMAGE_SIZE})")
    if not 1 <= options.quality <= 100:
        raise UsageError(f"--quality {options.quality} must be between 1 and 100")
    check_max_pixels(options.max_pixels)
    return options


def check_count(value: int, flag: str, maximum: int = MAX_COUNT) -> None:
    if not 1 <= value <= maximum:
        raise UsageError(f"{flag} {value} must be between 1 and {maximum}")


def check_max_pixels(max_pixels: int) -> None:
    if max_pixels < 1:  # every image would be skipped as a decompression bomb
        raise UsageError(f"--max-pixels {max_pixels} must be at least 1")


def write_options(args: argparse.Namespace) -> WriteOptions:
    check_count(args.samples_per_shard, "--samples-per-shard")
    check_count(args.workers, "--workers", MAX_WORKERS)
    check_count(args.num_nodes, "--num-nodes")
    if not 0 <= args.node_rank < args.num_nodes:
        raise UsageError(f"--node-rank {args.node_rank} must be in [0, {args.num_nodes})")
    return WriteOptions(
        args.samples_per_shard, args.workers, args.num_nodes, args.node_rank, args.overwrite
    )


def write_train(source: Source, out: Path, args: argparse.Namespace, image: ImageOptions) -> int:
    summary = write_dataset(source, out / fmt.TRAIN_DIR, layouts.TRAIN, image, write_options(args))
    report(summary, "train")
    return 0


def report(summary: Summary, what: str) -> None:
    """One summary paragraph per written set, on stdout."""
    rate = summary.samples / max(summary.seconds, 1e-9)
    print(
        f"{what}: wrote {summary.samples} samples in {_n(summary.written_shards, 'shard')} "
        f"({summary.skipped_shards} already complete) in {summary.seconds:.1f} s ({rate:.0f}/s)"
    )
    if summary.errors:
        print(
            f"  skipped {_n(sum(summary.errors.values()), 'bad item')}: {_counts(summary.errors)}"
        )
    if not summary.complete:
        print(
            f"  this node's shards are done; {fmt.SIZES_FILE} is written when all "
            f"{summary.num_shards} shards are (by the last node to finish)"
        )
        return
    print(
        f"  complete: {summary.total_samples} samples in {_n(summary.num_shards, 'shard')} "
        f"at {summary.out_dir}"
    )
    if summary.total_errors:
        print(
            f"  {_n(sum(summary.total_errors.values()), 'bad item')} skipped in total: "
            f"{_counts(summary.total_errors)} (examples in *{fmt.STATS_SUFFIX})"
        )


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


def _counts(errors) -> str:
    return ", ".join(f"{reason} {n}" for reason, n in sorted(errors.items()))


def run_verify(args: argparse.Namespace) -> int:
    check_count(args.workers, "--workers", MAX_WORKERS)
    check_max_pixels(args.max_pixels)
    result = verify(args.pattern, workers=args.workers, max_pixels=args.max_pixels)
    duplicates = result.errors.get("duplicate_key", 0)
    print(
        f"verified {result.samples} items: {result.good} good, {result.samples - result.good} bad"
        + (f"; {duplicates} duplicate keys" if duplicates else "")
    )
    for reason, count in sorted(result.errors.items()):
        print(f"  {reason:<20} {count}")
    for line in result.examples + result.sizes_mismatches:
        print(f"  {line}")
    return 0 if result.ok else 1


def run_eval_set(args: argparse.Namespace) -> int:
    image = image_options(
        args, mode="center_crop" if args.kind == "classification" else "keep_ratio"
    )
    opts = write_options(args)
    if args.kind == "retrieval":
        if args.table is None or not args.caption_col:
            raise UsageError("a retrieval set needs --table, --image-col and --caption-col")
        source = RetrievalTableSource(args.table, args.image_col, args.caption_col, args.root)
        report(write_retrieval_set(source, args.out, image, opts), "retrieval")
        return 0
    source = _classification_source(args)
    templates = read_templates(args.templates)
    summary = write_classification_set(source, args.out, source.classnames, templates, image, opts)
    report(summary, "classification")
    return 0


def _classification_source(args: argparse.Namespace):
    if (args.folder is None) == (args.table is None):
        raise UsageError("a classification set needs either --folder or --table (not both)")
    if args.folder is not None:
        return ClassFolderSource(args.folder)
    if args.image_col is None or args.label_col is None:
        raise UsageError("--table needs --image-col and --label-col")
    classnames = None
    if args.classnames is not None:
        if not args.classnames.is_file():
            raise UsageError(f"{args.classnames}: no such classnames file")
        classnames = [
            line.strip() for line in args.classnames.read_text().splitlines() if line.strip()
        ]
    return LabeledTableSource(args.table, args.image_col, args.label_col, args.root, classnames)


def run_table(args: argparse.Namespace) -> int:
    from data_tools.sources.table import TableSource

    source = TableSource(
        args.table, args.image_col, args.caption_col, args.root, args.long_caption_col
    )
    return write_train(source, args.out, args, image_options(args))


def run_folder(args: argparse.Namespace) -> int:
    from data_tools.sources.folder import FolderSource

    return write_train(FolderSource(args.dir), args.out, args, image_options(args))


def run_hf(args: argparse.Namespace) -> int:
    from data_tools.sources.hf import HfSource

    source = HfSource(
        args.path, args.image_col, args.caption_col, args.split, args.long_caption_col
    )
    return write_train(source, args.out, args, image_options(args))


def run_reshard(args: argparse.Namespace) -> int:
    from data_tools.sources.reshard import ReshardSource

    source = ReshardSource(args.pattern)
    code = write_train(source, args.out, args, image_options(args))
    if source.duplicate_keys:  # not bad samples: every one is written, under a new key
        print(
            f"  {_n(source.duplicate_keys, 'input sample')} repeated a key already seen (all "
            "written, under new unique keys; `vlp-shard verify` lists them as duplicate_key)"
        )
    return code


def run_fashion_mnist(args: argparse.Namespace) -> int:
    from data_tools.sources import fashion_mnist as fm

    image = image_options(args, size=64)
    if args.num_samples is not None:
        check_count(args.num_samples, "--num-samples")
    check_count(args.eval_samples, "--eval-samples")
    train = fm.FashionMnistSource(args.idx_dir, "train", args.mosaic, args.num_samples, args.seed)
    write_train(train, args.out, args, image)
    test = fm.FashionMnistSource(args.idx_dir, "test")
    templates = [t.replace("{a} {c}", "{c}").replace("{a}", "a") for t in fm.TEMPLATES]
    eval_dir = args.out / "eval" / "fashion-mnist"
    summary = write_classification_set(
        test, eval_dir, fm.CLASSNAMES, templates, image, write_options(args)
    )
    report(summary, "eval/fashion-mnist")
    # the linear probe's train split: single items of the train split (--num-samples of them)
    probe_train = fm.FashionMnistSource(args.idx_dir, "train", num_samples=args.num_samples)
    name = f"eval/fashion-mnist/{fmt.EVAL_TRAIN_SPLIT}"
    report(write_train_split(probe_train, eval_dir, image, write_options(args)), name)
    if args.mosaic:
        for view in ("sentences", "long"):
            mosaics = fm.FashionMnistSource(
                args.idx_dir, "test", True, args.eval_samples, captions=view
            )
            name = f"mosaic-retrieval-{view}"
            report(
                write_retrieval_set(mosaics, args.out / "eval" / name, image, write_options(args)),
                f"eval/{name}",
            )
        from data_tools.sources.binding import FASHION_KINDS, FashionBindingSource

        sets = {k: FashionBindingSource(args.idx_dir, k, args.eval_samples, args.seed)
                for k in FASHION_KINDS}  # fmt: skip
        write_binding_sets(sets, args.out, image, write_options(args))
    return 0


def write_binding_sets(sources: dict[str, Source], out: Path, image, opts: WriteOptions) -> None:
    """One image-caption selection set per kind of negative, in OUT/eval/binding/<kind>."""
    for kind, source in sources.items():
        name = f"eval/{fmt.BINDING_DIR}/{kind}"
        report(write_selection_set(source, out / name, image, opts), name)


def run_demo(args: argparse.Namespace) -> int:
    from data_tools.sources import binding, demo
    from data_tools.sources.negatives import DemoNegatives

    image = image_options(args, size=64, mode="none")
    opts = write_options(args)
    check_count(args.num_samples, "--num-samples")
    check_count(args.eval_samples, "--eval-samples")
    train = demo.DemoSource(
        args.num_samples, image.size, args.seed, weak_captions=args.weak_captions
    )
    # negatives rewrite every object of a caption; a weak caption names one of them
    train = train if args.weak_captions else DemoNegatives(train)
    write_train(train, args.out, args, image)
    shapes = demo.ShapesEvalSource(args.eval_samples, image.size, args.seed)
    summary = write_classification_set(
        shapes, args.out / "eval" / "shapes", demo.SHAPES, demo.SHAPE_TEMPLATES, image, opts
    )
    report(summary, "eval/shapes")
    probe_train = demo.ShapesTrainSource(args.eval_samples, image.size, args.seed)
    name = f"eval/shapes/{fmt.EVAL_TRAIN_SPLIT}"
    report(write_train_split(probe_train, args.out / "eval" / "shapes", image, opts), name)
    for view, name in (
        ("all", "retrieval"),
        ("sentences", "retrieval-sentences"),
        ("long", "retrieval-long"),
    ):
        retrieval = demo.RetrievalEvalSource(args.eval_samples, image.size, args.seed, view)
        report(
            write_retrieval_set(retrieval, args.out / "eval" / name, image, opts), f"eval/{name}"
        )
    sets = {k: binding.DemoBindingSource(k, args.eval_samples, image.size, args.seed)
            for k in binding.KINDS}  # fmt: skip
    write_binding_sets(sets, args.out, image, opts)
    return 0
