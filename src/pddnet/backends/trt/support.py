"""TensorRT readiness check: which nodes TensorRT 10.x / 11.x cannot import natively, statically.

Runs with onnx only (no TensorRT, no GPU): it walks the graph *and every local-function body*
(the way the ONNX parser inlines them) and checks each node against a table of what the
ONNX parser of each TensorRT release imports. It answers, per TensorRT version range:

- which nodes cannot be imported natively (op not supported, or a documented restriction is
  violated, e.g. a rank-5 ``GridSample`` before TensorRT 11.2, a non-zero Q/DQ zero point);
- which custom ops therefore *need* a plugin (their local function contains such a node, or
  they have no local function at all) and which merely *may* use one (``pddnet::<op>``, bound
  by :mod:`pddnet.backends.trt.binding` for speed).

Sources of the table (checked when this was written; the check is an approximation of the
parser, the real answer is ``trt.OnnxParser.parse`` on the target):

- operator support matrix ``docs/operators.md`` of onnx-tensorrt for **TensorRT 10.15**
  (opset 9 to 24), and the 10.0 matrix (opset 9 to 20);
- TensorRT **11.2** release notes: GridSample extended to rank-5 input (3D: linear, nearest,
  cubic; align_corners 0/1; zeros, border, reflection padding) and ONNX ``DFT`` via a cuFFT
  plugin; TensorRT 11.5: opset 25. TensorRT 11.x otherwise keeps the 10.15 op set for the ops
  here (11.0 removed weak typing, i.e. precision flags, not operators).
- onnx-tensorrt changelog: local functions import since 9.0; nodes bound to quickly
  deployable plugins since 10.6; a registered plugin takes precedence over a local function
  of the same name since 10.7; ``kENABLE_PLUGIN_OVERRIDE`` since 10.15, after which a local
  function wins unless that flag is set or the node carries ``plugin_namespace``.

Jetson: JetPack 6.x ships TensorRT 10.3 (``10.x`` here); it never gets 5D GridSample.

The pddnet function bodies use only MatMul, MaxPool (3D), Slice, Gather, Reduce{Sum,SumSquare,
Min}, Concat, Reshape/Transpose/Unsqueeze, Constant and elementwise ops (Add, Sub, Mul, Neg,
Abs, Relu, Clip), all native on every 10.x and 11.x release in the table, so **no pddnet custom
op needs a plugin to import**; plugins are a speed (and memory) choice. Third-party graphs
(e.g. OBELISK/voxelmorph exports with ``GridSample`` on 5D volumes) are what the rank-5 rule is
for.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

import onnx
from onnx import helper

from pddnet.spec import contract as C

# ------------------------------------------------------------------------------------------
# The tables
# ------------------------------------------------------------------------------------------

#: Version ranges reported by :func:`check_trt_readiness` (label, first, last) of TensorRT.
VERSIONS: tuple[tuple[str, tuple[int, int], tuple[int, int]], ...] = (
    ("10.x (incl. JetPack 6: 10.3)", (10, 0), (10, 99)),
    ("11.0-11.1", (11, 0), (11, 1)),
    ("11.2+", (11, 2), (11, 99)),
)

#: Highest default-domain opset the parser accepts, by first release (lowest opset is 9).
MAX_OPSET = (((10, 0), 20), ((10, 15), 24), ((11, 0), 24), ((11, 5), 25))

#: Ops the 10.15 matrix marks supported ("Y").
SUPPORTED = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh Attention AveragePool
BatchNormalization BlackmanWindow Cast CastLike Ceil Celu Clip Concat Constant ConstantOfShape
Conv ConvTranspose Cos Cosh CumSum DeformConv DepthToSpace DequantizeLinear Div Dropout Einsum Elu
Equal Erf Exp Expand EyeLike Flatten Floor Gather GatherElements GatherND Gelu Gemm
GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GridSample GroupNormalization
GRU HammingWindow HannWindow HardSigmoid HardSwish Hardmax Identity If ImageScaler
InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax
Loop LRN LSTM LpNormalization LpPool MatMul Max MaxPool Mean MeanVarianceNormalization Min Mish
Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or Pad ParametricSoftplus Pow PRelu
QuantizeLinear RandomNormal RandomNormalLike RandomUniform RandomUniformLike Range Reciprocal
ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd
ReduceSum ReduceSumSquare Relu Reshape Resize ReverseSequence RMSNormalization RNN RoiAlign
RotaryEmbedding Round STFT ScaledTanh Scan Scatter ScatterElements ScatterND Selu Shape Shrink
Sigmoid Sign Sin Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub
Sum Tan Tanh TensorScatter ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Upsample Where Xor
""".split())

