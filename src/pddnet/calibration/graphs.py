"""Graph utilities of the precision tools: block maps, FP16 storage emulation, quantisation checks.

Torch-free (onnx, numpy; onnxruntime only where a function says so).

* :func:`block_map` -- ``{block: [main-graph node names]}`` from the ``pddnet.blocks`` metadata
  the exporter writes (or, for an older export, from the contract's node names).
* :func:`emulate_fp16_storage` -- an FP16 graph rewritten so that every op computes in float32
  and every tensor the graph declares float16 is *rounded* to float16 (round to nearest,
  overflow to infinity, subnormals) with plain float32 arithmetic. ONNX Runtime's CPU provider
  cannot be trusted with that: it has no float16 kernels for most ops, inserts casts around
  them and also drops the ``float32 -> float16 -> float32`` rounding of the activations it
  passes through (measured, docs/precision.md), so an FP16 graph on the CPU rounds little more
  than its weights. The emulation is what a GPU does with FP16 tensors and float32
  accumulation inside MatMul/Conv -- the measurement the sensitivity search needs.
* :func:`quantised_nodes` / :func:`is_quantised` -- Q/DQ content of a graph.
"""

from __future__ import annotations

import re

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from pddnet.errors import PddnetError
from pddnet.spec.metadata import read_metadata, set_metadata
from pddnet.spec import contract as C

F16 = TensorProto.FLOAT16
F32 = TensorProto.FLOAT

#: node names of each block in an export without ``pddnet.blocks`` (format 1 names)
_FALLBACK_PATTERNS: dict[str, tuple[str, ...]] = {
    "pool": (r"(fixed|moving)/AvgPool_\d+",),
    "conv0": (r"(fixed|moving)/Conv0_\d+", r"(fixed|moving)/Relu_0"),
    "obelisk": (r"(fixed|moving)/DeformableSample3D_\d+", r"(fixed|moving)/ObeliskDiff_\d+"),
    "conv1": (r"(fixed|moving)/Conv1_\d+", r"(fixed|moving)/Relu_1"),
    "conv2": (r"(fixed|moving)/Conv2_\d+", r"(fixed|moving)/Relu_2"),
    "conv3": (r"(fixed|moving)/Conv3_\d+",),
    "correlation": (r"head/Correlation_\d+",),
    "meanfield1": (r"head/MeanFieldStep_0", r"head/DataCost_\d+"),
    "meanfield2": (r"head/MeanFieldStep_1", r"head/SecondInput_\d+"),
}


def block_map(model: onnx.ModelProto) -> dict[str, list[str]]:
    """``{block: [main-graph node names]}`` for :data:`contract.BLOCKS` (some may be empty).

    From the ``pddnet.blocks`` metadata when present; otherwise from the node names of the
    model contract (feature layers, correlation and the two mean-field steps; the softmax and
    upsampling blocks are then the remaining ``head/`` nodes)."""
    meta = read_metadata(model)
    names = [n.name for n in model.graph.node]
    present = set(names)
    blocks = meta.get(C.META_BLOCKS)
    if isinstance(blocks, dict) and set(blocks) <= set(C.BLOCKS):
        return {blk: [n for n in blocks.get(blk, []) if n in present] for blk in C.BLOCKS}
    out: dict[str, list[str]] = {blk: [] for blk in C.BLOCKS}
    rest = []
    for name in names:
        for blk, pats in _FALLBACK_PATTERNS.items():
            if any(re.fullmatch(p, name) for p in pats):
                out[blk].append(name)
                break
        else:
            rest.append(name)
    out["softmax"] = [n for n in rest if n.startswith("head/")]
    return out


