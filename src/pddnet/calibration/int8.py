"""INT8: activation ranges with ONNX Runtime's calibrators, explicit Q/DQ with its quantiser.

The INT8 graph of a model is its FP32 export with QuantizeLinear/DequantizeLinear pairs in the
blocks chosen for INT8 (docs/precision.md), in the form TensorRT's strongly typed networks
accept: **int8, symmetric, zero point 0** for activations (per tensor) and weights (per output
channel, axis 0 of a Conv weight), biases left in float (TensorRT fuses them; ONNX Runtime's CPU
kernels quantise them internally -- measured as fast as int32 biases).

Everything goes through ``onnxruntime.quantization``:

1. :func:`prepare` -- the model to quantise. Main-graph nodes (the feature convolutions) are
   visible to the library as they are. For blocks whose work is inside an ``ai.pddnet`` local
   function (``obelisk``: DeformableSample3D; ``correlation``; the mean-field steps) those calls
   are *inlined* first (:func:`pddnet.graph.passes.inline.inline_named` naming the body's nodes
   ``<caller>/<function>/<node>``) and their ``Constant`` matrices become initializers, so
   that the library sees and quantises the bodies' MatMuls like any other (the alternative,
   Q/DQ written by hand into the function bodies, would need one function per call site --
   the two mean-field steps have different ranges -- and the TensorRT plugins take float32 or
   float16 only, so an INT8 custom op cannot be a plugin either way). Calls of blocks that stay
   in float keep their local functions (and plugin binding).
2. :func:`collect_ranges` -- a calibrator (``MinMaxCalibrater``, ``EntropyCalibrater`` or
   ``PercentileCalibrater``, symmetric) over the calibration reader, restricted to the tensors
   the quantiser needs plus every float tensor of the main graph (for the TensorRT execution
   provider's table); then :func:`merge_branches` gives ``fixed/...`` and ``moving/...``
   tensors the union of their ranges, so that the two feature branches get the same scales and
   the runtime can still split the graph and reuse the fixed scan's features.
3. :func:`quantise` -- ``quantize_static`` (QDQ format, per-channel int8 weights, symmetric int8
   activations, ``nodes_to_quantize`` = the chosen blocks' Conv/MatMul nodes) fed with those
   ranges through its ``calibration_cache_path`` (no second calibration pass).
4. :func:`write_tables` -- ``ranges.json`` (per tensor: min, max, the int8 scale) and, with
   ``write_calibration_table``, ``calibration.flatbuffers`` / ``calibration.cache`` /
   ``calibration.json`` (the table the ONNX Runtime TensorRT execution provider reads with
   ``trt_int8_calibration_table_name``; implicit quantisation, TensorRT 10.x only).

Torch-free.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from pddnet.calibration import graphs as G
from pddnet.errors import PddnetError
from pddnet.graph.passes.constants import ConstantsToInitializers
from pddnet.spec import contract as C
from pddnet.spec.metadata import set_metadata

METHODS = ("minmax", "entropy", "percentile")
#: op types the quantiser is asked to quantise (inputs: activation + weight)
QUANT_OP_TYPES = ("Conv", "MatMul")
#: int8 symmetric: the largest magnitude maps to this
QMAX = 127


def _method(name: str):
    from onnxruntime.quantization import CalibrationMethod

    try:
        return {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                "percentile": CalibrationMethod.Percentile}[name]
    except KeyError:
        raise PddnetError(f"calibration method must be one of {METHODS}, got {name!r}") from None


def check_fp32_input(model: onnx.ModelProto, where: str = "model") -> None:
    """Refuse a graph that is already quantised or is not the FP32 export."""
    qd = G.quantised_nodes(model)
    if qd:
        raise PddnetError(f"{where} is already quantised ({len(qd)} Q/DQ or integer nodes, e.g. "
                          f"{qd[0].name or qd[0].op_type!r}); calibrate the FP32 graph written by "
                          "`pddnet export`")
    mode = G.precision_mode(model)
    if mode != "fp32":
        raise PddnetError(f"{where} is an {mode} graph (pddnet.precision); INT8 graphs are made "
                          "from the FP32 export")


# ---------------------------------------------------------------------------------------------
# 1. the graph to quantise
# ---------------------------------------------------------------------------------------------
def prepare(model: onnx.ModelProto, blocks: Sequence[str]) -> tuple[onnx.ModelProto, list[str]]:
    """``(model to quantise, names of the nodes to quantise)`` for ``blocks`` in INT8.

    The custom-op calls of those blocks are inlined (module docstring); the nodes to quantise
    are their Conv and MatMul nodes, body nodes included."""
    unknown = sorted(set(blocks) - set(C.BLOCKS))
    if unknown:
        raise PddnetError(f"unknown block(s) {unknown}; blocks are {list(C.BLOCKS)}")
    bm = G.block_map(model)
    chosen = [n for blk in blocks for n in bm[blk]]
    by_name = {n.name: n for n in model.graph.node}
    calls = {n for n in chosen if by_name[n].domain == C.DOMAIN}
    work = model
    if calls:
        from pddnet.graph.passes.inline import inline_named

        work, _ = inline_named(model, only=calls)
        work, _ = ConstantsToInitializers().call(work)
    names = []
    for n in work.graph.node:
        if n.op_type not in QUANT_OP_TYPES:
            continue
        if n.name in chosen or any(n.name.startswith(c + "/") for c in calls):
            names.append(n.name)
    return work, names


def branch_pairs(model: onnx.ModelProto) -> dict[str, str]:
    """``{fixed tensor: moving tensor}`` for corresponding tensors of the two feature branches
    (node outputs in build order, names of inlined bodies by caller prefix, the inputs and the
    feature tensors)."""
    fixed = [n for n in model.graph.node if n.name.startswith("fixed/")]
    moving = [n for n in model.graph.node if n.name.startswith("moving/")]
    pairs = {C.INPUT_FIXED: C.INPUT_MOVING, C.FIXED_FEATURES: C.MOVING_FEATURES}
    if len(fixed) != len(moving):
        return pairs
    callers: list[tuple[str, str]] = []
    for a, b in zip(fixed, moving):
        if a.op_type != b.op_type:
            return pairs
        pairs.update(zip(a.output, b.output))
        prefix_a, prefix_b = a.name.split("/")[:2], b.name.split("/")[:2]
        callers.append(("/".join(prefix_a), "/".join(prefix_b)))
    out = dict(pairs)
    # inlined body tensors: "<fixed caller>/<rest>" <-> "<moving caller>/<rest>"
    names = {o for n in model.graph.node for o in n.output}
    for ca, cb in set(callers):
        for t in names:
            if t.startswith(ca + "/"):
                twin = cb + t[len(ca):]
                if twin in names:
                    out[t] = twin
    return out


def merge_branches(ranges, pairs: dict[str, str]):
    """Give both tensors of each fixed/moving pair the union of their ranges (in place)."""
    from onnxruntime.quantization.calibrate import TensorData

    for a, b in pairs.items():
        if a not in ranges or b not in ranges:
            continue
        ra, rb = ranges[a], ranges[b]
        lo = np.minimum(ra.range_value[0], rb.range_value[0]).astype(np.float32)
        hi = np.maximum(ra.range_value[1], rb.range_value[1]).astype(np.float32)
        merged = TensorData(lowest=lo, highest=hi)
        ranges[a] = merged
        ranges[b] = merged
    return ranges


# ---------------------------------------------------------------------------------------------
# 2. ranges
# ---------------------------------------------------------------------------------------------
def float_tensors(model: onnx.ModelProto) -> set[str]:
    """Float tensors of the main graph (node outputs and graph inputs; not initializers)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16}
    inits = {t.name for t in model.graph.initializer}
    out = set()
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + \
            list(inferred.graph.output):
        if vi.name not in inits and vi.type.tensor_type.elem_type in floats:
            out.add(vi.name)
    return out


