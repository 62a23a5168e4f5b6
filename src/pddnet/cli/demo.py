"""``pddnet demo``: the main job end to end on the embedded default data (``make demo``)."""

from __future__ import annotations

import click

from pddnet.cli.errors import friendly


@click.command("demo")
@click.option("--out", default="demo-out", show_default=True, type=click.Path(file_okay=False),
              help="Folder for every output of the demo.")
@click.option("--subjects", default=10, show_default=True, type=click.IntRange(min=8),
              help="Synthetic subjects (10: 4 test, 2 validation, 4 training; INT8 "
                   "calibration uses training pairs).")
@click.option("--calib-pairs", default=8, show_default=True, type=click.IntRange(min=1),
              help="Training pairs the INT8 calibration collects ranges on.")
@click.option("--seed", default=0, show_default=True, type=int, help="Synthetic data seed.")
@click.option("--checkpoint", "checkpoint", type=click.Path(dir_okay=False, exists=True),
              help="Checkpoint to use instead of the shipped weights.")
@click.option("--max-pairs", default=3, show_default=True, type=click.IntRange(min=1),
              help="Test pairs validated.")
@click.option("--repeats", default=5, show_default=True, type=click.IntRange(min=1),
              help="Timed runs per candidate.")
@click.option("--threads", default=2, show_default=True, type=click.IntRange(min=1))
@click.option("--in-process", is_flag=True,
              help="Time every candidate in this process (faster; peak memory not per backend).")
@click.option("--overwrite", is_flag=True, help="Empty --out first if it is not empty.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bars.")
@friendly
def demo_cmd(out, subjects, calib_pairs, seed, checkpoint, max_pairs, repeats, threads,
             in_process, overwrite, no_progress) -> None:
    """The main job end to end on the embedded synthetic abdomen (what `make demo` runs).

    Synthesise data, load the shipped weights, export, calibrate (FP16/INT8), validate every
    usable backend against the PyTorch reference (report.md/html), package a verified bundle
    and a Triton repository, register one pair from the bundle, print a summary. About 3-5
    minutes on 2 cores.
    """
    from pathlib import Path

    from pddnet.deploy.demo import DemoOptions, run_demo

    run_demo(DemoOptions(out=Path(out), subjects=subjects, seed=seed, checkpoint=checkpoint,
                         threads=threads, overwrite=overwrite, max_pairs=max_pairs,
                         repeats=repeats, isolate=not in_process, progress=not no_progress,
                         calib_pairs=calib_pairs))


COMMANDS = (demo_cmd,)
