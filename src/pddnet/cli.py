"""The ``pddnet`` command line: a thin click group; each command calls one library function.

Heavy imports (torch, onnxruntime, tensorrt) happen inside the command functions so that
``pddnet --help`` and the runtime commands work without them.
"""

from __future__ import annotations

import functools
import sys

import click

from pddnet.errors import PddnetError


def _friendly(fn):
    """Turn PddnetError into a one-line message and exit status 2 instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except PddnetError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="pddnet")
def main() -> None:
    """PDD-Net deformable registration: train, export, calibrate, build, register, validate."""


@main.group()
def data() -> None:
    """Datasets: synthesise the embedded abdomen, inspect Learn2Reg folders."""


if __name__ == "__main__":  # pragma: no cover
    main()
