"""One exception type for user errors: the CLI prints its message as one line and exits 2."""


class LoramError(Exception):
    """A problem with the user's input. The message says what is wrong and what to do."""