def quantised_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Every QuantizeLinear/DequantizeLinear (or integer-kernel) node, functions included."""
    kinds = {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul",
             "ConvInteger", "MatMulInteger", "DynamicQuantizeLinear"}
    nodes = list(model.graph.node) + [n for f in model.functions for n in f.node]
    return [n for n in nodes if n.op_type in kinds]


def is_quantised(model: onnx.ModelProto) -> bool:
    return bool(quantised_nodes(model))


def precision_mode(model: onnx.ModelProto) -> str:
    """``fp32`` / ``fp16`` / ``int8``: the ``pddnet.precision`` metadata, else the graph's
    content (Q/DQ -> int8, float16 initializers or casts -> fp16)."""
    prec = read_metadata(model).get(C.META_PRECISION)
    if isinstance(prec, dict) and prec.get("mode") in ("fp32", "fp16", "int8"):
        mode = prec["mode"]
        if mode != "fp32" or not is_quantised(model):
            return mode
    if is_quantised(model):
        return "int8"
    nodes = list(model.graph.node) + [n for f in model.functions for n in f.node]
    if any(t.data_type == F16 for t in model.graph.initializer) or any(
            n.op_type == "Cast" and any(a.name == "to" and a.i == F16 for a in n.attribute)
            for n in nodes):
        return "fp16"
    return "fp32"


# ---------------------------------------------------------------------------------------------
# FP16 storage emulation
# ---------------------------------------------------------------------------------------------
class _Rounder:
    """Emits ``round16(x)``: float32 in, float32 out, the value rounded to float16 -- an
    explicit ``Cast(float16)`` followed by ``Cast(float32)``. ONNX Runtime keeps such a pair
    (it only drops the float16 round trips of the casts *it* inserts around ops without a
    float16 kernel), and its conversion is IEEE round-to-nearest-even with subnormals and
    overflow to infinity; a test checks it bit for bit against numpy on every run."""

    def __init__(self):
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.n = 0

    def emit(self, x: str, out: str) -> None:
        p = f"round16/{self.n}"
        self.n += 1
        self.nodes.append(helper.make_node("Cast", [x], [f"{p}/f16"], name=f"{p}/to16", to=F16))
        self.nodes.append(helper.make_node("Cast", [f"{p}/f16"], [out], name=f"{p}/to32",
                                           to=F32))


def emulate_fp16_storage(model: onnx.ModelProto) -> onnx.ModelProto:
    """The float32 graph that computes what ``model`` (an FP16 export) computes when every op
    works in float32 and every float16 tensor is stored rounded to float16.

    All local functions are inlined (each call with its own types: polymorphic bodies
    resolve per call site), then: float16 initializers and ``Constant`` values become float32
    (same numbers); a ``Cast`` or ``CastLike`` to float16 becomes ``round16``; a cast to
    float32 becomes ``Identity``; any other node whose output is float16 writes float32 and is
    followed by ``round16``. Inputs, outputs and metadata are kept; the ``pddnet.precision``
    entry gets ``"emulated": "fp16-storage"``.
    """
    from pddnet.graph.passes.inline import inline_named

    inlined, _ = inline_named(model)
    try:
        inferred = onnx.shape_inference.infer_shapes(inlined, strict_mode=True)
    except Exception as exc:  # noqa: BLE001 - onnx raises several types
        raise PddnetError(f"emulate_fp16_storage: type inference failed on the inlined graph "
                          f"({exc})") from exc
    g = inferred.graph
    types = {vi.name: vi.type.tensor_type.elem_type
             for vi in list(g.value_info) + list(g.input) + list(g.output)}
    for t in g.initializer:
        types[t.name] = t.data_type
    r = _Rounder()
    nodes: list[onnx.NodeProto] = []
    for n in g.node:
        m = onnx.NodeProto()
        m.CopyFrom(n)
        if n.op_type in ("Cast", "CastLike"):
            to = types.get(n.output[0])
            if to == F16:
                r.nodes = nodes
                r.emit(n.input[0], n.output[0])
                continue
            if to == F32 and n.op_type == "Cast":
                nodes.append(helper.make_node("Identity", [n.input[0]], [n.output[0]],
                                              name=n.name))
                continue
            if to == F32:  # CastLike to float32
                nodes.append(helper.make_node("Identity", [n.input[0]], [n.output[0]],
                                              name=n.name))
                continue
        if n.op_type == "Constant":
            for a in m.attribute:
                if a.name == "value" and a.t.data_type == F16:
                    arr = numpy_helper.to_array(a.t).astype(np.float32)
                    a.t.CopyFrom(numpy_helper.from_array(arr, a.t.name))
            nodes.append(m)
            continue
        f16_outs = [o for o in n.output if o and types.get(o) == F16]
        for a in m.attribute:  # ops with a type attribute (none in our graphs but Cast)
            if a.name in ("to", "dtype") and a.type == onnx.AttributeProto.INT and a.i == F16:
                a.i = F32
        if not f16_outs:
            nodes.append(m)
            continue
        m.output[:] = [f"{o}/f32" if o in f16_outs else o for o in n.output]
        nodes.append(m)
        r.nodes = nodes
        for o in f16_outs:
            r.emit(f"{o}/f32", o)
    inits = []
    for t in g.initializer:
        if t.data_type == F16:
            inits.append(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float32),
                                                 t.name))
        else:
            inits.append(t)
    graph = helper.make_graph(nodes, g.name, list(model.graph.input), list(model.graph.output),
                              initializer=inits + r.inits)
    out = helper.make_model(graph, opset_imports=list(model.opset_import),
                            producer_name=model.producer_name,
                            producer_version=model.producer_version)
    out.ir_version = model.ir_version
    for p in model.metadata_props:
        out.metadata_props.add(key=p.key, value=p.value)
    prec = read_metadata(model).get(C.META_PRECISION)
    prec = dict(prec) if isinstance(prec, dict) else {"mode": "fp16"}
    prec["emulated"] = "fp16-storage"
    set_metadata(out, C.META_PRECISION, prec)
    return out


def round16_numpy(x: np.ndarray) -> np.ndarray:
    """What ``round16`` computes, in numpy (the reference for its test)."""
    return np.asarray(x, np.float32).astype(np.float16).astype(np.float32)
