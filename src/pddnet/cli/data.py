"""``pddnet data synth`` and ``pddnet data info``: the embedded synthetic abdomen, Learn2Reg folders."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from pddnet.cli.errors import friendly


@click.group("data")
def data() -> None:
    """Datasets: synthesise the embedded abdomen, inspect Learn2Reg folders."""


@data.command("synth")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path),
              help="Folder to write the Learn2Reg layout into (new or empty).")
@click.option("--subjects", default=10, show_default=True, type=click.IntRange(min=1),
              help="Number of subjects; >= 8 gives the default split (4 test, 2 validation, "
                   "the rest training), 4-7 a reduced one (2 test, 2 validation).")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0),
              help="Random seed; subject i depends only on (seed, i).")
@click.option("--preset", type=click.Choice(["small", "l2r"]), default="small",
              show_default=True,
              help="l2r: 192x160x256 at 2 mm (Learn2Reg abdomen grid); small: 96x80x128 at 4 mm.")
@click.option("--overwrite", is_flag=True,
              help="Write into a non-empty folder that is not a previous synth output.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
@click.option("--contrast", type=click.Choice(["ct", "mr"]), default="ct", show_default=True,
              help="ct: int16 HU; mr: the same subjects and labels as MR-like float32 images "
                   "(other tissue order, bias field, arbitrary scale and offset per subject).")
@friendly
def data_synth(out_dir: Path, subjects: int, seed: int, preset: str, overwrite: bool,
               no_progress: bool, contrast: str) -> None:
    """Write a synthetic abdominal CT dataset (images, 13 labels, dataset json).

    Prints the initial Dice (no registration) of every test and validation pair and the time
    per subject.
    """
    from pddnet.data.synth import write_dataset

    report = write_dataset(out_dir, subjects=subjects, seed=seed, preset=preset,
                           progress=not no_progress, overwrite=overwrite, contrast=contrast)
    click.echo(report.summary())


@data.command("info")
@click.argument("dataset", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object (counts, geometry, labels, pairs per split, "
                   "problems) instead of the text.")
@friendly
def data_info(dataset: Path, as_json: bool) -> None:
    """Describe a Learn2Reg dataset (a folder with one *_dataset.json, or the json itself).

    Prints counts, geometry, label names, pairs per split (and how many have label maps for
    both scans, imagesTs/labelsTs included) and every problem found (missing files, geometry
    mismatches); exits with status 1 when there are problems.
    """
    import json

    from pddnet._files import jsonable
    from pddnet.data.learn2reg import Learn2RegDataset

    ds = Learn2RegDataset(dataset)
    info = ds.info()
    if as_json:
        click.echo(json.dumps(jsonable(info), indent=1, allow_nan=False))
    else:
        click.echo(ds.describe(info))
    if info["problems"]:
        sys.exit(1)


COMMANDS = (data,)