#: Ops the 10.15 matrix marks unsupported ("N"); ``DFT`` becomes supported in 11.2.
UNSUPPORTED = frozenset("""
AffineGrid Bernoulli BitShift BitwiseAnd BitwiseNot BitwiseOr BitwiseXor Col2Im CenterCropPad
Compress ConcatFromSequence ConvInteger DFT Det DynamicQuantizeLinear ImageDecoder MatMulInteger
MaxRoiPool MaxUnpool MelWeightMatrix Multinomial NegativeLogLikelihoodLoss Optional
OptionalGetElement OptionalHasElement QLinearConv QLinearMatMul RegexFullMatch SequenceAt
SequenceConstruct SequenceEmpty SequenceErase SequenceInsert SequenceLength SequenceMap
SoftmaxCrossEntropyLoss SplitToSequence StringConcat StringNormalizer StringSplit TfIdfVectorizer
Unique
""".split())

#: Ops added after 10.15, by first release.
ADDED = {"DFT": (11, 2)}

#: Reduce ops whose ``axes`` input must be a build-time constant (matrix: "an initializer").
REDUCE_CONST_AXES = frozenset({"ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp",
                               "ReduceMax", "ReduceMean", "ReduceMin", "ReduceProd", "ReduceSum",
                               "ReduceSumSquare"})
STANDARD_DOMAINS = ("", "ai.onnx")


def _in(version: tuple[int, int], lo: tuple[int, int], hi: tuple[int, int]) -> bool:
    return lo <= version <= hi


def max_opset(version: tuple[int, int]) -> int:
    best = 0
    for first, op in MAX_OPSET:
        if version >= first:
            best = op
    return best


# ------------------------------------------------------------------------------------------
# Report types
# ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Finding:
    """One node TensorRT cannot import natively on some versions."""

    path: tuple[str, ...]         # enclosing function calls, outermost first ("graph" at top)
    node: str                     # node name (or op type when unnamed)
    op: str                       # domain-qualified op type
    reason: str
    versions: tuple[str, ...]     # version labels it fails on

    def where(self) -> str:
        return " > ".join(self.path + (self.node,))


@dataclass
class CustomOpStatus:
    op: str
    has_function: bool
    needs_plugin: dict[str, bool] = field(default_factory=dict)   # version label -> needed
    blocking: dict[str, list[str]] = field(default_factory=dict)  # version label -> nodes
    plugin_available: bool = False                                # pddnet::<op> exists


