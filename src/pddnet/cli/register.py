"""``pddnet register``: one fixed scan, one or more moving scans, torch-free (:mod:`pddnet.runtime`)."""

from __future__ import annotations

import click

from pddnet.cli.errors import friendly


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


@click.command("register", cls=_ManyValuesCommand)
@click.option("--model", type=click.Path(),
              help="The .onnx written by `pddnet export`, or a bundle (folder or .tar.gz "
                   "from `pddnet package`: verified before anything is loaded). Default: the "
                   "validated bundle shipped with pddnet (synthetic-abdomen CT weights; see "
                   "`pddnet verify` and the model card).")
@click.option("--fixed", type=click.Path(dir_okay=False),
              help="Fixed (reference) CT, NIfTI, any orientation and spacing.")
@click.option("--moving", multiple=True, type=click.Path(dir_okay=False),
              help="One or more moving CTs (--moving A B C); the fixed features are computed "
                   "once and reused.")
@click.option("--moving-labels", multiple=True, type=click.Path(dir_okay=False),
              help="Label maps of the moving scans, one per moving scan, same order.")
@click.option("--fixed-labels", type=click.Path(dir_okay=False),
              help="Label map of the fixed scan (Dice/HD95 in the summary).")
@click.option("--data", type=click.Path(),
              help="Instead of --fixed/--moving: a Learn2Reg dataset (folder or its "
                   "*_dataset.json); every pair of --split is registered into a submission "
                   "folder --out with the official file names, resuming where a previous run "
                   "stopped.")
@click.option("--split", type=click.Choice(["test", "val", "train"]), default="test",
              show_default=True, help="With --data: the json's registration_test, "
                                      "registration_val, or every training pair.")
@click.option("--names", type=click.Choice(["long", "short"]), default="long",
              show_default=True,
              help="With --data: long = disp_FFFF_0000_MMMM_0000.nii.gz (the current "
                   "evaluator, every pair); short = disp_FFFF_MMMM.nii.gz (the 2022-2024 "
                   "evaluators).")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Output folder (a subfolder per moving scan when there are several; with "
                   "--data the submission folder).")
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
@click.option("--max-voxels", type=click.IntRange(min=1), default=None,
              help="Largest scan accepted, in voxels (default 268435456 = 512x512x1024), "
                   "checked from each file's header before it is read.")
@click.option("--l2r-half", is_flag=True,
              help="Also write disp_l2r2020.npz (the Learn2Reg 2020 format: half resolution, "
                   "float16). Evaluators since 2022 read full-resolution disp_*.nii.gz: use "
                   "--data for a submission.")
@click.option("--overwrite", is_flag=True,
              help="Replace existing output files (with --data: register every pair again).")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object on stdout (outputs, metrics, timings); tables and "
                   "notes go to stderr.")
@click.option("--no-progress", is_flag=True, help="With --data: hide the progress bar.")
@click.option("--refine", default=0, show_default=True, type=click.IntRange(min=0),
              metavar="N", help="Instance optimisation (pdd+inst): N Adam steps after the "
              "network (0 = off); see --refine-method.")
@click.option("--refine-method", type=click.Choice(["features", "probs"]), default="features",
              show_default=True, help="features: fit a dense field to the two scans' features "
              "(docs/refinement.md); probs: the paper's fit to the network's probabilities "
              "(needs a model exported with --probs).")
@click.option("--refine-stages", type=click.Choice(["last", "all"]), default=None,
              help="With --stages 2 --refine: refine stage two only (last) or both stages "
              "(all). Default per method: features last, probs all (docs/refinement.md).")
@click.option("--stages", default=1, show_default=True, type=click.IntRange(1, 2),
              help="2: warp the moving scan with stage one and register it again with the "
                   "finer stage-two model (pddnet export --stage2), composing the fields.")
@click.option("--stage2-model", type=click.Path(dir_okay=False),
              help="The stage-two .onnx (default: the file the model's metadata names).")
