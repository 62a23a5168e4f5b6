"""Deployment commands of the ``pddnet`` CLI: ``package`` and ``verify``.

Kept apart from :mod:`pddnet.cli` (which adds them to its group), like :mod:`pddnet.cli.trt`;
library code is imported only when a command runs. Both are torch-free.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from pddnet.cli.errors import friendly
from pddnet.errors import CheckFailed, PddnetError


@click.command("package")
@click.option("--onnx", "onnx_model", required=True, type=click.Path(dir_okay=False),
              help="The FP32 .onnx (`pddnet export`).")
@click.option("--fp16", type=click.Path(dir_okay=False), help="The FP16 graph of the same model.")
@click.option("--int8", type=click.Path(dir_okay=False),
              help="The INT8 (Q/DQ) graph of the same model.")
@click.option("--engine", "engines", multiple=True, type=click.Path(),
              help="TensorRT engines: a folder written by `pddnet build --out` or .engine files "
                   "(each with its .json); repeatable.")
@click.option("--report", "report_dir", required=True, type=click.Path(),
              help="The `pddnet validate --out` folder whose report.json validated these models.")
@click.option("--out", type=click.Path(),
              help="Bundle folder to write (a name ending in .tar.gz writes only the archive).")
@click.option("--tar", is_flag=True, help="Also write OUT.tar.gz beside the bundle folder.")
@click.option("--triton", type=click.Path(file_okay=False),
              help="Also (or only) write a Triton Inference Server model repository here.")
@click.option("--triton-kind", default="auto", show_default=True,
              type=click.Choice(["auto", "cpu", "gpu"]),
              help="Instance kind of the ONNX models (auto: gpu with --triton-ort-trt, else cpu).")
@click.option("--triton-instances", default=1, show_default=True, type=click.IntRange(min=1),
              help="Instances per model (instance_group count).")
@click.option("--triton-threads", type=click.IntRange(min=1),
              help="ONNX Runtime intra-op threads per instance.")
@click.option("--triton-ort-trt", is_flag=True,
              help="Add ONNX Runtime's TensorRT execution accelerator to the ONNX models.")
@click.option("--triton-prefix", default="pddnet", show_default=True,
              help="Model names: PREFIX_fp32, PREFIX_trt_fp16, ...")
@click.option("--name", help="Bundle name in the manifest (default: the folder name).")
@click.option("--allow-unvalidated", is_flag=True,
              help="Bundle models without passing validation, marked as such (run only when "
                   "asked for by precision).")
@click.option("--overwrite", is_flag=True, help="Replace existing outputs.")
@friendly
def package_cmd(onnx_model, fp16, int8, engines, report_dir, out, tar, triton, triton_kind,
                triton_instances, triton_threads, triton_ort_trt, triton_prefix, name,
                allow_unvalidated, overwrite) -> None:
    """Write a deployment bundle: the models, the pre-processing contract, the validation each
    model passed (dDice, latency) and a manifest with versions and the SHA-256 of every file;
    optionally a .tar.gz and a Triton model repository.

    Every model must have passed `pddnet validate` (matched by SHA-256 in REPORT/report.json).
    Nothing partial is left behind on failure or Ctrl-C; existing outputs are refused unless
    --overwrite. Check a bundle with `pddnet verify BUNDLE`; run it with
    `pddnet register --model BUNDLE ...`.
    """
    from pddnet.deploy.package import package
    from pddnet.deploy.triton import TritonOptions

    opts = TritonOptions(prefix=triton_prefix, kind=triton_kind, instances=triton_instances,
                         threads=triton_threads, ort_tensorrt=triton_ort_trt)
    package(onnx_model, report_dir=report_dir, fp16=fp16, int8=int8, engines=list(engines),
            out=out, tar=tar, triton=triton, triton_options=opts,
            allow_unvalidated=allow_unvalidated, overwrite=overwrite, name=name,
            echo=click.echo)


@click.command("verify")
@click.argument("bundle", type=click.Path())
@click.option("--backend", default="auto", show_default=True,
              help="Check this backend instead of the automatic choice (onnxruntime, tensorrt).")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8"]),
              help="Check this precision instead of the automatic choice.")
@click.option("--providers", help="ONNX Runtime providers to assume (cpu, cuda, ...).")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest summary as JSON.")
@friendly
def verify_cmd(bundle, backend, precision, providers, as_json) -> None:
    """Verify a bundle (folder or .tar.gz): the manifest, every file's size and SHA-256, no
    file outside the manifest; then say which backend and precision would run here, and why.

    Exits with status 1 and one line naming the file when the bundle is damaged (2 when it
    cannot be read at all). Loads no model.
    """
    from pddnet.runtime.bundle import open_bundle

    if not Path(bundle).exists():
        raise PddnetError(f"{bundle} does not exist; give a bundle folder or .tar.gz written by "
                          "`pddnet package`")
    try:
        opened = open_bundle(bundle)
    except PddnetError as exc:
        raise CheckFailed(str(exc)) from exc
    with opened as b:
        sel = b.select(backend, precision,
                       providers=[p for p in providers.split(",") if p.strip()]
                       if providers else None)
        if as_json:
            from pddnet._files import jsonable

            click.echo(json.dumps(jsonable({"bundle": str(b.source), "verified": True,
                                            "files": len(b.manifest["files"]),
                                            "models": b.manifest["models"],
                                            "selection": sel.as_dict()}), indent=2))
            return
        click.echo(b.summary())
        click.echo(sel.describe())


COMMANDS = (package_cmd, verify_cmd)