@dataclass
class ReadinessReport:
    versions: tuple[str, ...]
    opset: int
    findings: list[Finding]
    custom_ops: dict[str, CustomOpStatus]
    nodes_checked: int
    notes: list[str] = field(default_factory=list)

    def ok(self, version: str) -> bool:
        """No node fails natively on ``version`` outside custom ops that have a plugin."""
        for f in self.findings:
            if version in f.versions and not self._covered_by_plugin(f, version):
                return False
        return True

    def _covered_by_plugin(self, f: Finding, version: str) -> bool:
        ops = [p.split(" (")[0] for p in f.path[1:]] + [f.op]
        return any(o.split("::")[-1] in self.custom_ops
                   and self.custom_ops[o.split("::")[-1]].plugin_available for o in ops)

    def as_dict(self) -> dict:
        return {
            "versions": list(self.versions), "opset": self.opset,
            "nodes_checked": self.nodes_checked,
            "findings": [{"where": f.where(), "op": f.op, "reason": f.reason,
                          "versions": list(f.versions)} for f in self.findings],
            "custom_ops": {k: {"has_function": v.has_function, "needs_plugin": v.needs_plugin,
                               "blocking": v.blocking, "plugin_available": v.plugin_available}
                           for k, v in self.custom_ops.items()},
            "notes": list(self.notes),
        }

    def format(self) -> str:
        lines = [f"TensorRT readiness ({self.nodes_checked} nodes checked, graph and function "
                 f"bodies; default-domain opset {self.opset})"]
        lines.append("")
        lines.append("Nodes TensorRT cannot import natively:")
        if not self.findings:
            lines.append("  none on " + ", ".join(self.versions))
        for f in self.findings:
            lines.append(f"  [{', '.join(f.versions)}] {f.where()} ({f.op}): {f.reason}")
        if self.custom_ops:
            lines.append("")
            lines.append("Custom ops (local functions):")
            for name, st in self.custom_ops.items():
                groups: dict[str, list[str]] = {}
                for v in self.versions:
                    if st.needs_plugin.get(v):
                        why = "; ".join(st.blocking.get(v, [])) or "no local function"
                        status = f"NEEDS a plugin ({why})"
                    else:
                        status = "native (its function is inlined)"
                    groups.setdefault(status, []).append(v)
                per = "; ".join(f"{', '.join(vs)}: {status}" for status, vs in groups.items())
                if st.plugin_available:
                    plugin = (f"plugin pddnet::{name} optional"
                              + (" (JIT only: Python at run time)" if name == "MeanFieldStep"
                                 else ""))
                else:
                    plugin = "no pddnet plugin"
                lines.append(f"  {name}: {per} -- {plugin}")
        lines.append("")
        for v in self.versions:
            lines.append(f"TensorRT {v}: "
                         + ("importable" if self.ok(v) else "NOT importable as is"))
        for n in self.notes:
            lines.append(f"note: {n}")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------
# The check
# ------------------------------------------------------------------------------------------

def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


class _Scope:
    """Tensor facts visible at one level (graph or a function body)."""

    def __init__(self, constants: set[str], ranks: dict[str, int], zero_points: dict[str, bool]):
        self.constants = constants
        self.ranks = ranks
        self.zero_points = zero_points  # initializer name -> all zeros


