"""Graph queries of the precision tools: block maps, precision modes, quantisation checks.

Torch-free (onnx, numpy). The rewrites they use are graph passes: FP16 storage emulation in
:mod:`pddnet.graph.passes.fp16_storage`, inlining in :mod:`pddnet.graph.passes.inline`.

* :func:`block_map` -- ``{block: [main-graph node names]}`` from the ``pddnet.blocks`` metadata
  the exporter writes (or, for an older export, from the contract's node names).
* :func:`precision_mode` -- ``fp32`` / ``fp16`` / ``int8`` of a graph.
* :func:`quantised_nodes` / :func:`is_quantised` -- Q/DQ content of a graph.
"""

from __future__ import annotations

import re

import onnx
from onnx import TensorProto

from pddnet.spec import contract as C
from pddnet.spec.metadata import read_metadata

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
