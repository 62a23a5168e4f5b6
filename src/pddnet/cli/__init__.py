"""The ``pddnet`` command line: a thin click group; each command calls one library function.

One module per command group, each listing its click commands in ``COMMANDS``:
:mod:`~pddnet.cli.data` (data synth/info), :mod:`~pddnet.cli.register` (register),
:mod:`~pddnet.cli.apply` (apply a displacement field),
:mod:`~pddnet.cli.model` (train, evaluate, export), :mod:`~pddnet.cli.precision` (calibrate,
sensitivity), :mod:`~pddnet.cli.validate` (validate, bench), :mod:`~pddnet.cli.trt` (check-trt,
build, doctor), :mod:`~pddnet.cli.deploy` (package, verify), :mod:`~pddnet.cli.demo` (demo).
:mod:`~pddnet.cli.errors` turns a :class:`~pddnet.errors.PddnetError` into one line and exit 2.

Heavy imports (torch, onnxruntime, tensorrt) happen inside the command functions so that
``pddnet --help`` and the runtime commands work without them. An option name means one thing
everywhere: ``--checkpoint`` a PyTorch checkpoint, ``--model`` an exported ``.onnx`` or a
deployment bundle, ``--onnx`` an exported ``.onnx``.
"""

from __future__ import annotations

import os

import click

from pddnet.cli import apply, data, demo, deploy, model, precision, register, trt, validate
from pddnet.cli.errors import install_signal_handlers
from pddnet.cli.output import NORMAL, QUIET, VERBOSE, set_verbosity


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="pddnet")
@click.option("-v", "--verbose", is_flag=True, help="More detail on stderr (backends, per-stage "
              "timings).")
@click.option("-q", "--quiet", is_flag=True, help="Only results and errors: no notes, no progress "
              "bars.")
@click.option("--debug", is_flag=True, help="Show the full traceback of an error (also: "
              "PDDNET_DEBUG=1).")
def main(verbose: bool, quiet: bool, debug: bool) -> None:
    """PDD-Net deformable registration: train, export, calibrate, build, register, validate.

    Results go to stdout; notes, details (-v) and progress bars to stderr (-q hides them).

    Exit status: 0 success, 1 a check failed, 2 bad input or environment, 3 internal error,
    130/143/129 interrupted (SIGINT/SIGTERM/SIGHUP; outputs are left as they were).
    """
    if verbose and quiet:
        raise click.UsageError("-v and -q contradict each other; pass one of them")
    set_verbosity(VERBOSE if verbose else QUIET if quiet else NORMAL)
    if debug:
        os.environ["PDDNET_DEBUG"] = "1"
    install_signal_handlers()


for _module in (data, register, apply, model, precision, validate, trt, deploy, demo):
    for _command in _module.COMMANDS:
        main.add_command(_command)


if __name__ == "__main__":  # pragma: no cover
    main()
