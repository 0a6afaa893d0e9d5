"""Usage errors: reported as one line with exit code 2, never a traceback."""


class UsageError(Exception):
    """The user asked for something that cannot work (no such input, unknown column, ...)."""
