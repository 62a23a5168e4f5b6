"""TensorRT commands of the ``pddnet`` CLI: ``check-trt``, ``build``, ``doctor``.

Kept apart from :mod:`pddnet.cli` (which adds them to its group) so that TensorRT's commands
stay in one place; like every command, they import their library code only when run, so
``pddnet --help`` needs neither tensorrt nor a GPU.
"""

from __future__ import annotations

import json
import sys

import click

from pddnet.cli.errors import friendly
from pddnet.errors import PddnetError


def print_trt_readiness(model_path, *, as_json: bool = False,
                        echo=click.echo) -> bool:
    """Print the readiness report of ``model_path``; True when every version imports it."""
    import onnx

    from pddnet.backends.trt.support import check_trt_readiness

    try:
        proto = onnx.load(str(model_path), load_external_data=False)
    except Exception as exc:
        raise PddnetError(f"{model_path}: not a readable ONNX model ({exc})") from exc
    report = check_trt_readiness(proto)
    echo(json.dumps(report.as_dict(), indent=2) if as_json else report.format())
    return all(report.ok(v) for v in report.versions)


@click.command("check-trt")
@click.argument("model", type=click.Path(dir_okay=False, exists=True))
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--strict", is_flag=True,
              help="Exit with status 1 when some TensorRT version cannot import the model.")
@friendly
def check_trt_cmd(model, as_json, strict) -> None:
    """TensorRT readiness: list the nodes (graph and local-function bodies) TensorRT 10.x and
    11.x cannot import natively, and which custom ops need a plugin per version. Needs no
    TensorRT (a static check against the onnx-tensorrt operator tables)."""
    ok = print_trt_readiness(model, as_json=as_json)
    if strict and not ok:
        sys.exit(1)


@click.command("build")
@click.option("--onnx", "onnx_path", required=True, type=click.Path(dir_okay=False, exists=True),
              help="The precision-specific .onnx (FP32, FP16 or Q/DQ INT8 graph).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Engine folder (<part>-<precision>-<key>.engine + .json); give the same folder "
                   "to the runtime as PDDNET_ENGINE_CACHE.")
@click.option("--plugins", default="auto", show_default=True,
              type=click.Choice(["auto", "native", "none"]),
              help="auto: AOT plugins for DeformableSample3D, Correlation, MinConv where TensorRT "
                   ">= 10.9 and triton allow (else as native); native: inline every custom op "
                   "from its local function; none: parse the graph unchanged, no plugins.")
@click.option("--workspace", help="Builder workspace limit, e.g. 4G or 512M (default: "
                                  "TensorRT's, the GPU's memory).")
@click.option("--timing-cache", type=click.Path(dir_okay=False),
              help="Timing cache file: read if present, updated after the build.")
@click.option("--hardware-compat", default="none", show_default=True,
              type=click.Choice(["none", "ampere_plus"]),
              help="ampere_plus: one engine for every Ampere-or-newer GPU (may be slower).")
@click.option("--whole", is_flag=True,
              help="Also build the whole model as one engine (trtexec, Triton server); the "
                   "runtime uses the features and head engines.")
@click.option("--force", is_flag=True, help="Rebuild even when a matching engine exists.")
@click.option("--device", default=0, show_default=True, type=click.IntRange(min=0),
              help="CUDA device to build on.")
@click.option("--verbose", is_flag=True, help="TensorRT's verbose builder log.")
@friendly
def build_cmd(onnx_path, out_dir, plugins, workspace, timing_cache, hardware_compat, whole, force,
              device, verbose) -> None:
    """Build TensorRT engines (strongly typed) for the parts the runtime runs.

    Engines are cached under a key of model hash, GPU name, compute capability, SM count,
    TensorRT version, precision and plugin binding. Stale (other model, precision or plugins)
    and foreign (other GPU or TensorRT) engines in OUT are reported and never used; a matching
    one is reused unless --force. Needs tensorrt, cuda-python and an NVIDIA GPU:
    pip install 'pddnet[gpu]'.
    """
    from pddnet.backends.trt.build import BuildOptions, build_command

    opts = BuildOptions(plugins=plugins, workspace=workspace, timing_cache=timing_cache,
                        hardware_compat=hardware_compat, device=device, verbose=verbose)
    for r in build_command(onnx_path, out_dir, options=opts, whole=whole, force=force,
                           echo=click.echo):
        click.echo(f"{r.engine_path} (+ {r.meta_path.name})")


@click.command("doctor")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@friendly
def doctor_cmd(as_json) -> None:
    """Which backends, ONNX Runtime providers, precisions and TensorRT plugin paths are usable
    here; for each one that is not, why and what to install."""
    from pddnet.backends.doctor import as_json as to_json
    from pddnet.backends.doctor import collect, format_report

    rep = collect()
    click.echo(json.dumps(to_json(rep), indent=2) if as_json else format_report(rep))


COMMANDS = (check_trt_cmd, build_cmd, doctor_cmd)

