"""One exception type for user errors: the CLI prints its message as one line and exits 2."""


class LoramError(Exception):
    """A problem with the user's input. The message says what is wrong and what to do."""


def warn(msg: str) -> None:
    """A one-line `warning: ...` on stderr: something loram accepts but cannot check."""
    import sys

    print(f"warning: {msg}", file=sys.stderr, flush=True)
