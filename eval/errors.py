"""Usage errors: `vlp-eval` reports them as one line with exit code 2, never a traceback."""


class UsageError(Exception):
    """The user asked for something that cannot work (no such dataset, wrong --model, ...).

    The message names the path or key at fault and says what to do instead.
    """
