"""The feature network's 3x3x3 convolution (``Conv2``) in C, by Winograd F(2x2x2, 3x3x3).

ONNX Runtime runs a 3x3x3 convolution as im2col + GEMM: 27 multiply-adds per input channel and
output voxel, at about the CPU's GEMM rate. Winograd's minimal filtering computes each 2x2x2
output tile from a 4x4x4 input tile with 64 products instead of 216 (3.4x fewer), as 64 matrix
products of (tiles x Cin) by (Cin x Cout) after cheap transforms (``pdd_conv.c``, the kernels in
``pdd_kernels.inc``). The transforms are exact in real arithmetic; in float32 they add rounding
of the order of the inputs' magnitude times 1e-7 (the test bounds it against float64).

:func:`winograd_weights` transforms a Conv weight once per session; :func:`conv3x3x3` runs it.
:func:`plan_conv` finds such a convolution in a graph part (the features after the sampling)
and cuts the part around it, or says why not.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Any

import numpy as np

from pddnet.backends import native as nat
from pddnet.errors import PddnetError

#: G of F(2, 3) (4 x 3): the weight transform on each axis
_G = np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]])


def winograd_weights(weight: np.ndarray) -> np.ndarray:
    """``(Cout, Cin, 3, 3, 3)`` -> ``U (64, Cin, Cout)`` float32: ``G w G^T`` on each axis, in
    float64 (point ``x = (a * 4 + b) * 4 + c`` over the i, j, k axes)."""
    w = np.asarray(weight, dtype=np.float64)
    if w.ndim != 5 or w.shape[2:] != (3, 3, 3):
        raise PddnetError(f"winograd_weights: expected (Cout, Cin, 3, 3, 3), got {w.shape}")
    u = np.einsum("ai,bj,ck,oxijk->abcxo", _G, _G, _G, w)  # (4, 4, 4, Cin, Cout)
    return np.ascontiguousarray(u.reshape(64, w.shape[1], w.shape[0]), dtype=np.float32)


@dataclass
class ConvPlan:
    """A 3x3x3 convolution read from a graph part, and the two parts around it."""

    node: str
    x_name: str            # its input
    y_name: str            # its output (the Relu's, when a Relu follows and is fused)
    cin: int
    cout: int
    shape: tuple[int, int, int]
    u: np.ndarray          # winograd_weights of the Conv's weight
    bias: np.ndarray | None
    relu: bool
    #: the 1x1x1 Conv (+ Relu) that alone computes its input from the part's input, fused:
    #: ``(node, weight (Cin, Cpre), bias or None, relu)``; ``None``: ``before`` runs in ONNX
    #: Runtime
    pre: tuple[str, np.ndarray, np.ndarray | None, bool] | None = None
    pre_input: str = ""    # the part's input, which ``pre`` reads
    before: Any = None     # onnx.ModelProto: the part's input -> x_name (None with ``pre``)
    after: Any = None      # onnx.ModelProto: y_name -> the part's output

    def describe(self) -> dict[str, Any]:
        d = {"node": self.node, "in_channels": self.cin, "out_channels": self.cout,
             "shape": list(self.shape), "relu": self.relu, "algorithm": "winograd F(2,3)",
             "isa": conv_isa()}
        if self.pre is not None:
            d["fused_before"] = {"node": self.pre[0], "in_channels": int(self.pre[1].shape[0]),
                                 "relu": self.pre[3]}
        return d


def plan_conv(part: Any, input_name: str, output_name: str) -> ConvPlan:
    """The one float32 3x3x3 Conv (stride 1, padding 1, one group, constant weight and bias)
    of ``part`` (``onnx.ModelProto`` from ``input_name`` to ``output_name``), with a Relu
    that alone reads it fused, and the parts before and after it. Raises :class:`PddnetError`
    with the reason otherwise (an INT8 graph's Conv2 reads its weight from a
    DequantizeLinear: ONNX Runtime's int8 convolution runs it)."""
    import onnx
    from onnx import helper

    from pddnet.graph.passes.constants import constant_values
    from pddnet.graph.split import _backward, _make_part, _value_types

    g = part.graph
    consts = constant_values(g)
    convs = [n for n in g.node if n.op_type == "Conv" and n.domain in ("", "ai.onnx")
             and len(n.input) >= 2 and getattr(consts.get(n.input[1]), "shape", ())[2:]
             == (3, 3, 3)]
    if len(convs) != 1:
        producer = {o: n for n in g.node for o in n.output}
        dq = [n.name for n in g.node if n.op_type == "Conv" and len(n.input) >= 2
              and getattr(producer.get(n.input[1]), "op_type", "") == "DequantizeLinear"]
        hint = (f" (the weights of {', '.join(dq)} come from DequantizeLinear nodes: an INT8 "
                "graph, whose convolutions ONNX Runtime runs in int8)" if dq else "")
        raise PddnetError(f"{len(convs)} 3x3x3 Conv nodes with a constant float32 weight, "
                          f"expected 1{hint}")
    conv = convs[0]
    at = {a.name: helper.get_attribute_value(a) for a in conv.attribute}
    w = consts[conv.input[1]]
    want = {"strides": [1, 1, 1], "dilations": [1, 1, 1], "pads": [1] * 6}
    for key, val in want.items():
        if list(at.get(key, [1, 1, 1] if key != "pads" else [0] * 6)) != val:
            raise PddnetError(f"Conv {conv.name!r} has {key} {list(at.get(key, []))}, "
                              f"the C convolution takes {val}")
    if at.get("group", 1) != 1 or at.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise PddnetError(f"Conv {conv.name!r} has group {at.get('group', 1)} / auto_pad "
                          f"{at.get('auto_pad')}: the C convolution takes one group, pads")
    if w.dtype != np.float32:
        raise PddnetError(f"Conv {conv.name!r} has a {w.dtype} weight, not float32")
    bias = None
    if len(conv.input) > 2 and conv.input[2]:
        bias = consts.get(conv.input[2])
        if bias is None or bias.dtype != np.float32 or bias.shape != (w.shape[0],):
            raise PddnetError(f"Conv {conv.name!r} has no constant float32 ({w.shape[0]},) bias")
    types = dict(_value_types(part))
    xt = types.get(conv.input[0])
    dims = [d.dim_value if d.HasField("dim_value") else -1
            for d in xt.tensor_type.shape.dim] if xt is not None else []
    if xt is None or xt.tensor_type.elem_type != onnx.TensorProto.FLOAT or len(dims) != 5 \
            or dims[0] != 1 or dims[1] != w.shape[1] or min(dims) < 1:
        raise PddnetError(f"the input of Conv {conv.name!r} is not a static float32 "
                          f"(1, {w.shape[1]}, I, J, K) tensor")
    readers = [n for n in g.node if conv.output[0] in n.input]
    outs = {o.name for o in g.output}
    relu = len(readers) == 1 and readers[0].op_type == "Relu" and conv.output[0] not in outs
    y_name = readers[0].output[0] if relu else conv.output[0]
    plan = ConvPlan(node=conv.name, x_name=conv.input[0], y_name=y_name, cin=int(w.shape[1]),
                    cout=int(w.shape[0]), shape=tuple(dims[2:]), u=winograd_weights(w),
                    bias=bias, relu=relu)
    if plan.x_name == input_name or y_name == output_name:
        raise PddnetError(f"Conv {conv.name!r} reads the part's input or writes its output")
    plan.pre = _pointwise_before(g, consts, plan.x_name, input_name, outs)
    plan.pre_input = input_name
    try:
        before = _backward(g, [plan.x_name], stop={input_name}, part="features")
        after = _backward(g, [output_name], stop={y_name}, part="features")
    except PddnetError as exc:
        raise PddnetError(f"the part does not cut at Conv {conv.name!r}: {exc}") from exc
    fused = {tuple(conv.output)} | ({tuple(readers[0].output)} if relu else set())
    key = lambda n: tuple(n.output)  # noqa: E731
    if any(key(n) in fused for n in before + after) or \
            {key(n) for n in before} & {key(n) for n in after}:
        raise PddnetError(f"the part does not cut at Conv {conv.name!r}")
    types[y_name] = helper.make_tensor_type_proto(onnx.TensorProto.FLOAT,
                                                  (1, plan.cout, *plan.shape))
    if plan.pre is None:
        plan.before = _make_part(part, before, "features_conv_in",
                                 inputs=[(input_name, input_name)],
                                 outputs=[(plan.x_name, plan.x_name)], types=types)
    plan.after = _make_part(part, after, "features_conv_out", inputs=[(y_name, y_name)],
                            outputs=[(output_name, output_name)], types=types)
    return plan


def _pointwise_before(g, consts, x_name: str, input_name: str, outs: set[str]):
    """``(node, W (Cpre, Cin), bias, relu)`` when ``x_name`` is ``[Relu](Conv_1x1x1(input))``
    with a constant float32 weight (stride 1, no padding, one group) and nothing else reads
    the intermediate tensors; else ``None``."""
    from onnx import helper

    producer = {o: n for n in g.node for o in n.output}
    readers: dict[str, int] = {}
    for n in g.node:
        for x in n.input:
            readers[x] = readers.get(x, 0) + 1
    node, relu = producer.get(x_name), False
    if node is not None and node.op_type == "Relu" and node.input[0] not in outs and \
            readers.get(node.input[0]) == 1:
        node, relu = producer.get(node.input[0]), True
    if node is None or node.op_type != "Conv" or node.domain not in ("", "ai.onnx") or \
            node.input[0] != input_name or len(node.input) < 2:
        return None
    w = consts.get(node.input[1])
    at = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if w is None or w.dtype != np.float32 or w.ndim != 5 or w.shape[2:] != (1, 1, 1) or \
            at.get("group", 1) != 1 or any(v != 1 for v in at.get("strides", [1])) or \
            any(v != 1 for v in at.get("dilations", [1])) or any(at.get("pads", [0])) or \
            at.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        return None
    b = consts.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if len(node.input) > 2 and node.input[2] and (b is None or b.shape != (w.shape[0],)):
        return None
    wt = np.ascontiguousarray(w.reshape(w.shape[0], w.shape[1]).T, dtype=np.float32)
    return (node.name, wt, None if b is None else np.asarray(b, np.float32), relu)


def work_floats(cin: int, cout: int, shape, threads: int) -> int:
    """Floats of the work buffer :func:`conv3x3x3` needs (the input channels-last, scratch)."""
    lib = _lib()
    n = lib.pdd_conv3_work_floats(_ints(cin, cout, shape, False, threads, -1, 0, False))
    if n < 0:
        raise PddnetError(f"conv3x3x3: invalid sizes Cin={cin}, Cout={cout}, shape={shape}")
    return int(n)


def conv3x3x3(x: np.ndarray, u: np.ndarray, bias: np.ndarray | None, *, relu: bool = False,
              pre: tuple[np.ndarray, np.ndarray | None, bool] | None = None,
              threads: int = 1, isa: str | None = None, out: np.ndarray | None = None,
              work: np.ndarray | None = None) -> np.ndarray:
    """``[relu](conv3d(x, w, padding=1) + bias)`` with ``u = winograd_weights(w)``; with
    ``pre = (W (Cpre, Cin), b, relu_pre)`` of ``x = [relu_pre](W^T x_pre + b)``, ``x`` is
    ``x_pre`` and that 1x1x1 convolution runs first, into the channels-last input.

    Args:
        x: ``(1, Cin, I, J, K)`` float32 (``(1, Cpre, I, J, K)`` with ``pre``).
        u: ``(64, Cin, Cout)`` float32 from :func:`winograd_weights`.
        bias: ``(Cout,)`` or ``None``.
        threads: pthreads over tile blocks (results do not depend on it).
        isa: the kernel set (``None``: :func:`conv_isa`).
        out, work: arrays to reuse (``(1, Cout, I, J, K)``; :func:`work_floats` floats).
    """
    lib = _lib()
    x = np.ascontiguousarray(x, dtype=np.float32)
    u = np.ascontiguousarray(u, dtype=np.float32)
    if x.ndim != 5 or x.shape[0] != 1 or min(x.shape) < 1:
        raise PddnetError(f"conv3x3x3: x must be (1, Cin, I, J, K), got {x.shape}")
    cin, shape = x.shape[1], x.shape[2:]
    wp = bp = None
    if pre is not None:
        wp = np.ascontiguousarray(pre[0], dtype=np.float32)
        if wp.ndim != 2 or wp.shape[0] != cin:
            raise PddnetError(f"conv3x3x3: the 1x1x1 weight must be ({cin}, Cin), got "
                              f"{wp.shape}")
        cin = wp.shape[1]
        if pre[1] is not None:
            bp = np.ascontiguousarray(pre[1], dtype=np.float32)
            if bp.shape != (cin,):
                raise PddnetError(f"conv3x3x3: the 1x1x1 bias must be ({cin},), got {bp.shape}")
    if u.ndim != 3 or u.shape[:2] != (64, cin):
        raise PddnetError(f"conv3x3x3: u must be (64, {cin}, Cout), got {u.shape}")
    cout = u.shape[2]
    b = None
    if bias is not None:
        b = np.ascontiguousarray(bias, dtype=np.float32)
        if b.shape != (cout,):
            raise PddnetError(f"conv3x3x3: bias must be ({cout},), got {b.shape}")
    want = (1, cout, *shape)
    if out is None:
        out = np.empty(want, np.float32)
    elif out.shape != want or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise PddnetError(f"conv3x3x3: out must be a C-contiguous float32 {want} array")
    nwork = work_floats(cin, cout, shape, threads)
    if work is None:
        work = np.empty(nwork, np.float32)
    elif work.size < nwork or work.dtype != np.float32 or not work.flags.c_contiguous:
        raise PddnetError(f"conv3x3x3: work must be >= {nwork} contiguous float32")
    isa = isa or conv_isa()
    if isa not in nat.ISAS:
        raise PddnetError(f"conv3x3x3: unknown kernel set {isa!r}; one of {nat.ISAS}")
    isa_id = nat.ISAS.index(isa)
    fp = ctypes.POINTER(ctypes.c_float)
    ptr = lambda a: None if a is None else a.ctypes.data_as(fp)  # noqa: E731
    ints = _ints(cin, cout, shape, relu, threads, isa_id, 0 if wp is None else x.shape[1],
                 bool(pre[2]) if pre is not None else False)
    rc = lib.pdd_conv3_winograd(ints, ptr(u), ptr(b), ptr(wp), ptr(bp), ptr(x), ptr(out),
                                ptr(work))
    if rc == -3:
        raise PddnetError(f"conv3x3x3: the {isa} kernel set is not available on this CPU")
    if rc != 0:
        raise PddnetError(f"conv3x3x3: the C library refused the arguments (status {rc})")
    return out


def conv_isa() -> str:
    """The kernel set the convolution runs: ``PDDNET_NATIVE``'s set, or for ``auto`` AVX-512
    where this CPU has it (faster here for this compute-bound kernel, unlike the head's
    memory-bound passes: docs/benchmarks.md), else the head's automatic choice."""
    req = nat.requested_isa()
    if req == "off":
        raise PddnetError(f"the C convolution is off: {nat.ENV}=off")
    if req != "auto":
        return req
    lib = _lib()
    if lib.pdd_isa_available(nat.ISAS.index("avx512")):
        return "avx512"
    isa = nat.status()["isa"]
    if isa is None:
        raise PddnetError(f"the C convolution is off: {nat.status()['reason']}")
    return isa


def _lib() -> ctypes.CDLL:
    lib = nat._load()
    if lib is None:
        raise PddnetError(nat._lib_error or "the C kernel library is not available")
    return lib


def _ints(cin, cout, shape, relu, threads, isa_id, cpre, relu_pre):
    return (ctypes.c_int * 10)(int(cin), int(cout), *(int(s) for s in shape), int(bool(relu)),
                               max(1, int(threads)), int(isa_id), int(cpre), int(relu_pre))
