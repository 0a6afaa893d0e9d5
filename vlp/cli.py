"""Train CLIP or CoCa: `accelerate launch vlp/train.py --config configs/X.yaml key=value ...`.

With no arguments it trains the packaged demo config (vlp/configs/demo.yaml, which a checkout
also shows as configs/demo.yaml) on the demo shards, which `vlp-shard demo data/demo` builds
(`make demo` does both).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vlp import checkpoint, runlock
from vlp.config import PACKAGED_CONFIGS, Config, ConfigError, load_config
from vlp.data import format as fmt
from vlp.data.shards import DataError, expand_shards
from vlp.steplog import NonFiniteLoss
from vlp.stopping import Stopped, StopRequests
from vlp.trainer import PROG, Trainer

DEFAULT_CONFIG = PACKAGED_CONFIGS / "demo.yaml"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help="YAML run config (default: the demo's, configs/demo.yaml)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="if run.output_dir already holds a run, move it aside to OUTPUT_DIR.old-N and "
        "start afresh (default: refuse; resume=latest continues it)",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="dotted overrides, e.g. train.lr=1e-3 data.batch_size=32",
    )
    return parser.parse_args(argv)


def check_demo_shards(cfg: Config) -> None:
    """The default run trains on the demo shards and evaluates on the demo eval sets: if any is
    missing, say how to build them (data_tools builds them; vlp does not start it, since
    data_tools imports vlp.data)."""
    urls = expand_shards(cfg.data.train_shards)
    root = Path(urls[0]).parents[1]
    eval_dirs = [Path(e.dataset) for e in cfg.eval.values()]
    demo_eval = [d for d in eval_dirs if d.parent == root / "eval"]
    missing = [Path(u) for u in urls if not Path(u).exists()]
    missing += [d for d in demo_eval if not (d / fmt.DATASET_TYPE_FILE).exists()]
    if missing:
        raise DataError(
            f"the demo data is missing ({missing[0]}): build it with `vlp-shard demo {root}` "
            "(`make demo` builds it, trains and evaluates)"
        )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with StopRequests(PROG) as stops:
        return _run(args, stops)


def _run(args: argparse.Namespace, stops: StopRequests) -> int:
    try:
        cfg = load_config(args.config or DEFAULT_CONFIG, args.overrides)
        if args.config is None:
            check_demo_shards(cfg)
        Trainer(cfg, args.overwrite, stops).train()
    except Stopped as stop:  # its checkpoint and message are out
        return stop.exit_code
    except KeyboardInterrupt:
        print(
            f"{PROG}: interrupted: stopped at once, nothing saved since the newest checkpoint "
            "(resume=latest continues from it)",
            file=sys.stderr,
        )
        return 130
    except (ConfigError, DataError, runlock.Busy) as err:
        print(f"{PROG}: error: {_last_line(err)}", file=sys.stderr)
        return 2
    except (NonFiniteLoss, checkpoint.CheckpointError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 1
    except OSError as err:
        if err.errno not in checkpoint.OUTPUT_ERRNOS:
            raise
        # disk full or read-only output: what failed and where, not a traceback
        where = f" ({err.filename})" if err.filename and str(err.filename) not in str(err) else ""
        print(f"{PROG}: error: {_last_line(err)}{where}", file=sys.stderr)
        return 1
    return 0


def _last_line(err: Exception) -> str:
    # errors raised in DataLoader workers arrive wrapped with the worker's traceback
    return str(err).strip().splitlines()[-1].removeprefix(f"{type(err).__name__}: ")


if __name__ == "__main__":
    raise SystemExit(main())
