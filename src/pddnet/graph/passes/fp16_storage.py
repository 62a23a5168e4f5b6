"""FP16 storage emulation: the FP32 graph that computes what an FP16 graph computes on a GPU.

An FP16 export rewritten so that every op computes in float32 and every tensor the graph
declares float16 is *rounded* to float16 (round to nearest, overflow to infinity, subnormals)
with plain float32 arithmetic. ONNX Runtime's CPU provider cannot be trusted with an FP16 graph:
it has no float16 kernels for most ops, inserts casts around them and also drops the
``float32 -> float16 -> float32`` rounding of the activations it passes through (measured,
docs/precision.md), so an FP16 graph on the CPU rounds little more than its weights. The
emulation is what a GPU does with FP16 tensors and float32 accumulation inside MatMul/Conv --
the measurement the precision search needs.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from pddnet.errors import PddnetError
from pddnet.graph.passes.inline import inline_named
from pddnet.spec import contract as C
from pddnet.spec.metadata import read_metadata, set_metadata

F16 = TensorProto.FLOAT16
F32 = TensorProto.FLOAT


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


class EmulateFP16Storage:
    """The pass form of :func:`emulate_fp16_storage`: ``call(model) -> (model, changed)``;
    ``changed`` is always true (the precision metadata gains ``"emulated"``)."""

    def call(self, model: onnx.ModelProto) -> tuple[onnx.ModelProto, bool]:
        return emulate_fp16_storage(model), True
