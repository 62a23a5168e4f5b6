"""``pddnet calibrate`` and ``pddnet sensitivity`` (reduced precision, docs/precision.md).

Heavy imports stay inside the commands.
``pddnet export --precision fp16`` and ``pddnet validate --fp16/--int8`` live with their
commands in :mod:`pddnet.cli.model` and :mod:`pddnet.cli.validate`.
"""

from __future__ import annotations

from pathlib import Path

import click

from pddnet.cli.errors import friendly
from pddnet.cli.options import displacement_gates


def _blocks(value: str | None) -> list[str] | None:
    if value is None:
        return None
    return [v.strip() for v in value.split(",") if v.strip()]


@click.command("calibrate")
@click.option("--onnx", "onnx_model", required=True,
              type=click.Path(dir_okay=False, exists=True),
              help="The FP32 .onnx written by `pddnet export`.")
@click.option("--data", "data_dir", required=True, type=click.Path(exists=True),
              help="Learn2Reg-layout dataset (calibration pairs).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Folder for <model>.int8.onnx, ranges.json and calibration.*.")
@click.option("--method", default="minmax", show_default=True,
              type=click.Choice(["minmax", "entropy", "percentile"]),
              help="ONNX Runtime calibrator (symmetric ranges).")
@click.option("--pairs", type=click.IntRange(min=1),
              help="Calibration pairs (default 16, or every pair of a smaller split).")
@click.option("--split", default="train", show_default=True,
              type=click.Choice(["train", "val", "test"]),
              help="Split the calibration pairs come from.")
@click.option("--blocks", help="Comma-separated blocks to quantise (default conv1,conv2; "
                               "see docs/precision.md).")
@click.option("--overwrite", is_flag=True, help="Replace existing outputs.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
@friendly
def calibrate_cmd(onnx_model, data_dir, out_dir, method, pairs, split, blocks, overwrite,
                  no_progress) -> None:
    """Collect activation ranges with ONNX Runtime and write the INT8 (Q/DQ) graph.

    Writes OUT/<model>.int8.onnx (symmetric int8, zero points 0, per-channel weights: what
    TensorRT's strongly typed networks accept), OUT/ranges.json and the TensorRT execution
    provider's calibration table (calibration.flatbuffers, .cache, .json).
    """
    from pddnet.calibration.api import calibrate

    res = calibrate(onnx_model, data_dir, out_dir, method=method, pairs=pairs, split=split,
                    blocks=_blocks(blocks), overwrite=overwrite, progress=not no_progress,
                    echo=click.echo)
    q = res["qdq"]
    click.echo(f"Q/DQ: {q['quantize']} QuantizeLinear, {q['dequantize']} DequantizeLinear, "
               f"zero points {', '.join(q['zero_point_types']) or '-'} all 0; per-channel "
               f"weights {len(q['per_channel_weights'])}")
    for name, path in res["ranges"].items():
        click.echo(f"wrote {path}")

@click.command("sensitivity")
@click.option("--checkpoint", "checkpoint", required=True,
              type=click.Path(dir_okay=False, exists=True),
              help="Checkpoint written by `pddnet train` (the shipped weights: "
                   "src/pddnet/weights/*.pt).")
@click.option("--data", "data_dir", required=True, type=click.Path(exists=True),
              help="Learn2Reg-layout dataset with label maps.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Folder for the graphs, ranges and sensitivity.json/.md.")
@click.option("--precision", "precisions", default="fp16,int8", show_default=True,
              help="fp16, int8 or both.")
@click.option("--split", default="val", show_default=True,
              type=click.Choice(["train", "val", "test"]),
              help="Pairs the Dice effect is measured on (not the test split validation "
                   "reports).")
@click.option("--max-pairs", type=click.IntRange(min=1), help="Use only the first N pairs.")
@click.option("--calib-split", default="train", show_default=True,
              type=click.Choice(["train", "val", "test"]))
@click.option("--pairs", "calib_pairs", type=click.IntRange(min=1),
              help="Calibration pairs (default 16).")
@click.option("--method", default="minmax", show_default=True,
              type=click.Choice(["minmax", "entropy", "percentile"]))
@click.option("--gate-fp16", default=0.5, show_default=True, type=click.FloatRange(min=0),
              help="FP16 gate: worst-pair |delta Dice| vs FP32, points.")
@click.option("--gate-int8", default=1.0, show_default=True, type=click.FloatRange(min=0),
              help="INT8 gate: worst-pair |delta Dice| vs FP32, points.")
@displacement_gates("FP32")
@click.option("--blocks", help="Candidate blocks (default: all).")
@click.option("--threads", default=2, show_default=True, type=click.IntRange(min=1))
@click.option("--repeats", default=5, show_default=True, type=click.IntRange(min=1),
              help="Timed runs per INT8 graph.")
@click.option("--overwrite", is_flag=True)
@click.option("--no-progress", is_flag=True)
@friendly
def sensitivity_cmd(checkpoint, data_dir, out_dir, precisions, split, max_pairs, calib_split,
                    calib_pairs, method, gate_fp16, gate_int8, max_disp_p99_mm, max_disp_mm,
                    blocks, threads, repeats, overwrite, no_progress) -> None:
    """Measure each block's Dice cost in FP16 and INT8 and choose the fastest assignment
    within the gates.

    Every block alone, then the greedy combination (largest saving first, each step
    measured end to end). Writes OUT/model.onnx (FP32), OUT/model.fp16.onnx and
    OUT/model.int8.onnx (the decision in their pddnet.precision metadata), ranges and
    calibration tables, OUT/sensitivity.json and OUT/sensitivity.md.
    """
    from pddnet.calibration.api import run_search
    from pddnet.calibration.search import DispGates

    doc = run_search(checkpoint, data_dir, out_dir,
                     precisions=[p.strip() for p in precisions.split(",") if p.strip()],
                     split=split, max_pairs=max_pairs, calib_split=calib_split,
                     calib_pairs=calib_pairs, method=method,
                     gates={"fp16": gate_fp16, "int8": gate_int8}, threads=threads,
                     repeats=repeats, blocks=_blocks(blocks), overwrite=overwrite,
                     progress=not no_progress, echo=click.echo,
                     disp_gates=DispGates(max_disp_p99_mm, max_disp_mm))
    for prec, dec in doc["decisions"].items():
        click.echo(f"{prec}: {', '.join(dec['chosen']) or 'nothing'}")
    click.echo(f"wrote {Path(out_dir) / 'sensitivity.md'}")


COMMANDS = (calibrate_cmd, sensitivity_cmd,)