@friendly
def register(model, fixed, moving, moving_labels, fixed_labels, data, split, names, out, threads,
             backend, precision, providers, spacing_tolerance, max_voxels, l2r_half, overwrite,
             as_json, no_progress, refine, refine_method, refine_stages, stages,
             stage2_model) -> None:
    """Register moving CT scan(s) to a fixed one with an exported model (no torch needed).

    Writes disp.nii.gz (voxels of the fixed grid, warped(x) = moving(x + u(x))), disp.npz
    (the same array alone), disp_itk.nii.gz (the field for ITK, ANTs and 3D Slicer; see
    `pddnet apply`), warped.nii.gz, warped_labels.nii.gz (with --moving-labels) and
    summary.json, and prints
    per-stage times and Dice. The output folder is written as one transaction: it holds the
    previous result until the new one is complete, whatever interrupts the run.

    With --data DIR: every pair of a Learn2Reg split, into a submission folder of
    disp_FFFF_0000_MMMM_0000.nii.gz files plus log.jsonl (one line per pair); metrics as the
    official Learn2Reg evaluation computes them (labels warped with zeros outside the grid).
    """
    import json
    from functools import partial

    from pddnet._files import jsonable
    from pddnet.cli.output import note, say
    from pddnet.data.io import DEFAULT_MAX_VOXELS
    from pddnet.errors import PddnetError
    from pddnet.runtime.batch import register_dataset, register_files
    from pddnet.spec.refine import RefineOptions

    # results on stdout (on stderr when stdout carries the JSON); notes on stderr, hidden by -q
    echo = partial(click.echo, err=True) if as_json else say
    if model is None:
        from pddnet.weights import shipped_bundle

        model = shipped_bundle()
        note(f"note: no --model given: the bundle shipped with pddnet ({model.name}; weights "
             "trained on synthetic abdominal CT, see the model card)")

    def notes(msg: str) -> None:
        note(f"note: {msg}")

    provider_list = [p for p in providers.split(",") if p.strip()] if providers else None
    refine = RefineOptions(steps=refine, method=refine_method,
                           stages_refined=refine_stages) if refine else None
    if data is not None:
        given = [n for n, v in (("--fixed", fixed), ("--moving", moving),
                                ("--moving-labels", moving_labels),
                                ("--fixed-labels", fixed_labels), ("--l2r-half", l2r_half)) if v]
        if given:
            raise PddnetError(f"--data registers the dataset's own pairs; drop {', '.join(given)} "
                              "(--l2r-half: the 2020 half-resolution files would shadow the "
                              "full-resolution ones, the evaluator reads .npz first)")
        result = register_dataset(model, data, out=out, split=split, names=names,
                                  threads=threads, backend=backend, providers=provider_list,
                                  precision=precision, overwrite=overwrite,
                                  spacing_tolerance=spacing_tolerance, echo=echo, note=notes,
                                  progress=not no_progress, refine=refine, stages=stages,
                                  stage2_model=stage2_model,
                                  max_voxels=max_voxels or DEFAULT_MAX_VOXELS)
        echo(format_dataset(result))
        if as_json:
            click.echo(json.dumps(jsonable(result), allow_nan=False))
        return
    if not fixed or not moving:
        raise PddnetError("give --fixed and --moving (one or more scans), or --data DIR for a "
                          "whole Learn2Reg dataset")
    items = register_files(model, fixed, list(moving), out=out,
                           moving_labels=list(moving_labels), fixed_labels=fixed_labels,
                           threads=threads, backend=backend, providers=provider_list,
                           precision=precision, overwrite=overwrite,
                           spacing_tolerance=spacing_tolerance, l2r_half=l2r_half, echo=echo,
                           note=notes, refine=refine, stages=stages,
                           stage2_model=stage2_model,
                           max_voxels=max_voxels or DEFAULT_MAX_VOXELS)
    if as_json:
        click.echo(json.dumps(jsonable(_items_json(items)), allow_nan=False))


def _items_json(items) -> dict:
    """``register --json`` for --fixed/--moving: per moving scan its folder, files, metrics and
    timings (the notes went to stderr and are in each summary.json)."""
    from pddnet.runtime.outputs import SUMMARY

    results = []
    for it in items:
        res = it.result
        files = sorted(p.name for p in it.out_dir.iterdir() if p.is_file()) \
            if it.out_dir.is_dir() else []
        results.append({
            "moving": str(it.moving), "out": str(it.out_dir),
            "outputs": {n: str(it.out_dir / n) for n in files},
            "summary": str(it.out_dir / SUMMARY),
            "metrics": res.metrics,
            "timings_ms": {k: (None if v is None else round(v, 3))
                           for k, v in res.timings_ms.items()},
            "reuse": res.reuse,
        })
    return {"results": results}


def format_dataset(result: dict) -> str:
    """The end-of-run summary of ``register --data``: counts, the official aggregates."""
    lines = [f"{result['split']} split: {len(result['pairs'])} pairs, {result['registered']} "
             f"registered, {result['skipped']} already done -> {result['out']} "
             f"({result['names']} names; log.jsonl has one line per pair)"]
    agg = result["aggregates"]

    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    for key, label, fmt in (("dice", "Dice", ".4f"), ("hd95", "HD95 (voxels)", ".3f"),
                            ("sdlogj", "SDlogJ (+3 offset, official)", ".4f")):
        if key in agg:
            a = agg[key]
            lines.append(f"{label}: mean {f(a['mean'], fmt)} +- {f(a['std'], fmt)}, "
                         f"'30' {f(a['30'], fmt)} over {a['cases']} pairs")
    if "folding_percent" in agg:
        lines.append(f"folding (J <= 0, no offset): {agg['folding_percent']['mean']:.4f} % of "
                     "voxels on average")
    if "dice" not in agg:
        lines.append("no Dice/HD95: the pairs have no label maps for both scans")
    return "\n".join(lines)


COMMANDS = (register,)
