"""Train CLIP or CoCa: `accelerate launch vlp/train.py --config configs/X.yaml key=value ...`.

The documented entry point; the command is vlp/cli.py and the loop vlp/trainer.py. It runs the
installed vlp package (`make setup`), not the files beside it.
"""

import sys

try:
    from vlp.cli import main
except ModuleNotFoundError as err:
    if err.name != "vlp":
        raise
    print("vlp-train: error: the vlp package is not installed; run `make setup`", file=sys.stderr)
    raise SystemExit(2) from None

if __name__ == "__main__":
    raise SystemExit(main())