def node_tensors(model: onnx.ModelProto, names: Iterable[str]) -> set[str]:
    """Inputs and outputs of the named nodes that are not initializers."""
    want = set(names)
    inits = {t.name for t in model.graph.initializer}
    return {t for n in model.graph.node if n.name in want
            for t in list(n.input) + list(n.output) if t and t not in inits}


def collect_ranges(model: onnx.ModelProto, reader, *, tensors: set[str] | None = None,
                   method: str = "minmax", symmetric: bool = True,
                   work_dir: str | os.PathLike | None = None):
    """Run ``reader``'s feeds through ``model`` with ONNX Runtime's calibrator for ``method``
    and return the ranges (``onnxruntime.quantization.TensorsData``) of ``tensors`` (default:
    every float tensor of the main graph). ``symmetric`` makes each range ``[-m, m]``."""
    from onnxruntime.quantization.calibrate import (
        EntropyCalibrater,
        MinMaxCalibrater,
        PercentileCalibrater,
    )

    _method(method)
    wanted = set(tensors) if tensors is not None else float_tensors(model)
    if not wanted:
        raise PddnetError("collect_ranges: no tensors to calibrate")
    with tempfile.TemporaryDirectory(prefix="pddnet-calib-", dir=work_dir) as tmp:
        path = Path(tmp) / "model.onnx"
        onnx.save_model(model, str(path))
        aug = str(Path(tmp) / "augmented.onnx")
        if method == "minmax":
            # (no max_intermediate_outputs: onnxruntime 1.32 clears the batches it should
            # reduce; MinMax keeps only ReduceMin/ReduceMax scalars per run anyway)
            cal = MinMaxCalibrater(path, None, aug, symmetric=symmetric)
        elif method == "entropy":
            cal = EntropyCalibrater(path, None, aug, symmetric=symmetric)
        else:
            cal = PercentileCalibrater(path, None, aug, symmetric=symmetric)
        base = cal.select_tensors_to_calibrate

        def only_wanted(m):
            found, infos = base(m)
            return {t for t in found if t in wanted}, infos

        cal.select_tensors_to_calibrate = only_wanted  # the library's hook, narrowed
        cal.augment_graph()
        cal.infer_session = _lean_session(cal.augmented_model_path)
        reader.rewind() if hasattr(reader, "rewind") else None
        cal.collect_data(reader)
        ranges = cal.compute_data()
        del cal
    missing = sorted(wanted - set(ranges.keys()))
    if missing and len(missing) == len(wanted):
        raise PddnetError(f"collect_ranges: the calibrator returned no range for any of the "
                          f"{len(wanted)} tensors (e.g. {missing[0]!r})")
    return ranges


