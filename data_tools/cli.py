"""`vlp-shard` (also `python -m data_tools`): one subcommand per source of captioned images."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from data_tools import commands as cmd
from data_tools.errors import UsageError
from data_tools.images import DEFAULT_MAX_PIXELS, FORMATS, RESIZE_MODES
from vlp import runlock

PROG = "vlp-shard"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (UsageError, runlock.Busy) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except OSError as err:  # disk full, permissions: the user's environment, not a bug
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Build webdataset shards and eval sets from captioned images."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = _common_options()
    _add_generated_sources(commands, common)
    _add_file_sources(commands, common)
    _add_eval_and_verify(commands, common)
    return parser


def _common_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("output options")
    group.add_argument(
        "--samples-per-shard",
        type=int,
        default=1000,
        metavar="N",
        help="samples per tar shard (default: 1000)",
    )
    group.add_argument(
        "--image-size",
        type=int,
        default=None,
        metavar="S",
        help="target image size in pixels (default: 256; 64 for demo/fashion-mnist)",
    )
    group.add_argument(
        "--resize-mode",
        choices=RESIZE_MODES,
        default=None,
        help="keep_ratio: shorter side = S; center_crop: S x S; border: longer side "
        "= S, padded square; none: keep pixels (default: keep_ratio)",
    )
    group.add_argument(
        "--format", choices=sorted(FORMATS), default="jpg", help="image encoding (default: jpg)"
    )
    group.add_argument("--quality", type=int, default=95, help="JPEG/WebP quality (default: 95)")
    group.add_argument(
        "--max-pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        help="skip images with more pixels (decompression bombs)",
    )
    group.add_argument(
        "--workers", type=int, default=1, metavar="N", help="worker processes (default: 1)"
    )
    group.add_argument(
        "--num-nodes",
        type=int,
        default=1,
        help="machines sharing this job; each runs the same command",
    )
    group.add_argument("--node-rank", type=int, default=0, help="this machine's rank")
    group.add_argument(
        "--overwrite",
        action="store_true",
        help="rebuild shards (default: resume, keeping complete shards)",
    )
    return common


def _add(commands, common, name: str, help: str, run) -> argparse.ArgumentParser:
    parser = commands.add_parser(name, parents=[common], help=help, description=help)
    parser.set_defaults(run=run)
    return parser


def _add_generated_sources(commands, common) -> None:
    """Sources vlp-shard draws itself: the demo scenes and Fashion-MNIST (single or mosaics)."""
    p = _add(
        commands,
        common,
        "demo",
        "generated shapes with short and long captions, plus zero-shot and retrieval eval sets",
        cmd.run_demo,
    )
    p.add_argument("out", type=Path, help="output directory (train/ and eval/ inside)")
    p.add_argument(
        "--num-samples", type=int, default=10000, help="training samples (default: 10000)"
    )
    p.add_argument(
        "--eval-samples", type=int, default=1000, help="samples in each eval set (default: 1000)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--weak-captions",
        action="store_true",
        help="training captions name one object of each scene; the long captions in the "
        "sidecar describe all (DreamLIP's setting); no hard negatives are written",
    )

    p = _add(
        commands,
        common,
        "fashion-mnist",
        "Fashion-MNIST from IDX files, single items or "
        "2x2 mosaics, plus the test split as a zero-shot eval set",
        cmd.run_fashion_mnist,
    )
    p.add_argument("out", type=Path)
    p.add_argument("--idx-dir", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    p.add_argument("--mosaic", action="store_true", help="2x2 mosaics with one sentence per tile")
    p.add_argument("--num-samples", type=int, default=None, help="limit training samples")
    p.add_argument(
        "--eval-samples",
        type=int,
        default=1000,
        help="mosaics in each mosaic retrieval eval set (--mosaic; default: 1000)",
    )
    p.add_argument("--seed", type=int, default=0)


def _add_file_sources(commands, common) -> None:
    """Sources read from the user's files: tables, folders, datasets, existing shards."""
    p = _add(
        commands,
        common,
        "table",
        "CSV/TSV/JSONL/parquet rows pointing at local images",
        cmd.run_table,
    )
    p.add_argument("table", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--image-col", required=True)
    p.add_argument("--caption-col", required=True)
    _long_caption_option(p)
    p.add_argument(
        "--root",
        type=Path,
        default=None,
        help="directory image paths are relative to (default: the table's)",
    )

    p = _add(
        commands,
        common,
        "folder",
        "images with same-stem .txt (and optional .json) files",
        cmd.run_folder,
    )
    p.add_argument("dir", type=Path)
    p.add_argument("out", type=Path)

    p = _add(
        commands,
        common,
        "hf",
        "a `datasets` dataset saved with save_to_disk, or parquet",
        cmd.run_hf,
    )
    p.add_argument("path", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--image-col", required=True)
    p.add_argument("--caption-col", required=True)
    _long_caption_option(p)
    p.add_argument("--split", default=None, help="split of a DatasetDict")

    p = _add(
        commands, common, "reshard", "re-encode/resize existing webdataset shards", cmd.run_reshard
    )
    p.add_argument("pattern", help="shards, e.g. 'in/{00000..00009}.tar'")
    p.add_argument("out", type=Path)


def _long_caption_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--long-caption-col",
        action="append",
        default=[],
        metavar="C",
        help="column of long captions (text or a list of texts) for the .json sidecar's `long` "
        "list, e.g. for DreamLIP sub-captions; repeat for several columns",
    )


def _add_eval_and_verify(commands, common) -> None:
    p = _add(
        commands,
        common,
        "eval-set",
        "build a clip_benchmark classification or retrieval set",
        cmd.run_eval_set,
    )
    p.add_argument("kind", choices=("classification", "retrieval"))
    p.add_argument("out", type=Path)
    p.add_argument("--folder", type=Path, help="classification: one sub-folder per class")
    p.add_argument("--table", type=Path, help="CSV/TSV/JSONL/parquet with image paths")
    p.add_argument("--image-col")
    p.add_argument("--label-col", help="classification: class name or index")
    p.add_argument(
        "--caption-col",
        action="append",
        default=[],
        help="retrieval: caption column (repeat for several captions per image)",
    )
    p.add_argument("--root", type=Path, default=None)
    p.add_argument("--classnames", type=Path, help="one class name per line (label order)")
    p.add_argument("--templates", type=Path, help="zero-shot templates with {c}, one per line")

    p = commands.add_parser(
        "verify",
        help="decode every sample; exit 1 if any is bad",
        description="decode every sample; exit 1 if any is bad",
    )
    p.add_argument("pattern", help="shards, e.g. 'out/train/{00000..00009}.tar'")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS)
    p.set_defaults(run=cmd.run_verify)
