"""What the command line prints, and where: one vocabulary for every command.

- results (tables, paths, JSON) go to **stdout** -- what a script pipes on;
- notes (what was chosen, what to watch out for) go to **stderr**, hidden by ``-q``;
- details (backend descriptions, per-stage timings) go to **stderr**, shown only with ``-v``;
- progress bars (tqdm, on stderr, all made by :func:`pddnet._progress.progress_bar`) are hidden
  by ``-q``, which reads the same level, so library code needs no flag threaded through.

The level is process-wide (``PDDNET_VERBOSITY``: 0 quiet, 1 normal, 2 verbose), set once by the
``pddnet`` group from ``-q``/``-v``; a library function that takes an ``echo`` callback gets
:func:`say` or :func:`note` from its command.
"""

from __future__ import annotations

import os

import click

QUIET, NORMAL, VERBOSE = 0, 1, 2
_ENV = "PDDNET_VERBOSITY"  # also read by pddnet._progress


def set_verbosity(level: int) -> None:
    """Set the level for this process and its children (``-q`` also hides progress bars)."""
    os.environ[_ENV] = str(max(QUIET, min(VERBOSE, int(level))))


def verbosity() -> int:
    """The current level (``NORMAL`` when unset or unreadable)."""
    try:
        return max(QUIET, min(VERBOSE, int(os.environ.get(_ENV, NORMAL))))
    except ValueError:
        return NORMAL


def say(message: str = "") -> None:
    """A result line: stdout, always."""
    click.echo(message)


def note(message: str) -> None:
    """A note for the person at the terminal: stderr, hidden by ``-q``."""
    if verbosity() >= NORMAL:
        click.echo(message, err=True)


def detail(message: str) -> None:
    """Extra detail: stderr, only with ``-v``."""
    if verbosity() >= VERBOSE:
        click.echo(message, err=True)
