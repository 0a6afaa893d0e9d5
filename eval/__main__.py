"""`python -m eval` is `vlp-eval`."""

import sys

from eval.cli import main

sys.exit(main())
