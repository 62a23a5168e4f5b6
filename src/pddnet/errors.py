"""The one project exception type; the CLI turns it into a clean message and exit code 2."""


class PddnetError(Exception):
    """A user-facing error: the message says what is wrong and what to do."""
