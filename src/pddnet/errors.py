"""The project's exception types; the CLI turns them into one line and an exit status."""


class PddnetError(Exception):
    """A user-facing error: the message says what is wrong and what to do (exit status 2)."""


class CheckFailed(PddnetError):
    """A check ran and failed -- a validation gate, a damaged bundle (exit status 1)."""
