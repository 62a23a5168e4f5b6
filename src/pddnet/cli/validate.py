"""``pddnet validate`` and ``pddnet bench``: deployed forms against the PyTorch reference."""

from __future__ import annotations

import click

from pddnet.cli.errors import friendly
from pddnet.cli.options import displacement_gates
from pddnet.errors import CheckFailed


@click.command("validate")
@click.option("--checkpoint", "checkpoint", required=True, type=click.Path(dir_okay=False, exists=True),
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
@click.option("--refine", "refine_steps", default=None, type=click.IntRange(min=1),
              help="Adam steps of the refined modes (default: the method's, "
                   "docs/refinement.md).")
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
@displacement_gates("the reference")
@click.option("--overwrite", is_flag=True, help="Replace an existing report.json.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
@friendly
def validate_cmd(checkpoint, onnx_model, data_dir, split, max_pairs, out_dir, threads, gate_disp,
                 gate_dice, warmup, repeats, modes, refine_steps, gate_dice_refined, in_process,
                 figure_pairs, fp16_model, int8_model, gate_dice_fp16, gate_dice_int8,
                 max_disp_p99_mm, max_disp_mm, overwrite, no_progress) -> None:
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
                              gate_int8=gate_dice_int8, max_disp_p99_mm=max_disp_p99_mm,
                              max_disp_mm=max_disp_mm) as extra:
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
        raise CheckFailed(failure_message(report))


@click.command("bench")
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
@click.option("--checkpoint", "checkpoint", type=click.Path(dir_okay=False, exists=True),
              help="Checkpoint to time (default: the preset, randomly initialised).")
@click.option("--fixed", type=click.Path(dir_okay=False, exists=True),
              help="Fixed NIfTI (with --moving) instead of a random pair.")
@click.option("--moving", type=click.Path(dir_okay=False, exists=True))
@click.option("--gemm-size", default=2048, show_default=True, type=click.IntRange(min=0),
              help="Side of the square GEMM that measures the fp32 rate (0: skip the floor).")
@click.option("--profile-runs", default=2, show_default=True, type=click.IntRange(min=0),
              help="ONNX Runtime runs to profile per block (0: no profile).")
@click.option("--int8/--no-int8", default=True, show_default=True,
              help="Also time the runtime on the INT8 graph (the default INT8 blocks, calibrated "
                   "on the timed pair: a speed row; `pddnet validate --int8` measures accuracy).")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0))
@click.option("--out", type=click.Path(dir_okay=False), help="Write the results as JSON.")
@friendly
def bench_cmd(preset_name, shape, threads, repeats, warmup, checkpoint, fixed, moving, gemm_size,
              profile_runs, int8, seed, out) -> None:
    """Time PyTorch eager, ONNX Runtime and the runtime on one pair; FLOPs, GEMM floor,
    per-block profile.

    Each backend runs in its own child process (peak RSS per backend); ONNX Runtime is timed
    with and without enable_mem_pattern. The runtime (features in ONNX Runtime, the head in
    the C kernels where they are built) is timed per pair, for the correlation + head, and per
    further moving scan with the fixed features reused, beside the same runner with the head in
    ONNX Runtime, and on the INT8 graph.
    """

    from pddnet._files import write_json
    from pddnet.calibration.int8 import int8_for_pair
    from pddnet.validation.bench import format_bench, run_bench

    result = run_bench(preset_name, shape=tuple(shape) if shape else None, threads=threads,
                       warmup=warmup, repeats=repeats, checkpoint=checkpoint, seed=seed,
                       fixed=fixed, moving=moving, gemm_size=gemm_size,
                       profile_runs=profile_runs,
                       int8_graph=int8_for_pair if int8 else None,
                       echo=lambda s: click.echo(s, err=True))
    click.echo(format_bench(result))
    if out:
        write_json(out, result)
        click.echo(f"wrote {out}")


COMMANDS = (validate_cmd, bench_cmd)
