"""Precision blocks: keep-FP32 lists, FP16 plans, and what each block costs.

A *block* is a named part of the exported graph (``contract.BLOCKS``; ``pddnet.blocks`` in the
model's metadata lists its main-graph nodes, both branches for the feature layers):

============  ===========================================================================
pool          the 3x3x3 stride-2 average pool (a Conv) on the input scan
conv0         the 5x5x5 stride-2 Conv 1 -> 4 (+ ReLU)
obelisk       the two DeformableSample3D calls and their difference
conv1         the 1x1x1 Conv 8c -> 4c (+ ReLU)
conv2         the 3x3x3 Conv 4c -> 4c (+ ReLU): most of the feature network's FLOPs
conv3         the 1x1x1 Conv 4c -> c (the features)
correlation   the Correlation (SSD cost volume)
meanfield1    the first MeanFieldStep (and, unfolded, the data cost a1 + a0 * SSD)
meanfield2    the second step's input and the second MeanFieldStep
softmax       logit scale, softmax over the L^3 displacements, expectation (and entropy)
upsample      trilinear upsampling of the control-grid field to voxels
============  ===========================================================================

A keep-FP32 list may name blocks, main-graph node names (``head/Correlation_0``, the block
that holds it is kept) or op types (``Correlation``, ``Softmax``: every block with such a
node, custom-op bodies included).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Iterable, Sequence

from pddnet.errors import PddnetError
from pddnet.spec import contract as C

#: blocks an FP16 export keeps in FP32 by default: none. ``pddnet sensitivity`` on the shipped
#: ``small`` weights (and on earlier training snapshots) found every block within the FP16 gate
#: alone and all together (docs/precision.md; the correlation's |f|^2 - 2 f.m + |m|^2
#: expansion, the expected weak spot, cost < 0.05 point with float16 storage emulated). Inputs, outputs and the feature tensors at the split
#: are float32 in every graph. Keep blocks with ``pddnet export --precision fp16 --keep-fp32``.
DEFAULT_KEEP_FP32: tuple[str, ...] = ()
#: blocks ``pddnet calibrate`` quantises by default: the feature convolutions that ONNX
#: Runtime runs measurably faster in INT8 on the development CPUs: conv2 is what ``pddnet
#: sensitivity`` chooses at the ``small`` size, conv1 gains at the paper size
#: (docs/precision.md, docs/benchmarks.md). ``conv3`` (64 -> 16, 1x1x1) is
#: about neutral: its kernel gets faster, but quantising it adds a Q/DQ on the features.
DEFAULT_INT8_BLOCKS: tuple[str, ...] = ("conv1", "conv2")

#: op types inside each custom op's body (for op-type keep lists)
_BODY_OPS = {
    "DeformableSample3D": {"Slice", "Add", "Mul", "Clip", "Sub", "Unsqueeze", "Abs", "Relu",
                           "Reshape", "MatMul", "Transpose", "Cast"},
    "Correlation": {"Reshape", "MatMul", "Transpose", "ReduceSumSquare", "Mul", "ReduceSum",
                    "Slice", "Gather", "Add", "Concat", "Unsqueeze", "Squeeze"},
    "MinConv": {"Neg", "Reshape", "MaxPool", "MatMul", "Mul", "Slice", "Unsqueeze", "Add",
                "ReduceMin", "Concat"},
    "MeanFieldStep": {"MinConv", "MatMul", "Reshape"},
}


def _ops_of_block(block: str, nodes_of: dict[str, list[str]], op_of: dict[str, str]) -> set[str]:
    ops: set[str] = set()
    for n in nodes_of.get(block, []):
        op = op_of.get(n, "")
        ops.add(op)
        todo = [op]
        while todo:
            inner = _BODY_OPS.get(todo.pop(), set())
            for o in inner - ops:
                ops.add(o)
                todo.append(o)
    return ops


def resolve_keep(keep: Iterable[str] | None, block_map: dict[str, list[str]] | None = None,
                 op_types: dict[str, str] | None = None) -> list[str]:
    """The blocks named by a keep-FP32 list (module docstring); ``None`` -> the default,
    ``["none"]`` -> none. ``block_map``/``op_types`` (node -> op type) resolve node names and
    op types; without them only block names are accepted."""
    if keep is None:
        return list(DEFAULT_KEEP_FP32)
    items = [k.strip() for k in keep if k and k.strip()]
    if items == ["none"]:
        return []
    bm = block_map or {}
    ops = op_types or {}
    out: set[str] = set()
    for item in items:
        if item in C.BLOCKS:
            out.add(item)
            continue
        holders = [b for b, nodes in bm.items() if item in nodes]
        if holders:
            out.update(holders)
            continue
        by_op = [b for b in C.BLOCKS if item in _ops_of_block(b, bm, ops)]
        if by_op:
            out.update(by_op)
            continue
        raise PddnetError(f"keep-FP32 entry {item!r} is not a block ({', '.join(C.BLOCKS)}), a "
                          "node name or an op type of this model")
    return [b for b in C.BLOCKS if b in out]


def fp16_plan(keep_fp32: Sequence[str]) -> dict[str, str]:
    """``{block: "fp16"|"fp32"}``: every block FP16 except ``keep_fp32``."""
    bad = sorted(set(keep_fp32) - set(C.BLOCKS))
    if bad:
        raise PddnetError(f"unknown block(s) {bad}; blocks are {list(C.BLOCKS)}")
    return {b: ("fp32" if b in keep_fp32 else "fp16") for b in C.BLOCKS}


def node_block(name: str, owners: dict[str, str], ordered: list[str]) -> str:
    """The block of an (ONNX Runtime) node name: a block's node itself, a node inlined from
    it (``<node>/...``) or one ONNX Runtime derived from it (``<node>_token_3``,
    ``<node>_QuantizeLinear``); ``"other"`` otherwise (e.g. layout transposes)."""
    if name in owners:
        return owners[name]
    for n in ordered:  # longest names first
        if name.startswith(n + "/") or name.startswith(n + "_"):
            return owners[n]
    return "other"


def group_by_block(per_node_ms: dict[str, float], block_map: dict[str, list[str]]
                   ) -> dict[str, float]:
    """Sum node times (``{node name: ms}``) per block (:func:`node_block`)."""
    owners = {n: b for b, nodes in block_map.items() for n in nodes}
    ordered = sorted(owners, key=len, reverse=True)
    out: dict[str, float] = defaultdict(float)
    for name, ms in per_node_ms.items():
        out[node_block(name, owners, ordered)] += ms
    return {b: round(out.get(b, 0.0), 3) for b in list(C.BLOCKS) + ["other"]}


def profile_blocks(model, feeds: dict, *, threads: int | None = 2, runs: int = 2,
                   work_dir=None) -> dict[str, Any]:
    """Kernel time per block of one ONNX Runtime run of ``model`` (an ``onnx.ModelProto``;
    functions are inlined with caller names first, as ``pddnet bench`` does), averaged over
    ``runs`` after one warm-up. Returns ``{"blocks": {block: ms}, "kernel_ms", "run_ms"}``."""
    import json
    import os
    import tempfile

    import onnxruntime as ort

    from pddnet.calibration.graphs import block_map as get_block_map
    from pddnet.graph.passes.inline import inline_named

    bm = get_block_map(model)
    inlined, _ = inline_named(model)
    with tempfile.TemporaryDirectory(prefix="pddnet-prof-", dir=work_dir) as tmp:
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.enable_cpu_mem_arena = False
        so.enable_profiling = True
        so.profile_file_prefix = os.path.join(tmp, "prof")
        if threads:
            so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        sess = ort.InferenceSession(inlined.SerializeToString(), so,
                                    providers=["CPUExecutionProvider"])
        for _ in range(runs + 1):
            sess.run(None, feeds)
        trace = json.load(open(sess.end_profiling()))
    runs_ts = sorted((e["ts"], e["ts"] + e["dur"]) for e in trace
                     if e.get("cat") == "Session" and e.get("name") == "model_run")[1:]
    per_node: dict[str, float] = defaultdict(float)
    for e in trace:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        if not any(a <= e["ts"] <= b for a, b in runs_ts):
            continue
        per_node[e["name"][: -len("_kernel_time")]] += e["dur"] / 1e3 / max(1, len(runs_ts))
    blocks = group_by_block(per_node, bm)
    return {"blocks": blocks, "kernel_ms": round(sum(per_node.values()), 3),
            "run_ms": round(sum(b - a for a, b in runs_ts) / 1e3 / max(1, len(runs_ts)), 3)}
