"""``pddnet train``, ``pddnet evaluate`` and ``pddnet export``: the PyTorch side (needs torch)."""

from __future__ import annotations

import click

from pddnet.cli.errors import friendly
from pddnet.errors import PddnetError


@click.command("train")
@click.option("--data", "data_dir", required=True, type=click.Path(file_okay=False, exists=True),
              help="Learn2Reg-layout dataset (e.g. from `pddnet data synth`).")
@click.option("--preset", "preset_name", default="small", show_default=True,
              type=click.Choice(["small", "paper", "tiny"]), help="Model configuration.")
@click.option("--iterations", default=1500, show_default=True, type=click.IntRange(min=1))
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Checkpoint to write.")
@click.option("--init", "init", type=click.Path(dir_okay=False, exists=True),
              help="Start from a checkpoint's weights (fine-tuning; the grid, capture range and "
                   "displacement count may differ).")
@click.option("--grid", type=click.IntRange(min=2), help="Override the preset's control grid (G per axis).")
@click.option("--resume", type=click.Path(dir_okay=False, exists=True),
              help="Continue from a checkpoint written by `pddnet train`.")
@click.option("--lr", default=0.01, show_default=True, type=float, help="Adam learning rate.")
@click.option("--diffusion-weight", default=1.5, show_default=True, type=float,
              help="Weight of the diffusion penalty (the paper: 1.5).")
@click.option("--label-resolution", type=click.Choice(["half", "full"]), default="half",
              show_default=True, help="Moving labels sampled at the displacements at full "
                                      "resolution (the authors) or average-pooled 2x.")
@click.option("--class-reduction", type=click.Choice(["sum", "mean"]), default="sum",
              show_default=True, help="Label loss summed or averaged (the authors) over classes.")
@click.option("--background-weight", type=click.FloatRange(min=0),
              help="Class weight of the background (the authors: 0.15; default: its frequency "
                   "weight like every class).")
@click.option("--minconv", type=click.Choice(["approx", "exact"]),
              help="Override the preset's min-convolution.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--no-augment", is_flag=True, help="Disable the random affine augmentation.")
@click.option("--checkpoint-every", default=100, show_default=True, type=click.IntRange(min=1))
@click.option("--threads", type=click.IntRange(min=1), help="torch intra-op threads.")
@click.option("--device", default="cpu", show_default=True,
              help="torch device to train on ('cuda' with a CUDA build of torch and a GPU).")
@click.option("--intensity", "intensity_mode", type=click.Choice(["ct", "mr"]), default="ct",
              show_default=True,
              help="Intensity normalisation, part of the model: ct = the HU window; mr = z-score "
                   "within the foreground (MR or any image without an absolute scale).")
@friendly
def train_cmd(data_dir, preset_name, iterations, out, init, grid, resume, lr, diffusion_weight,
              label_resolution, class_reduction, background_weight, minconv, seed, no_augment,
              checkpoint_every, threads, device, intensity_mode) -> None:
    """Train PDD-Net (non-local label loss + diffusion penalty) and write a checkpoint."""
    from pddnet.model.train import TrainOptions, load_training_subjects, train
    from pddnet.spec.config import Intensity, preset

    subjects, meta = load_training_subjects(data_dir)
    overrides = {"minconv": minconv} if minconv else {}
    if grid:
        overrides["grid"] = (grid, grid, grid)
    if intensity_mode != "ct":
        overrides["intensity"] = Intensity(mode=intensity_mode)
    cfg = preset(preset_name, **overrides)
    opts = TrainOptions(iterations=iterations, lr=lr, diffusion_weight=diffusion_weight,
                        seed=seed, augment=not no_augment, checkpoint_every=checkpoint_every,
                        threads=threads, device=device,
                        label_pool=1 if label_resolution == "full" else 2,
                        class_reduction=class_reduction, background_weight=background_weight)
    click.echo(f"training preset {preset_name!r} on {len(subjects)} subjects "
               f"({meta['image_shape']} @ {meta['spacing_mm']} mm), {iterations} iterations")
    state = train(subjects, cfg, out, opts, resume=resume, init=init,
                  metadata={**meta, "preset": preset_name})
    last = state.history[-1]
    click.echo(f"wrote {out} (iteration {state.iteration}, loss {last[1]:.5f})")


@click.command("evaluate")
@click.option("--checkpoint", "checkpoint", required=True, type=click.Path(dir_okay=False, exists=True),
              help="Checkpoint written by `pddnet train`.")
@click.option("--data", "data_dir", required=True, type=click.Path(file_okay=False, exists=True))
@click.option("--split", default="test", show_default=True,
              type=click.Choice(["train", "val", "test"]))
@click.option("--out", type=click.Path(dir_okay=False),
              help="JSON file for the table (default: evaluate_<split>.json beside the model).")
