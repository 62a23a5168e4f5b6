"""How every ``pddnet`` command ends on an expected failure (one module, so the command modules
can share it without importing :mod:`pddnet.cli`, which ``python -m pddnet.cli`` runs as
``__main__``: importing it back would be circular)."""

from __future__ import annotations

import functools
import sys

import click

from pddnet.errors import PddnetError


def friendly(fn):
    """Turn PddnetError into a one-line message and exit status 2 instead of a traceback, and
    Ctrl-C into exit status 130 (the writers have removed their partial outputs by then)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except PddnetError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted: no partial outputs were left", err=True)
            sys.exit(130)

    return wrapper
