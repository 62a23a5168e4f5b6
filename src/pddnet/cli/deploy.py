"""Deployment commands of the ``pddnet`` CLI: ``package`` and ``verify``.

Kept apart from :mod:`pddnet.cli` (which adds them to its group), like :mod:`pddnet.cli.trt`;
library code is imported only when a command runs. Both are torch-free.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from pddnet.cli.errors import friendly
from pddnet.cli.options import displacement_gates
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
@displacement_gates("the reference in the report", "; a model over a gate is not validated "
                    "(refused, or bundled unvalidated: never chosen automatically)")
@click.option("--overwrite", is_flag=True, help="Replace existing outputs.")
@friendly
def package_cmd(onnx_model, fp16, int8, engines, report_dir, out, tar, triton, triton_kind,
                triton_instances, triton_threads, triton_ort_trt, triton_prefix, name,
                allow_unvalidated, max_disp_p99_mm, max_disp_mm, overwrite) -> None:
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
            echo=click.echo, max_disp_p99_mm=max_disp_p99_mm, max_disp_mm=max_disp_mm)


#: ``pddnet verify`` exit statuses (the CLI's contract, :mod:`pddnet.cli.errors`)
EXIT_OK, EXIT_CHECK_FAILED, EXIT_BAD_INPUT, EXIT_INTERNAL = 0, 1, 2, 3


@click.command("verify")
@click.argument("bundle", type=click.Path())
@click.option("--backend", default="auto", show_default=True,
              help="Check this backend instead of the automatic choice (onnxruntime, tensorrt).")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8"]),
              help="Check this precision instead of the automatic choice.")
@click.option("--providers", help="ONNX Runtime providers to assume (cpu, cuda, ...).")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object on stdout, also on failure: {verified, exit_code, "
                   "failure: {stage, kind, message} | null, ...}.")
def verify_cmd(bundle, backend, precision, providers, as_json) -> None:
    """Verify a bundle (folder or .tar.gz): the manifest, every file's size and SHA-256, no
    file outside the manifest; then say which backend and precision would run here, and why
    each other precision was not chosen (e.g. a failed displacement gate).

    Exit status: 0 verified; 1 the bundle is damaged (one line naming the file); 2 bad input
    or environment (no such path, nothing that can run here); 3 an internal error. With
    --json the same statuses, and the failure is a JSON object on stdout. Loads no model.
    """
    if not as_json:
        return friendly(_verify_text)(bundle, backend, precision, providers)
    import sys

    from pddnet._files import jsonable
    from pddnet.cli.errors import debug_enabled

    stage = ["input"]
    try:
        doc = _verify(bundle, backend, precision, providers, stage)
        doc.update(exit_code=EXIT_OK, failure=None)
    except CheckFailed as exc:
        doc = _failure(bundle, stage[0], "check_failed", exc, EXIT_CHECK_FAILED)
    except (PddnetError, OSError) as exc:
        doc = _failure(bundle, stage[0], "bad_input", exc, EXIT_BAD_INPUT)
    except Exception as exc:  # noqa: BLE001 - the contract: a JSON object, never a traceback
        if debug_enabled():
            raise
        doc = _failure(bundle, stage[0], "internal", exc, EXIT_INTERNAL)
    click.echo(json.dumps(jsonable(doc), indent=2))
    sys.exit(doc["exit_code"])


def _failure(bundle, stage: str, kind: str, exc: BaseException, code: int) -> dict:
    """The ``--json`` object of a failed verification: what failed (``stage``: input, integrity,
    selection), why (``message``), and the exit status."""
    message = " ".join(str(exc).split())
    if kind == "internal":
        message = (f"{type(exc).__name__}: {message}; this is a bug in pddnet -- rerun with "
                   "`pddnet --debug verify ...` and report the traceback")
    return {"bundle": str(bundle), "verified": stage not in ("input", "integrity"),
            "exit_code": code, "failure": {"stage": stage, "kind": kind, "message": message}}


def _verify(bundle, backend, precision, providers, stage: list[str]) -> dict:
    """Verify and select; ``stage[0]`` follows the step (for the failure object)."""
    from pddnet.deploy.package import explain_selection
    from pddnet.runtime.bundle import open_bundle

    if not Path(bundle).exists():
        raise PddnetError(f"{bundle} does not exist; give a bundle folder or .tar.gz written by "
                          "`pddnet package`")
    stage[0] = "integrity"
    try:
        opened = open_bundle(bundle)
    except PddnetError as exc:
        raise CheckFailed(str(exc)) from exc
    with opened as b:
        stage[0] = "selection"
        sel = b.select(backend, precision,
                       providers=[p for p in providers.split(",") if p.strip()]
                       if providers else None)
        return {"bundle": str(b.source), "verified": True, "files": len(b.manifest["files"]),
                "models": b.manifest["models"],
                "precision_gates": b.manifest.get("precision_gates"),
                "selection": sel.as_dict(),
                "choices": explain_selection(b.manifest, sel),
                "summary": b.summary(), "describe": sel.describe()}


def _verify_text(bundle, backend, precision, providers) -> None:
    doc = _verify(bundle, backend, precision, providers, ["input"])
    click.echo(doc["summary"])
    click.echo(doc["describe"])
    for c in doc["choices"]:
        click.echo(f"  {'chosen' if c['chosen'] else 'why not'}: {c['model_id']}: {c['why']}")


COMMANDS = (package_cmd, verify_cmd)