@click.option("--max-pairs", type=click.IntRange(min=1), help="Evaluate only the first N pairs.")
@click.option("--threads", type=click.IntRange(min=1), help="torch intra-op threads.")
@click.option("--modes", default="ff", show_default=True,
              help="Comma-separated registration modes, reported side by side: ff (network), "
                   "inst (+ instance optimisation), 2stage (two warps), 2stage+inst.")
@click.option("--refine", "refine_steps", default=50, show_default=True,
              type=click.IntRange(min=0), help="Adam steps of the instance optimisation in "
                                               "the refined modes.")
@friendly
def evaluate_cmd(checkpoint, data_dir, split, out, max_pairs, threads, modes,
                 refine_steps) -> None:
    """Register a split's pairs with the PyTorch reference and print Dice, HD95, SDlogJ, folding.

    With several --modes the table compares feed-forward, refined and two-stage registration
    (mean Dice, HD95, SDlogJ, folding and milliseconds per stage)."""
    from pathlib import Path

    from pddnet._files import write_json
    from pddnet.spec.refine import RefineOptions
    from pddnet.validation.evaluate import evaluate_checkpoint, format_table

    result = evaluate_checkpoint(checkpoint, data_dir, split=split, max_pairs=max_pairs,
                                 threads=threads, modes=modes,
                                 refine=RefineOptions(steps=refine_steps))
    click.echo(format_table(result))
    path = Path(out) if out else Path(checkpoint).with_name(f"evaluate_{split}.json")
    write_json(path, result)
    click.echo(f"wrote {path}")


@click.command("export")
@click.argument("checkpoint", type=click.Path(dir_okay=False, exists=True))
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="The .onnx to write.")
@click.option("--shape", nargs=3, type=click.IntRange(min=6),
              help="Input grid I J K (default: the shape the checkpoint was trained at).")
@click.option("--probs", is_flag=True, help="Also output the displacement probabilities.")
@click.option("--entropy", is_flag=True, help="Also output the per-control-point entropy.")
@click.option("--stage2", is_flag=True,
              help="Also write the stage-two model (finer grid, smaller capture range, same "
                   "weights) as <out stem>.stage2.onnx, linked from OUT's metadata, for "
                   "`pddnet register --stages 2`.")
@click.option("--stage2-grid", nargs=3, type=click.IntRange(min=2),
              help="Stage-two control grid (default: 1.5 x the checkpoint's grid).")
@click.option("--stage2-capture", type=click.FloatRange(0, 1, min_open=True),
              help="Stage-two capture range, normalised (default: half the checkpoint's).")
@click.option("--precision", default="fp32", show_default=True,
              type=click.Choice(["fp32", "fp16"]),
              help="fp16: float16 tensors except the --keep-fp32 blocks (INT8: pddnet "
                   "calibrate); inputs and outputs stay float32. docs/precision.md")
@click.option("--keep-fp32", help="With --precision fp16: comma-separated blocks, node names or "
                                  "op types kept in FP32 (default: none).")
@click.option("--overwrite", is_flag=True, help="Replace an existing file.")
@friendly
def export_cmd(checkpoint, out, shape, probs, entropy, stage2, stage2_grid, stage2_capture,
               precision, keep_fp32, overwrite) -> None:
    """Export a checkpoint to ONNX with the ai.pddnet custom ops as local functions."""
    from pddnet.export.onnx_export import export_checkpoint
    from pddnet.spec.refine import stage2_path

    outputs = tuple(n for n, on in (("probs", probs), ("entropy", entropy)) if on)
    if (stage2_grid or stage2_capture) and not stage2:
        raise PddnetError("--stage2-grid/--stage2-capture need --stage2")
    second: bool | dict = bool(stage2)
    if stage2 and (stage2_grid or stage2_capture):
        from pddnet.model.checkpoint import read_checkpoint
        from pddnet.spec.refine import stage2_overrides

        second = stage2_overrides(read_checkpoint(checkpoint)["config"])
        if stage2_grid:
            second["grid"] = list(stage2_grid)
        if stage2_capture:
            second["capture"] = float(stage2_capture)
    if keep_fp32 and precision != "fp16":
        raise PddnetError("--keep-fp32 needs --precision fp16")
    if precision == "fp16":
        from pddnet.calibration.api import export_fp16

        path, kept = export_fp16(checkpoint, out, image_shape=tuple(shape) if shape else None,
                                 outputs=outputs, overwrite=overwrite, stage2=second,
                                 keep_fp32=keep_fp32.split(",") if keep_fp32 else None)
        click.echo(f"FP16 graph; kept in FP32: {', '.join(kept) or 'none'}")
    else:
        path = export_checkpoint(checkpoint, out, image_shape=tuple(shape) if shape else None,
                                 outputs=outputs, overwrite=overwrite, stage2=second)
    click.echo(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    if stage2:
        s2 = stage2_path(path)
        click.echo(f"wrote {s2} ({s2.stat().st_size / 1e6:.1f} MB, stage two)")


COMMANDS = (train_cmd, evaluate_cmd, export_cmd)
