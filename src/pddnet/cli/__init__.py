"""The ``pddnet`` command line: a thin click group; each command calls one library function.

Heavy imports (torch, onnxruntime, tensorrt) happen inside the command functions so that
``pddnet --help`` and the runtime commands work without them.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from pddnet.cli.errors import friendly
from pddnet.errors import PddnetError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="pddnet")
def main() -> None:
    """PDD-Net deformable registration: train, export, calibrate, build, register, validate."""


@main.group()
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
@friendly
def data_synth(out_dir: Path, subjects: int, seed: int, preset: str, overwrite: bool,
               no_progress: bool) -> None:
    """Write a synthetic abdominal CT dataset (images, 13 labels, dataset json).

    Prints the initial Dice (no registration) of every test and validation pair and the time
    per subject.
    """
    from pddnet.data.synth import write_dataset

    report = write_dataset(out_dir, subjects=subjects, seed=seed, preset=preset,
                           progress=not no_progress, overwrite=overwrite)
    click.echo(report.summary())


@data.command("info")
@click.argument("dataset", type=click.Path(path_type=Path))
@friendly
def data_info(dataset: Path) -> None:
    """Describe a Learn2Reg dataset (a folder with one *_dataset.json, or the json itself).

    Prints counts, geometry, label names, pairs per split and every problem found (missing
    files, geometry mismatches); exits with status 1 when there are problems.
    """
    from pddnet.data.learn2reg import Learn2RegDataset

    ds = Learn2RegDataset(dataset)
    click.echo(ds.describe())
    if ds.problems():
        sys.exit(1)


# --------------------------------------------------------------------------------------------
# register (pddnet.runtime; torch-free)
# --------------------------------------------------------------------------------------------
class _ManyValuesCommand(click.Command):
    """Lets ``--moving A B C`` stand for ``--moving A --moving B --moving C``."""

    many = ("--moving", "--moving-labels")

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        out: list[str] = []
        i = 0
        while i < len(args):
            a = args[i]
            if a == "--":
                out += args[i:]
                break
            if a in self.many:
                j = i + 1
                while j < len(args) and not args[j].startswith("-"):
                    out += [a, args[j]]
                    j += 1
                if j == i + 1:
                    out.append(a)
                i = j
                continue
            out.append(a)
            i += 1
        return super().parse_args(ctx, out)


@main.command("register", cls=_ManyValuesCommand)
@click.option("--model", required=True, type=click.Path(),
              help="The .onnx written by `pddnet export`, or a bundle (folder or .tar.gz "
                   "from `pddnet package`: verified before anything is loaded).")
@click.option("--fixed", required=True, type=click.Path(dir_okay=False),
              help="Fixed (reference) CT, NIfTI, any orientation and spacing.")
@click.option("--moving", required=True, multiple=True, type=click.Path(dir_okay=False),
              help="One or more moving CTs (--moving A B C); the fixed features are computed "
                   "once and reused.")
@click.option("--moving-labels", multiple=True, type=click.Path(dir_okay=False),
              help="Label maps of the moving scans, one per moving scan, same order.")
@click.option("--fixed-labels", type=click.Path(dir_okay=False),
              help="Label map of the fixed scan (Dice/HD95 in the summary).")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Output folder (a subfolder per moving scan when there are several).")
@click.option("--threads", type=click.IntRange(min=1), help="Backend intra-op threads.")
@click.option("--backend", default="auto", show_default=True,
              help="Inference backend: onnxruntime, tensorrt, ...; auto is onnxruntime for a "
                   "model and the bundle's choice for a bundle.")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8"]),
              help="Bundle only: run its model of this precision instead of the automatic "
                   "choice.")
@click.option("--providers",
              help="ONNX Runtime execution providers, comma-separated: cpu, cuda, tensorrt "
                   "(default: cpu; for a bundle, cuda when onnxruntime-gpu sees a GPU).")
@click.option("--spacing-tolerance", default=0.3, show_default=True, type=click.FloatRange(min=0,
              min_open=True), help="Allowed relative difference from the model's training "
                                   "spacing, per axis.")
@click.option("--l2r-half", is_flag=True,
              help="Also write disp_l2r2020.npz (Learn2Reg 2020: half resolution, float16).")
@click.option("--overwrite", is_flag=True, help="Replace existing output files.")
@click.option("--refine", default=0, show_default=True, type=click.IntRange(min=0),
              metavar="N", help="Instance optimisation (pdd+inst): N Adam steps on the "
              "network's probabilities (50 as in the paper's code; 0 = off). Needs a model "
              "exported with --probs.")
@click.option("--stages", default=1, show_default=True, type=click.IntRange(1, 2),
              help="2: warp the moving scan with stage one and register it again with the "
                   "finer stage-two model (pddnet export --stage2), composing the fields.")
@click.option("--stage2-model", type=click.Path(dir_okay=False),
              help="The stage-two .onnx (default: the file the model's metadata names).")
@friendly
def register(model, fixed, moving, moving_labels, fixed_labels, out, threads, backend, precision,
             providers, spacing_tolerance, l2r_half, overwrite, refine, stages,
             stage2_model) -> None:
    """Register moving CT scan(s) to a fixed one with an exported model (no torch needed).

    Writes disp.nii.gz (voxels of the fixed grid, warped(x) = moving(x + u(x))), disp.npz,
    warped.nii.gz, warped_labels.nii.gz (with --moving-labels) and summary.json, and prints
    per-stage times and Dice.
    """
    from pddnet.runtime.batch import register_files

    register_files(model, fixed, list(moving), out=out, moving_labels=list(moving_labels),
                   fixed_labels=fixed_labels, threads=threads, backend=backend,
                   providers=[p for p in providers.split(",") if p.strip()] if providers
                   else None, precision=precision, overwrite=overwrite,
                   spacing_tolerance=spacing_tolerance, l2r_half=l2r_half,
                   echo=click.echo, refine=refine or None, stages=stages,
                   stage2_model=stage2_model)


# --------------------------------------------------------------------------------------------
# train / evaluate / export (PyTorch side)
# --------------------------------------------------------------------------------------------
@main.command("train")
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
@click.option("--minconv", type=click.Choice(["approx", "exact"]),
              help="Override the preset's min-convolution.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--no-augment", is_flag=True, help="Disable the random affine augmentation.")
@click.option("--checkpoint-every", default=100, show_default=True, type=click.IntRange(min=1))
@click.option("--threads", type=click.IntRange(min=1), help="torch intra-op threads.")
@click.option("--device", default="cpu", show_default=True,
              help="torch device to train on ('cuda' with a CUDA build of torch and a GPU).")
@friendly
def train_cmd(data_dir, preset_name, iterations, out, init, grid, resume, lr, diffusion_weight,
              minconv, seed, no_augment, checkpoint_every, threads, device) -> None:
    """Train PDD-Net (non-local label loss + diffusion penalty) and write a checkpoint."""
    from pddnet.spec.config import preset
    from pddnet.model.train import TrainOptions, load_training_subjects, train

    subjects, meta = load_training_subjects(data_dir)
    overrides = {"minconv": minconv} if minconv else {}
    if grid:
        overrides["grid"] = (grid, grid, grid)
    cfg = preset(preset_name, **overrides)
    opts = TrainOptions(iterations=iterations, lr=lr, diffusion_weight=diffusion_weight,
                        seed=seed, augment=not no_augment, checkpoint_every=checkpoint_every,
                        threads=threads, device=device)
    click.echo(f"training preset {preset_name!r} on {len(subjects)} subjects "
               f"({meta['image_shape']} @ {meta['spacing_mm']} mm), {iterations} iterations")
    state = train(subjects, cfg, out, opts, resume=resume, init=init,
                  metadata={**meta, "preset": preset_name})
    last = state.history[-1]
    click.echo(f"wrote {out} (iteration {state.iteration}, loss {last[1]:.5f})")


@main.command("evaluate")
@click.option("--model", "checkpoint", required=True, type=click.Path(dir_okay=False, exists=True),
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

    from pddnet.spec.refine import RefineOptions
    from pddnet._files import write_json
    from pddnet.validation.evaluate import evaluate_checkpoint, format_table

    result = evaluate_checkpoint(checkpoint, data_dir, split=split, max_pairs=max_pairs,
                                 threads=threads, modes=modes,
                                 refine=RefineOptions(steps=refine_steps))
    click.echo(format_table(result))
    path = Path(out) if out else Path(checkpoint).with_name(f"evaluate_{split}.json")
    write_json(path, result)
    click.echo(f"wrote {path}")


@main.command("export")
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


# --------------------------------------------------------------------------------------------
# validate / bench (pddnet.validation)
# --------------------------------------------------------------------------------------------
@main.command("validate")
@click.option("--model", "checkpoint", required=True, type=click.Path(dir_okay=False, exists=True),
              help="Checkpoint written by `pddnet train` (the PyTorch reference).")
@click.option("--onnx", "onnx_model", required=True, type=click.Path(dir_okay=False, exists=True),
              help="The .onnx exported from it (`pddnet export`).")
@click.option("--data", "data_dir", required=True, type=click.Path(exists=True),
              help="Learn2Reg-layout dataset with label maps.")
@click.option("--split", default="test", show_default=True,
              type=click.Choice(["train", "val", "test"]))
@click.option("--max-pairs", type=click.IntRange(min=1), help="Use only the first N pairs.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Report folder (report.json).")
@click.option("--threads", type=click.IntRange(min=1),
              help="Intra-op threads of every backend (torch.set_num_threads, ORT intra_op).")
@click.option("--gate-disp", default=0.05, show_default=True, type=click.FloatRange(min=0),
              help="ONNX Runtime FP32 gate: max |delta disp| vs the reference, voxels at full "
                   "resolution, per pair.")
@click.option("--gate-dice", default=0.1, show_default=True, type=click.FloatRange(min=0),
              help="ONNX Runtime FP32 gate: |delta mean Dice| vs the reference, points, per pair.")
@click.option("--warmup", default=2, show_default=True, type=click.IntRange(min=0),
              help="Untimed model runs before the latency runs.")
@click.option("--repeats", default=10, show_default=True, type=click.IntRange(min=1),
              help="Timed model runs per backend.")
@click.option("--modes", default="ff", show_default=True,
              help="Registration modes, comma-separated: ff (network), inst (+ instance "
                   "optimisation), 2stage, 2stage+inst. Each mode beyond ff adds the reference "
                   "and ONNX Runtime in that mode (the model needs --probs / --stage2 at "
                   "export); a table shows the modes side by side with their stage times.")
@click.option("--refine", "refine_steps", default=50, show_default=True,
              type=click.IntRange(min=1), help="Adam steps of the refined modes.")
@click.option("--gate-dice-refined", default=0.5, show_default=True,
              type=click.FloatRange(min=0),
              help="Refined modes: |delta mean Dice| of ONNX Runtime vs the reference in the same "
                   "mode, points, per pair (no displacement gate: docs/refinement.md).")
@click.option("--in-process", is_flag=True,
              help="Measure latency/memory in this process instead of one child per backend "
                   "(faster; peak memory is then not per backend).")
@click.option("--figure-pairs", default=2, show_default=True, type=click.IntRange(min=0),
              help="Pairs drawn in report.md/html (slices, |u|, det J, uncertainty; 0: none).")
@click.option("--fp16", "fp16_model", type=click.Path(dir_okay=False, exists=True),
              help="Also validate this FP16 graph (and its float16-storage emulation).")
@click.option("--int8", "int8_model", type=click.Path(dir_okay=False, exists=True),
              help="Also validate this INT8 (Q/DQ) graph.")
@click.option("--gate-dice-fp16", default=0.5, show_default=True, type=click.FloatRange(min=0),
              help="FP16 gate: |delta mean Dice| vs the reference, points, per pair.")
@click.option("--gate-dice-int8", default=1.0, show_default=True, type=click.FloatRange(min=0),
              help="INT8 gate: |delta mean Dice| vs the reference, points, per pair.")
@click.option("--overwrite", is_flag=True, help="Replace an existing report.json.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
@friendly
def validate_cmd(checkpoint, onnx_model, data_dir, split, max_pairs, out_dir, threads, gate_disp,
                 gate_dice, warmup, repeats, modes, refine_steps, gate_dice_refined, in_process,
                 figure_pairs, fp16_model, int8_model, gate_dice_fp16, gate_dice_int8, overwrite,
                 no_progress) -> None:
    """Validate every deployed form against the PyTorch reference on a dataset split.

    Runs the checkpoint (torch backend) and the ONNX model (ONNX Runtime) through the same
    pre- and post-processing, reports Dice, HD95, SDlogJ, folding, the displacement and Dice
    differences vs the reference, latency (p50/p95/p99) and peak memory, writes
    OUT/report.json with its renderings OUT/report.md and OUT/report.html (figures embedded)
    and exits with status 1 when a gate fails (2 on errors).
    """
    from pddnet.validation.compare import compare, default_candidates, mode_candidates
    from pddnet.validation.render import FigureCollector, write_report_files
    from pddnet.validation.report import check_out_dir, failure_message, format_table

    check_out_dir(out_dir, overwrite=overwrite)
    ref, cands = default_candidates(checkpoint, onnx_model, gate_disp=gate_disp,
                                    gate_dice=gate_dice)
    cands += mode_candidates(checkpoint, onnx_model, modes, refine_steps=refine_steps,
                             gate_disp=gate_disp, gate_dice=gate_dice,
                             gate_dice_refined=gate_dice_refined)
    from pddnet.calibration.validate import annotate_report, precision_candidates

    with precision_candidates(fp16=fp16_model, int8=int8_model, gate_fp16=gate_dice_fp16,
                              gate_int8=gate_dice_int8) as extra:
        cands += extra
        figures = FigureCollector(figure_pairs, ref.name)
        report = compare(ref, cands, data_dir, split=split, max_pairs=max_pairs, threads=threads,
                         warmup=warmup, repeats=repeats, isolate=not in_process,
                         progress=not no_progress, echo=click.echo, observe=figures)
        annotate_report(report, extra)
    click.echo(format_table(report))
    paths = write_report_files(report, out_dir, figures=figures, overwrite=overwrite)
    click.echo(f"wrote {paths['report.json']}, {paths['report.md']}, {paths['report.html']}")
    if report["status"] != "passed":
        click.echo(f"error: {failure_message(report)}", err=True)
        sys.exit(1)


@main.command("bench")
@click.option("--preset", "preset_name", required=True,
              type=click.Choice(["small", "paper", "tiny"]),
              help="Configuration and default shape (paper: 192x160x256, the Learn2Reg grid; "
                   "tiny is for tests).")
@click.option("--shape", nargs=3, type=click.IntRange(min=6), help="Input grid I J K.")
@click.option("--threads", default=2, show_default=True, type=click.IntRange(min=1),
              help="torch.set_num_threads / ORT intra_op_num_threads (and the GEMM's).")
@click.option("--repeats", default=5, show_default=True, type=click.IntRange(min=1),
              help="Timed runs per backend.")
@click.option("--warmup", default=1, show_default=True, type=click.IntRange(min=0),
              help="Untimed runs before them.")
@click.option("--model", "checkpoint", type=click.Path(dir_okay=False, exists=True),
              help="Checkpoint to time (default: the preset, randomly initialised).")
@click.option("--fixed", type=click.Path(dir_okay=False, exists=True),
              help="Fixed NIfTI (with --moving) instead of a random pair.")
@click.option("--moving", type=click.Path(dir_okay=False, exists=True))
@click.option("--gemm-size", default=2048, show_default=True, type=click.IntRange(min=0),
              help="Side of the square GEMM that measures the fp32 rate (0: skip the floor).")
@click.option("--profile-runs", default=2, show_default=True, type=click.IntRange(min=0),
              help="ONNX Runtime runs to profile per block (0: no profile).")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0))
@click.option("--out", type=click.Path(dir_okay=False), help="Write the results as JSON.")
@friendly
def bench_cmd(preset_name, shape, threads, repeats, warmup, checkpoint, fixed, moving, gemm_size,
              profile_runs, seed, out) -> None:
    """Time PyTorch eager and ONNX Runtime on one pair; FLOPs, GEMM floor, per-block profile.

    Each backend runs in its own child process (peak RSS per backend); ONNX Runtime is timed
    with and without enable_mem_pattern.
    """
    import json

    from pddnet._files import atomic_write
    from pddnet.validation.bench import format_bench, run_bench
    from pddnet._files import jsonable

    result = run_bench(preset_name, shape=tuple(shape) if shape else None, threads=threads,
                       warmup=warmup, repeats=repeats, checkpoint=checkpoint, seed=seed,
                       fixed=fixed, moving=moving, gemm_size=gemm_size,
                       profile_runs=profile_runs, echo=lambda s: click.echo(s, err=True))
    click.echo(format_bench(result))
    if out:
        with atomic_write(out) as tmp:
            Path(tmp).write_text(json.dumps(jsonable(result), indent=2) + "\n")
        click.echo(f"wrote {out}")


# TensorRT: check-trt, build, doctor (pddnet.cli.trt)
from pddnet.cli.trt import add_commands as _add_trt_commands  # noqa: E402

_add_trt_commands(main)

# Reduced precision: calibrate, sensitivity (pddnet.cli.precision)
from pddnet.cli.precision import add_commands as _add_precision_commands  # noqa: E402

_add_precision_commands(main)

# Deployment: package, verify (pddnet.cli.deploy)
from pddnet.cli.deploy import add_commands as _add_deploy_commands  # noqa: E402

_add_deploy_commands(main)


@main.command("demo")
@click.option("--out", default="demo-out", show_default=True, type=click.Path(file_okay=False),
              help="Folder for every output of the demo.")
@click.option("--subjects", default=10, show_default=True, type=click.IntRange(min=8),
              help="Synthetic subjects (10: 4 test, 2 validation, 4 training; INT8 "
                   "calibration uses training pairs).")
@click.option("--calib-pairs", default=8, show_default=True, type=click.IntRange(min=1),
              help="Training pairs the INT8 calibration collects ranges on.")
@click.option("--seed", default=0, show_default=True, type=int, help="Synthetic data seed.")
@click.option("--model", "checkpoint", type=click.Path(dir_okay=False, exists=True),
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


if __name__ == "__main__":  # pragma: no cover
    main()