def _node_problems(node: onnx.NodeProto, scope: _Scope, version: tuple[int, int]) -> str | None:
    """Why ``node`` (standard domain) does not import natively on ``version``, or ``None``."""
    op = node.op_type
    if op in ADDED:
        if version < ADDED[op]:
            return (f"{op} is not supported before TensorRT "
                    f"{ADDED[op][0]}.{ADDED[op][1]}")
        return None
    if op in UNSUPPORTED:
        return f"{op} is not supported by the ONNX parser"
    if op not in SUPPORTED:
        return f"{op} is not in the parser's operator table"
    if op == "GridSample":
        rank = scope.ranks.get(node.input[0]) if node.input else None
        if rank == 5 and version < (11, 2):
            return "5D (volumetric) GridSample is supported from TensorRT 11.2 only (4D before)"
        if rank is None and version < (11, 2):
            return ("GridSample input rank unknown (no shape information); TensorRT < 11.2 "
                    "imports 4D GridSample only")
        mode = _attr(node, "mode", b"linear")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        if mode not in ("linear", "bilinear", "nearest", "cubic", "bicubic"):
            return f"GridSample mode {mode!r} is not supported"
        return None
    if op in ("MaxPool", "AveragePool", "LpPool"):
        ks = _attr(node, "kernel_shape", [])
        if op != "LpPool" and len(ks) not in (2, 3):
            return f"{op} supports 2D or 3D pooling only (kernel_shape {list(ks)})"
        dil = _attr(node, "dilations", None)
        if dil and any(d != 1 for d in dil):
            return f"{op}: dilations must be empty or all ones"
        if op == "MaxPool" and len([o for o in node.output if o]) > 1:
            return "MaxPool: the Indices output is not supported"
        return None
    if op in REDUCE_CONST_AXES:
        if len(node.input) > 1 and node.input[1] and node.input[1] not in scope.constants:
            return f"{op}: the axes input must be a build-time constant (initializer/Constant)"
        return None
    if op in ("QuantizeLinear", "DequantizeLinear"):
        if len(node.input) > 2 and node.input[2]:
            zp = node.input[2]
            if zp in scope.zero_points and not scope.zero_points[zp]:
                return f"{op}: the zero point must be 0"
            if zp not in scope.zero_points and zp not in scope.constants:
                return f"{op}: the zero point must be a constant 0"
        return None
    if op == "Resize":
        mode = _attr(node, "mode", b"nearest")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        if mode not in ("nearest", "linear"):
            return f"Resize mode {mode!r} is not supported (nearest, linear)"
        if _attr(node, "antialias", 0):
            return "Resize: antialiasing is not supported"
        return None
    if op == "TopK":
        if _attr(node, "sorted", 1) != 1:
            return "TopK: sorted must be 1"
        return None
    return None


def _ranks(model: onnx.ModelProto) -> dict[str, int]:
    ranks: dict[str, int] = {}
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:
        inferred = model
    g = inferred.graph
    for vi in list(g.value_info) + list(g.input) + list(g.output):
        t = vi.type.tensor_type
        if t.HasField("shape"):
            ranks[vi.name] = len(t.shape.dim)
    for init in model.graph.initializer:
        ranks[init.name] = len(init.dims)
    return ranks


def _graph_scope(model: onnx.ModelProto) -> _Scope:
    from onnx import numpy_helper

    g = model.graph
    consts = {t.name for t in g.initializer}
    consts |= {o for n in g.node if n.op_type == "Constant" and n.domain in STANDARD_DOMAINS
               for o in n.output}
    zps = {}
    for t in g.initializer:
        if t.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT4,
                           onnx.TensorProto.UINT4, onnx.TensorProto.INT16, onnx.TensorProto.INT32):
            try:
                zps[t.name] = bool((numpy_helper.to_array(t) == 0).all())
            except Exception:  # external data not loaded
                pass
    return _Scope(consts, _ranks(model), zps)


def _function_scope(fn: onnx.FunctionProto, node: onnx.NodeProto, outer: _Scope) -> _Scope:
    """Constants of the body, and the ranks of the formal inputs taken from the call site."""
    consts = {o for n in fn.node if n.op_type == "Constant" and n.domain in STANDARD_DOMAINS
              for o in n.output}
    ranks = {formal: outer.ranks[actual] for formal, actual in zip(fn.input, node.input)
             if actual in outer.ranks}
    consts |= {formal for formal, actual in zip(fn.input, node.input) if actual in outer.constants}
    return _Scope(consts, ranks, {})


