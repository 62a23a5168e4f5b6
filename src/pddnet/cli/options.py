"""Options several commands share, defined once so that their names, defaults and meaning agree."""

from __future__ import annotations

from typing import Callable

import click

from pddnet.validation.compare import DEFAULT_DISP_GATES_MM


def displacement_gates(against: str, extra: str = "") -> Callable:
    """``--max-disp-p99-mm`` and ``--max-disp-mm``: the FP16/INT8 gates on ``|delta u|`` in mm
    against ``against`` (the defaults: :data:`pddnet.validation.compare.DEFAULT_DISP_GATES_MM`)."""

    def deco(f: Callable) -> Callable:
        f = click.option("--max-disp-mm", default=DEFAULT_DISP_GATES_MM["disp_diff_max_mm"],
                         show_default=True, type=click.FloatRange(min=0),
                         help=f"FP16/INT8 gate: max |delta u| vs {against}, mm, every pair.")(f)
        return click.option(
            "--max-disp-p99-mm", default=DEFAULT_DISP_GATES_MM["disp_diff_p99_mm"],
            show_default=True, type=click.FloatRange(min=0),
            help=f"FP16/INT8 gate: 99th percentile over a pair's voxels of |delta u| vs "
                 f"{against}, mm (the fixed scan's spacing), every pair{extra}.")(f)

    return deco
