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
@click.option("--max-voxels", type=click.IntRange(min=1), default=None,
              help="Largest scan accepted, in voxels (default 268435456 = 512x512x1024), "
                   "checked from each file's header before it is read.")
@click.option("--l2r-half", is_flag=True,
              help="Also write disp_l2r2020.npz (Learn2Reg 2020: half resolution, float16).")
@click.option("--overwrite", is_flag=True, help="Replace existing output files.")
@click.option("--refine", default=0, show_default=True, type=click.IntRange(min=0),
              metavar="N", help="Instance optimisation (pdd+inst): N Adam steps after the "
              "network (0 = off); see --refine-method.")
@click.option("--refine-method", type=click.Choice(["features", "probs"]), default="features",
              show_default=True, help="features: fit a dense field to the two scans' features "
              "(docs/refinement.md); probs: the paper's fit to the network's probabilities "
              "(needs a model exported with --probs).")
@click.option("--stages", default=1, show_default=True, type=click.IntRange(1, 2),
              help="2: warp the moving scan with stage one and register it again with the "
                   "finer stage-two model (pddnet export --stage2), composing the fields.")
@click.option("--stage2-model", type=click.Path(dir_okay=False),
              help="The stage-two .onnx (default: the file the model's metadata names).")
@friendly
def register(model, fixed, moving, moving_labels, fixed_labels, out, threads, backend, precision,
             providers, spacing_tolerance, max_voxels, l2r_half, overwrite, refine,
             refine_method, stages, stage2_model) -> None:
    """Register moving CT scan(s) to a fixed one with an exported model (no torch needed).

    Writes disp.nii.gz (voxels of the fixed grid, warped(x) = moving(x + u(x))), disp.npz,
    warped.nii.gz, warped_labels.nii.gz (with --moving-labels) and summary.json, and prints
    per-stage times and Dice. The output folder is written as one transaction: it holds the
    previous result until the new one is complete, whatever interrupts the run.
    """
    from pddnet.data.io import DEFAULT_MAX_VOXELS
    from pddnet.runtime.batch import register_files
    from pddnet.spec.refine import RefineOptions

    register_files(model, fixed, list(moving), out=out, moving_labels=list(moving_labels),
                   fixed_labels=fixed_labels, threads=threads, backend=backend,
                   providers=[p for p in providers.split(",") if p.strip()] if providers
                   else None, precision=precision, overwrite=overwrite,
                   spacing_tolerance=spacing_tolerance, l2r_half=l2r_half,
                   echo=click.echo, refine=RefineOptions(steps=refine, method=refine_method)
                   if refine else None, stages=stages,
                   stage2_model=stage2_model, max_voxels=max_voxels or DEFAULT_MAX_VOXELS)


COMMANDS = (register,)