def check_trt_readiness(model: onnx.ModelProto, *,
                        versions: Sequence[tuple[str, tuple[int, int], tuple[int, int]]] = VERSIONS
                        ) -> ReadinessReport:
    """Check ``model`` (graph and local-function bodies) against the TensorRT op tables.

    Every node is checked at the midpoint version of each range (the tables only change at
    range borders). Custom-domain nodes are followed into their local function; a node with
    neither a local function nor a standard op type needs a plugin (the parser's
    FallbackPluginImporter). Returns a :class:`ReadinessReport` (``.format()`` for people,
    ``.as_dict()`` for JSON).
    """
    functions = {(f.domain, f.name): f for f in model.functions}
    opset = next((o.version for o in model.opset_import if o.domain in STANDARD_DOMAINS), 0)
    labels = tuple(v[0] for v in versions)
    probe = {label: lo for label, lo, _ in versions}
    findings: dict[tuple, dict] = {}
    custom: dict[str, CustomOpStatus] = {}
    count = 0
    # per function key, the blocking nodes per version (memoised; functions may nest)
    fn_block: dict[tuple[str, str], dict[str, list[str]]] = {}

    def add(path, node, op, reason, label):
        key = (path, node.name or node.op_type, op, reason)
        findings.setdefault(key, {"versions": []})
        if label not in findings[key]["versions"]:
            findings[key]["versions"].append(label)

    def walk(nodes: Iterable[onnx.NodeProto], scope: _Scope, path: tuple[str, ...],
             stack: tuple) -> dict[str, list[str]]:
        nonlocal count
        blocking: dict[str, list[str]] = {label: [] for label in labels}
        for node in nodes:
            count += 1
            if node.domain in STANDARD_DOMAINS:
                for label in labels:
                    reason = _node_problems(node, scope, probe[label])
                    if reason:
                        add(path, node, node.op_type, reason, label)
                        blocking[label].append(f"{node.name or node.op_type}: {reason}")
                for a in node.attribute:  # If/Loop/Scan bodies
                    subs = ([a.g] if a.HasField("g") else []) + list(a.graphs)
                    for sub in subs:
                        inner = walk(sub.node, scope, path + (f"{node.op_type} body",), stack)
                        for label in labels:
                            blocking[label] += inner[label]
                continue
            key = (node.domain, node.op_type)
            qual = f"{node.domain}::{node.op_type}"
            st = custom.get(node.op_type)
            if st is None and (node.domain == C.DOMAIN or key in functions):
                st = custom.setdefault(node.op_type, CustomOpStatus(
                    node.op_type, key in functions,
                    plugin_available=node.domain == C.DOMAIN and node.op_type in C.CUSTOM_OPS))
            if key not in functions:
                for label in labels:
                    add(path, node, qual, "custom op without a local function: needs a TensorRT "
                        "plugin registered under its op_type (and plugin_namespace)", label)
                    blocking[label].append(f"{node.name or node.op_type}: no local function")
                if st is not None:
                    for label in labels:
                        st.needs_plugin[label] = True
                        st.blocking.setdefault(label, ["no local function"])
                continue
            if key in stack:
                for label in labels:
                    add(path, node, qual, "recursive local function", label)
                continue
            if key not in fn_block:
                fn = functions[key]
                fn_block[key] = walk(fn.node, _function_scope(fn, node, scope),
                                     path + (f"{node.op_type} ({node.name or 'unnamed'})",),
                                     stack + (key,))
            inner = fn_block[key]
            for label in labels:
                blocking[label] += inner[label]
                if st is not None:
                    st.needs_plugin[label] = st.needs_plugin.get(label, False) or bool(inner[label])
                    if inner[label]:
                        st.blocking[label] = list(inner[label])
        return blocking

    walk(model.graph.node, _graph_scope(model), ("graph",), ())
    notes = []
    for label, lo, _ in versions:
        if opset > max_opset(lo):
            notes.append(f"default-domain opset {opset} is newer than TensorRT {label} accepts "
                         f"(up to {max_opset(lo)} at its first release)")
    notes.append("static check against the onnx-tensorrt operator tables (10.15 matrix, 11.2 "
                 "release notes); the authoritative answer is parsing on the target TensorRT")
    out = [Finding(path=k[0], node=k[1], op=k[2], reason=k[3], versions=tuple(v["versions"]))
           for k, v in findings.items()]
    return ReadinessReport(labels, opset, out, custom, count, notes)


__all__ = ["check_trt_readiness", "ReadinessReport", "Finding", "CustomOpStatus", "VERSIONS",
           "SUPPORTED", "UNSUPPORTED"]
