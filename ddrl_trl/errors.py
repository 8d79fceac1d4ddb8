"""Error types shared by the entry points."""


class UsageError(ValueError):
    """Bad command-line input, found before any work: the `ddrl-trl` command prints it as one line, no traceback."""