def _lean_session(path):
    """The calibrator's session without ONNX Runtime's CPU arena (the library's default session,
    arena on and no graph optimisation, held 14 GB at the paper size), basic optimisations."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.enable_cpu_mem_arena = False
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


class _ScansReader:
    """Both scans of every pair of ``reader`` as feeds of the feature network (``image``)."""

    def __init__(self, reader):
        self.reader = reader
        self._queue: list = []

    def get_next(self):
        if not self._queue:
            feeds = self.reader.get_next()
            if not feeds:
                return None
            self._queue = [{"image": feeds[C.INPUT_FIXED]}, {"image": feeds[C.INPUT_MOVING]}]
        return self._queue.pop(0)

    def rewind(self):
        self._queue = []
        if hasattr(self.reader, "rewind"):
            self.reader.rewind()


def collect_feature_ranges(model: onnx.ModelProto, reader, *, tensors: set[str],
                           method: str = "minmax", work_dir=None):
    """:func:`collect_ranges` for tensors of the feature branches only, on the feature network
    (``runtime.split``) fed with both scans of each pair: the fixed branch's ranges over fixed
    and moving scans -- the branches' union -- copied to the moving twins. The head never
    runs, which at the paper size is most of the time and memory."""
    from pddnet.graph.split import split_model

    pairs = branch_pairs(model)
    back = {v: k for k, v in pairs.items()}
    rename = {C.INPUT_FIXED: C.FEATURES_INPUT, C.FIXED_FEATURES: C.FEATURES_OUTPUT}
    fixed_side = {back.get(t, t) for t in tensors}
    part = split_model(model).features
    wanted = {rename.get(t, t) for t in fixed_side}
    ranges = collect_ranges(part, _ScansReader(reader), tensors=wanted, method=method,
                            work_dir=work_dir)
    from onnxruntime.quantization.calibrate import TensorsData

    out = {}
    for t in fixed_side:
        r = ranges[rename.get(t, t)] if rename.get(t, t) in ranges else None
        if r is None:
            continue
        out[t] = r
        if t in pairs:
            out[pairs[t]] = r
    return TensorsData(ranges.calibration_method, out)


def calibrate_tensors(model: onnx.ModelProto, reader, tensors: set[str], *,
                      method: str = "minmax", work_dir=None):
    """Ranges of ``tensors`` of a :func:`prepare` d model, merged across the branches: on the
    feature network alone when every tensor is in the branches, else on the whole model."""
    if in_branches(model, tensors):
        return collect_feature_ranges(model, reader, tensors=tensors, method=method,
                                      work_dir=work_dir)
    ranges = collect_ranges(model, reader, tensors=tensors, method=method, work_dir=work_dir)
    return merge_branches(ranges, branch_pairs(model))


def in_branches(model: onnx.ModelProto, tensors: Iterable[str]) -> bool:
    """Whether every tensor belongs to the feature branches (inputs, features included)."""
    pairs = branch_pairs(model)
    branch = set(pairs) | set(pairs.values())
    return all(t in branch for t in tensors)


# ---------------------------------------------------------------------------------------------
# 3. quantise
# ---------------------------------------------------------------------------------------------
class _QuietAdvice(logging.Filter):
    """Drops ``quantize_static``'s advice to run ONNX Runtime's pre-processing (shape
    inference, which the exporter's graphs already carry) from the root logger."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "before quantization" not in record.getMessage()


def quantise(model: onnx.ModelProto, node_names: Sequence[str], ranges, *,
             method: str = "minmax") -> onnx.ModelProto:
    """``quantize_static`` of ``model`` (already :func:`prepare` d) on ``node_names`` with
    ``ranges``; returns the Q/DQ model (metadata kept)."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import TensorsData, save_tensors_data

    if not node_names:
        raise PddnetError("quantise: no Conv/MatMul node to quantise in the chosen blocks")
    needed = node_tensors(model, node_names)
    missing = sorted(t for t in needed if t not in ranges)
    if missing:
        raise PddnetError(f"quantise: no calibrated range for {len(missing)} tensor(s) the "
                          f"quantised nodes use, e.g. {missing[:3]}")
    with tempfile.TemporaryDirectory(prefix="pddnet-quant-") as tmp:
        cache = Path(tmp) / "ranges.cache.json"
        data = TensorsData(_method(method), {k: ranges[k] for k in ranges.keys()})
        save_tensors_data(data, cache)
        src = Path(tmp) / "in.onnx"
        dst = Path(tmp) / "out.onnx"
        onnx.save_model(model, str(src))
        advice = _QuietAdvice()  # its "pre-process before quantization" is not for our users
        logging.getLogger().addFilter(advice)
        try:
            quantize_static(
                str(src), str(dst), None, quant_format=QuantFormat.QDQ, per_channel=True,
                activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                nodes_to_quantize=list(node_names), op_types_to_quantize=list(QUANT_OP_TYPES),
                calibrate_method=_method(method), calibration_cache_path=str(cache),
                extra_options={"ActivationSymmetric": True, "WeightSymmetric": True,
                               "QuantizeBias": False})
        finally:
            logging.getLogger().removeFilter(advice)
        out = onnx.load(str(dst))
    # quantize_static keeps metadata_props; make sure (older releases dropped them)
    have = {p.key for p in out.metadata_props}
    for p in model.metadata_props:
        if p.key not in have:
            out.metadata_props.add(key=p.key, value=p.value)
    return out


def qdq_summary(model: onnx.ModelProto) -> dict[str, Any]:
    """Structure of a Q/DQ graph: quantised tensors, zero points, weight scales per channel.

    Returns ``{"quantize": n, "dequantize": n, "nonzero_zero_points": [...], "zero_point_types":
    [...], "per_channel_weights": {weight: channels}, "per_tensor_activations": n,
    "quantised_nodes": [consumers of DQ outputs that are Conv/MatMul]}``."""
    inits = {t.name: t for t in model.graph.initializer}
    nodes = list(model.graph.node)
    q = [n for n in nodes if n.op_type == "QuantizeLinear"]
    dq = [n for n in nodes if n.op_type == "DequantizeLinear"]
    bad, zp_types, per_channel, per_tensor = [], set(), {}, 0
    for n in q + dq:
        if len(n.input) > 2 and n.input[2]:
            zp = inits.get(n.input[2])
            if zp is None:
                bad.append(n.name)
                continue
            zp_types.add(onnx.TensorProto.DataType.Name(zp.data_type))
            if np.any(numpy_helper.to_array(zp) != 0):
                bad.append(n.name)
    for n in dq:
        x, scale = n.input[0], inits.get(n.input[1])
        if x in inits and scale is not None:
            per_channel[x] = int(np.asarray(numpy_helper.to_array(scale)).size)
        elif scale is not None:
            per_tensor += 1
    dq_out = {n.output[0] for n in dq}
    consumers = sorted({m.name for m in nodes if m.op_type in QUANT_OP_TYPES
                        and any(i in dq_out for i in m.input)})
    return {"quantize": len(q), "dequantize": len(dq), "nonzero_zero_points": bad,
            "zero_point_types": sorted(zp_types), "per_channel_weights": per_channel,
            "per_tensor_activations": per_tensor, "quantised_nodes": consumers}


def check_qdq(model: onnx.ModelProto) -> dict[str, Any]:
    """:func:`qdq_summary`, raising :class:`PddnetError` if a zero point is not 0 or not int8
    (TensorRT's explicit quantisation needs both)."""
    s = qdq_summary(model)
    if s["nonzero_zero_points"]:
        raise PddnetError(f"Q/DQ nodes with a non-zero or non-constant zero point: "
                          f"{s['nonzero_zero_points'][:5]}")
    if s["zero_point_types"] and s["zero_point_types"] != ["INT8"]:
        raise PddnetError(f"Q/DQ zero points of type {s['zero_point_types']}; TensorRT needs "
                          "int8")
    return s


# ---------------------------------------------------------------------------------------------
# 4. files
# ---------------------------------------------------------------------------------------------
def ranges_json(ranges, *, method: str, merged_pairs: dict[str, str] | None = None,
                quantised: Iterable[str] = ()) -> dict[str, Any]:
    """The readable ranges file: per tensor ``min``, ``max``, ``absmax``, ``scale`` (absmax/127:
    the symmetric int8 step) and whether the INT8 graph quantises it."""
    q = set(quantised)
    tensors = {}
    for name in sorted(ranges.keys()):
        lo, hi = (float(np.asarray(v).reshape(-1)[0]) for v in ranges[name].range_value)
        m = max(abs(lo), abs(hi))
        tensors[name] = {"min": lo, "max": hi, "absmax": m, "scale": m / QMAX,
                         "quantised": name in q}
    return {"schema": "pddnet.calibration.ranges/1", "method": method, "symmetric": True,
            "int8": {"qmax": QMAX, "zero_point": 0},
            "branches_merged": len(merged_pairs or {}), "tensors": tensors}


def write_tables(ranges, out_dir, *, method: str, merged_pairs=None, quantised=()) -> dict:
    """Write ``ranges.json`` and the TensorRT EP's calibration table (``calibration.*``) into
    ``out_dir``; returns ``{name: path}``."""
    from onnxruntime.quantization import write_calibration_table

    from pddnet._files import atomic_write

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    doc = ranges_json(ranges, method=method, merged_pairs=merged_pairs, quantised=quantised)
    path = out / "ranges.json"
    with atomic_write(path, overwrite=True) as tmp:
        Path(tmp).write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    table = {k: ranges[k] for k in ranges.keys()}
    write_calibration_table(table, dir=str(out))
    return {"ranges.json": path, "calibration.flatbuffers": out / "calibration.flatbuffers",
            "calibration.cache": out / "calibration.cache",
            "calibration.json": out / "calibration.json"}


def int8_metadata(blocks: Sequence[str], node_names: Sequence[str], *, method: str,
                  calibration: dict[str, Any], inlined: Sequence[str]) -> dict[str, Any]:
    blocks_all = {blk: ("int8" if blk in blocks else "fp32") for blk in C.BLOCKS}
    return {
        "mode": "int8",
        "blocks": blocks_all,
        "keep_fp32": [b for b, p in blocks_all.items() if p == "fp32"],
        "nodes": {"int8": sorted(node_names)},
        "inlined_calls": sorted(inlined),
        "activations": "int8, symmetric, per tensor, zero point 0",
        "weights": "int8, symmetric, per output channel, zero point 0; biases float",
        "calibration": {"method": method, **calibration},
        "io": "float32 (inputs, outputs and the fixed_features/moving_features split)",
    }


def build_int8(model: onnx.ModelProto, blocks: Sequence[str], reader, *, method: str = "minmax",
               table: bool = True, work_dir=None, echo=None):
    """The INT8 graph of an FP32 export with ``blocks`` quantised.

    Returns ``(int8 model, ranges, info)``: ranges of every calibrated tensor (merged across
    branches); ``info`` has the quantised node names, the inlined calls, the branch pairs and
    the reader's description. Raises :class:`PddnetError` for a graph already quantised."""
    say = echo or (lambda s: None)
    check_fp32_input(model)
    work, names = prepare(model, blocks)
    inlined = sorted({n.name for n in model.graph.node} - {n.name for n in work.graph.node})
    tensors = node_tensors(work, names)
    if table:
        tensors |= float_tensors(model)
    say(f"calibrating {len(tensors)} tensors ({method}) on {len(reader)} pair(s)")
    pairs = branch_pairs(work)
    ranges = calibrate_tensors(work, reader, tensors, method=method, work_dir=work_dir)
    say(f"quantising {len(names)} node(s) of blocks {list(blocks)}")
    q = quantise(work, names, ranges, method=method)
    check_qdq(q)
    desc = reader.describe() if hasattr(reader, "describe") else {}
    meta = int8_metadata(blocks, names, method=method, inlined=inlined,
                         calibration={k: desc.get(k) for k in ("split", "pairs", "pair_names",
                                                               "seed")})
    set_metadata(q, C.META_PRECISION, meta)
    return q, ranges, {"nodes": names, "inlined": inlined, "pairs": pairs, "reader": desc}


def int8_for_pair(model: onnx.ModelProto, feeds: dict[str, np.ndarray],
                  blocks: Sequence[str] | None = None) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """The INT8 graph of ``model`` with ``blocks`` (default
    :data:`~pddnet.calibration.blocks.DEFAULT_INT8_BLOCKS`) calibrated on one pair's feeds:
    what ``pddnet bench`` times on the pair it times (a speed row, not an accuracy figure).
    Returns ``(INT8 model, {"blocks", "nodes", "calibration"})``."""
    from pddnet.calibration.blocks import DEFAULT_INT8_BLOCKS
    from pddnet.calibration.data import ArrayReader

    blocks = list(blocks or DEFAULT_INT8_BLOCKS)
    q, _, info = build_int8(model, blocks, ArrayReader([feeds]), table=False)
    return q, {"blocks": blocks, "nodes": list(info["nodes"]),
               "calibration": "the timed pair (minmax)"}
