"""A Triton Inference Server model repository for the bundled models (``pddnet package --triton``).

Layout (Triton's, https://github.com/triton-inference-server/server docs/user_guide/
model_repository.md)::

    DIR/
      pddnet_fp32/config.pbtxt     platform "onnxruntime_onnx"
      pddnet_fp32/1/model.onnx
      pddnet_fp16/..., pddnet_int8/...
      pddnet_trt_fp16/config.pbtxt platform "tensorrt_plan" (a whole-model engine, `pddnet build
      pddnet_trt_fp16/1/model.plan  --whole`, for one GPU model and TensorRT version)

Each ``config.pbtxt`` names the model, its platform, ``max_batch_size: 0`` (the graphs have a
fixed ``(1, 1, I, J, K)`` input), every input and output with its data type and dims (read
from the graph / the engine's metadata), an instance group (``KIND_CPU`` or ``KIND_GPU``,
``count``), ONNX Runtime parameters (memory arena off as in the pddnet runtime; intra-op
threads), optionally ONNX Runtime's TensorRT execution accelerator (``precision_mode``,
``max_workspace_size_bytes``, engine cache), a zero-input warm-up request, and the pddnet
pre-processing contract as a string parameter ``pddnet.preprocessing`` (JSON). Triton serves the
network on pre-processed arrays; a client prepares them with
:func:`pddnet.runtime.preprocess.prepare_fixed` / ``prepare_moving`` (``docs/bundle.md``).

The configs are written as text and checked against Triton's own ``ModelConfig`` protobuf
schema (``tritonclient``'s ``model_config_pb2``) when that package is importable -- always in
the tests. Engines using JIT (Python) plugins cannot be served by Triton's TensorRT backend
and are left out with a note; so are engine sets without a whole-model engine.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import onnx

from pddnet._files import atomic_directory, atomic_write
from pddnet.errors import PddnetError
from pddnet.spec import contract as C

ONNX_TYPES = {
    onnx.TensorProto.FLOAT: "TYPE_FP32", onnx.TensorProto.FLOAT16: "TYPE_FP16",
    onnx.TensorProto.DOUBLE: "TYPE_FP64", onnx.TensorProto.INT8: "TYPE_INT8",
    onnx.TensorProto.UINT8: "TYPE_UINT8", onnx.TensorProto.INT32: "TYPE_INT32",
    onnx.TensorProto.INT64: "TYPE_INT64", onnx.TensorProto.BOOL: "TYPE_BOOL",
    onnx.TensorProto.BFLOAT16: "TYPE_BF16",
}
TRT_TYPES = {"FLOAT": "TYPE_FP32", "HALF": "TYPE_FP16", "INT8": "TYPE_INT8",
             "INT32": "TYPE_INT32", "INT64": "TYPE_INT64", "BOOL": "TYPE_BOOL",
             "UINT8": "TYPE_UINT8", "BF16": "TYPE_BF16"}
ORT_TRT_PRECISION = {"fp32": "FP32", "fp16": "FP16", "int8": "INT8"}


@dataclass
class TritonOptions:
    """Options of the generated configs.

    Attributes:
        prefix: model names are ``<prefix>_<precision>`` and ``<prefix>_trt_<precision>``.
        kind: instance kind of the ONNX models: ``cpu``, ``gpu`` or ``auto`` (``gpu`` when
            ``ort_tensorrt`` is set, else ``cpu``). Engines always run on ``KIND_GPU``.
        instances: instances per model (``count``).
        threads: ONNX Runtime intra-op threads per instance (``None``: Triton's default).
        ort_tensorrt: add ONNX Runtime's TensorRT execution accelerator to the ONNX models.
        workspace_bytes: its ``max_workspace_size_bytes``.
        warmup: add a zero-input warm-up request (Triton runs it at load).
    """

    prefix: str = "pddnet"
    kind: str = "auto"
    instances: int = 1
    threads: int | None = None
    ort_tensorrt: bool = False
    workspace_bytes: int = 1 << 30
    warmup: bool = True

    def __post_init__(self) -> None:
        if self.kind not in ("auto", "cpu", "gpu"):
            raise PddnetError(f"Triton instance kind must be auto, cpu or gpu, got {self.kind!r}")
        if self.instances < 1:
            raise PddnetError(f"Triton instances must be >= 1, got {self.instances}")
        if not self.prefix or not all(ch.isalnum() or ch in "_-" for ch in self.prefix):
            raise PddnetError(f"Triton model name prefix {self.prefix!r}: use letters, digits, "
                              "'_' and '-'")


def pbtxt_string(s: str) -> str:
    """A protobuf text-format string literal."""
    out = s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{out}"'


def _tensor_block(kind: str, items: Sequence[tuple[str, str, Sequence[int]]]) -> list[str]:
    lines = [f"{kind} ["]
    for i, (name, dtype, dims) in enumerate(items):
        sep = "," if i < len(items) - 1 else ""
        lines += ["  {", f"    name: {pbtxt_string(name)}", f"    data_type: {dtype}",
                  f"    dims: [ {', '.join(str(int(d)) for d in dims)} ]", "  }" + sep]
    return lines + ["]"]


def onnx_io(proto: onnx.ModelProto) -> tuple[list, list]:
    """``(inputs, outputs)`` as ``(name, TYPE_*, dims)`` from the graph (fixed dims only)."""
    inits = {i.name for i in proto.graph.initializer}

    def conv(v) -> tuple[str, str, list[int]]:
        tt = v.type.tensor_type
        if tt.elem_type not in ONNX_TYPES:
            raise PddnetError(f"Triton: tensor {v.name!r} has an element type Triton's config "
                              f"cannot express ({tt.elem_type})")
        dims = []
        for d in tt.shape.dim:
            if not d.HasField("dim_value"):
                raise PddnetError(f"Triton: tensor {v.name!r} has a free dimension; pddnet graphs "
                                  "have fixed shapes (re-export the model)")
            dims.append(int(d.dim_value))
        return v.name, ONNX_TYPES[tt.elem_type], dims

    return ([conv(v) for v in proto.graph.input if v.name not in inits],
            [conv(v) for v in proto.graph.output])


def engine_io(record: dict[str, Any]) -> tuple[list, list]:
    ins, outs = [], []
    for t in record.get("io") or []:
        dtype = TRT_TYPES.get(str(t.get("dtype", "")).upper())
        if dtype is None:
            raise PddnetError(f"Triton: engine tensor {t.get('name')!r} has type {t.get('dtype')!r}")
        (ins if t.get("io") == "input" else outs).append((t["name"], dtype, t["shape"]))
    if not ins or not outs:
        raise PddnetError("Triton: the engine's metadata records no inputs/outputs ('io'); "
                          "rebuild it with this pddnet's `pddnet build --whole`")
    return ins, outs


def model_config(name: str, platform: str, inputs: list, outputs: list, *, kind: str,
                 count: int, parameters: dict[str, str], accelerator: dict[str, str] | None = None,
                 warmup: bool = True, filename: str) -> str:
    """The text of one ``config.pbtxt``."""
    lines = [f"name: {pbtxt_string(name)}", f"platform: {pbtxt_string(platform)}",
             "max_batch_size: 0", f"default_model_filename: {pbtxt_string(filename)}",
             "version_policy: { latest: { num_versions: 1 } }"]
    lines += _tensor_block("input", inputs)
    lines += _tensor_block("output", outputs)
    lines += ["instance_group [", "  {", f"    count: {int(count)}", f"    kind: {kind}", "  }",
              "]"]
    if accelerator is not None:
        lines += ["optimization {", "  execution_accelerators {",
                  "    gpu_execution_accelerator: [", "      {",
                  f"        name: {pbtxt_string('tensorrt')}"]
        for k, v in accelerator.items():
            lines.append(f"        parameters {{ key: {pbtxt_string(k)} value: "
                         f"{pbtxt_string(v)} }}")
        lines += ["      }", "    ]", "  }", "}"]
    for k, v in parameters.items():
        lines.append(f"parameters {{ key: {pbtxt_string(k)} value: {{ string_value: "
                     f"{pbtxt_string(v)} }} }}")
    if warmup:
        lines += ["model_warmup [", "  {", f"    name: {pbtxt_string('zeros')}",
                  "    batch_size: 1"]
        for n, dtype, dims in inputs:
            lines.append(f"    inputs {{ key: {pbtxt_string(n)} value: {{ data_type: {dtype} "
                         f"dims: [ {', '.join(str(int(d)) for d in dims)} ] zero_data: true }} }}")
        lines += ["  }", "]"]
    return "\n".join(lines) + "\n"


def parse_config(text: str):
    """Parse ``text`` with Triton's ``ModelConfig`` schema (needs ``tritonclient``)."""
    from google.protobuf import text_format

    from pddnet._optional import require

    pb = require("tritonclient.grpc.model_config_pb2", "checking Triton model configs")
    cfg = pb.ModelConfig()
    try:
        text_format.Parse(text, cfg)
    except text_format.ParseError as exc:
        raise PddnetError(f"generated Triton config does not parse with Triton's ModelConfig "
                          f"schema: {exc}") from exc
    return cfg


def _try_parse(text: str) -> bool:
    from pddnet._optional import available

    if not available("tritonclient.grpc.model_config_pb2"):
        return False
    parse_config(text)
    return True


def write_repository(out: Path, models: Sequence[Any], engine_sets: Sequence[Any],
                     contract: dict[str, Any], opts: TritonOptions, *, overwrite: bool = False,
                     notes: list[str] | None = None) -> list[str]:
    """Write the repository (staged, renamed into place when complete); returns model names.

    ``models`` are :class:`pddnet.deploy.package.SourceModel` s, ``engine_sets``
    :class:`pddnet.deploy.package.EngineSet` s."""
    notes = notes if notes is not None else []
    contract_json = json.dumps(contract, sort_keys=True, separators=(",", ":"))
    kind = {"cpu": "KIND_CPU", "gpu": "KIND_GPU"}.get(
        opts.kind, "KIND_GPU" if opts.ort_tensorrt else "KIND_CPU")
    if opts.ort_tensorrt and kind == "KIND_CPU":
        raise PddnetError("the ONNX Runtime TensorRT accelerator needs GPU instances; drop "
                          "--triton-kind cpu or --triton-ort-trt")
    plan: list[tuple[str, str, Path]] = []   # (model name, config text, file to copy)
    for m in models:
        if m.companions:
            extra = [str(c) for c in m.companions if str(c) != m.stage2]
            if extra:
                raise PddnetError(f"{m.path}: a model with external data files {extra} cannot "
                                  "be served from a Triton repository as one model.onnx")
            notes.append(f"Triton: {m.path.name} has a stage-two model; the repository serves "
                         "the network only (refinement and the second stage run in the pddnet "
                         "runtime)")
        name = f"{opts.prefix}_{m.precision}"
        ins, outs = onnx_io(m.loaded.proto)
        params = {"pddnet.preprocessing": contract_json, "enable_mem_arena": "0"}
        if opts.threads:
            params["intra_op_thread_count"] = str(int(opts.threads))
        acc = None
        if opts.ort_tensorrt:
            acc = {"precision_mode": ORT_TRT_PRECISION[m.precision],
                   "max_workspace_size_bytes": str(int(opts.workspace_bytes)),
                   "trt_engine_cache_enable": "1"}
        text = model_config(name, "onnxruntime_onnx", ins, outs, kind=kind,
                            count=opts.instances, parameters=params, accelerator=acc,
                            warmup=opts.warmup, filename="model.onnx")
        plan.append((name, text, m.path))
    for es in engine_sets:
        full = es.parts.get("full")
        record = es.records.get("full")
        if full is None or record is None:
            notes.append(f"Triton: no whole-model engine among the {es.precision} engines for "
                         f"{es.env.get('gpu_name')}; build one with `pddnet build --whole` to "
                         "serve it with the tensorrt_plan platform")
            continue
        jit = (record.get("binding") or {}).get("jit_ops") or []
        if jit:
            notes.append(f"Triton: the {es.precision} engine uses JIT (Python) plugins {jit}, "
                         "which Triton's TensorRT backend cannot load; left out")
            continue
        name = f"{opts.prefix}_trt_{es.precision}"
        if any(p[0] == name for p in plan):
            name = f"{name}_{es.id.rsplit('-', 1)[-1]}"
        ins, outs = engine_io(record)
        params = {"pddnet.preprocessing": contract_json,
                  "pddnet.engine": json.dumps({"gpu": es.env, "plugins": es.plugins},
                                              sort_keys=True)}
        text = model_config(name, "tensorrt_plan", ins, outs, kind="KIND_GPU",
                            count=opts.instances, parameters=params, warmup=opts.warmup,
                            filename="model.plan")
        plan.append((name, text, full))
    for _, text, _ in plan:
        _try_parse(text)
    with atomic_directory(out, overwrite=overwrite) as stage:
        for name, text, src in plan:
            with atomic_write(stage / name / "config.pbtxt") as tmp:
                tmp.write_text(text)
            fname = "model.plan" if text.find('platform: "tensorrt_plan"') >= 0 else "model.onnx"
            with atomic_write(stage / name / "1" / fname) as tmp:
                shutil.copyfile(src, tmp)
    return [n for n, _, _ in plan]


def client_inputs(fixed, moving, *, protocol: str = "grpc"):
    """``tritonclient`` ``InferInput`` s for pre-processed ``(1, 1, I, J, K)`` float32 arrays
    (``protocol`` ``grpc`` or ``http``; a full client is in ``docs/bundle.md``)."""
    import numpy as np

    from pddnet._optional import require

    if protocol not in ("grpc", "http"):
        raise PddnetError(f"protocol must be grpc or http, got {protocol!r}")
    client = require(f"tritonclient.{protocol}", "calling a Triton server")
    out = []
    for name, arr in zip(C.INPUTS, (fixed, moving)):
        a = np.ascontiguousarray(arr, dtype=np.float32)
        if a.ndim != 5 or a.shape[:2] != (1, 1):
            raise PddnetError(f"Triton input {name!r}: expected a (1, 1, I, J, K) array from "
                              f"prepare_fixed/prepare_moving, received shape {a.shape}")
        inp = client.InferInput(name, list(a.shape), "FP32")
        inp.set_data_from_numpy(a)
        out.append(inp)
    return out


__all__ = ["TritonOptions", "write_repository", "model_config", "parse_config", "onnx_io",
           "engine_io", "pbtxt_string", "client_inputs"]
