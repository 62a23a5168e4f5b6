"""ONNX local-function bodies of the ``ai.pddnet`` custom ops (specs: docs/ops.md).

Each body is made of standard ONNX ops (opset 20) so that an exported model runs on any ONNX
runtime with nothing registered. Bodies are specialised at export to the model's fixed shapes
and attribute values (all nodes of one op type in a model share them); the node attributes
describe the same values and are what a TensorRT plugin binds to.

The bodies are written for speed on CPUs, not as literal transcriptions of the reference:
every trilinear sampling on a regular lattice is separable, so it becomes small interpolation
matrices and batched MatMuls; the correlation never materialises the sampled moving features;
poolings whose ONNX Runtime kernels are slow become MatMuls with banded matrices. The
reference functions in ``pddnet.model.ops`` are the definitions they are tested against.
Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper

from pddnet.errors import PddnetError
from pddnet.graph.builder import Builder
from pddnet.spec.contract import DOMAIN, DOMAIN_VERSION, OPSET, PLUGIN_NAMESPACE, PLUGIN_VERSION

# ---------------------------------------------------------------------------------------------
# numpy twins of the reference's coordinate helpers (the exporter must not need torch)
# ---------------------------------------------------------------------------------------------


def cell_centres(n: int) -> np.ndarray:
    """Normalised coordinates of the ``n`` voxel centres (``align_corners=False``)."""
    return (2.0 * np.arange(n) + 1.0) / n - 1.0


def interp_matrix(positions: np.ndarray, n: int) -> np.ndarray:
    """``(..., P, n)`` trilinear weights of normalised ``positions`` on an axis of ``n`` voxels
    (border clamp): the numpy twin of ``pddnet.model.ops.interp_weights``."""
    v = np.clip(((np.asarray(positions, dtype=np.float64) + 1.0) * n - 1.0) / 2.0, 0.0, n - 1.0)
    return np.maximum(0.0, 1.0 - np.abs(v[..., None] - np.arange(n)))


def smoothing_matrix(n: int) -> np.ndarray:
    """``(n, n)``: replicate-pad by 2 then two valid 3-averages (one axis of ``smooth3``)."""
    pad = np.concatenate([[0, 0], np.arange(n), [n - 1, n - 1]])  # replicate padding
    box = np.zeros((n + 2, n + 4))
    for r in range(n + 2):
        box[r, r:r + 3] = 1.0 / 3.0
    box2 = np.zeros((n, n + 2))
    for r in range(n):
        box2[r, r:r + 3] = 1.0 / 3.0
    expand = np.zeros((n + 4, n))
    expand[np.arange(n + 4), pad] = 1.0
    return box2 @ box @ expand


def displacement_steps(disp_size: int, capture: float) -> np.ndarray:
    return np.linspace(-capture, capture, disp_size)


def displacement_set(disp_size: int, capture: float) -> np.ndarray:
    """``(L^3, 3)`` candidate displacements in the reference's order (``i`` slowest)."""
    d = displacement_steps(disp_size, capture)
    return np.stack(np.meshgrid(d, d, d, indexing="ij"), -1).reshape(-1, 3)


# ---------------------------------------------------------------------------------------------
# Function registry
# ---------------------------------------------------------------------------------------------


@dataclass
class FunctionSet:
    """The local functions a model needs, keyed by op type; one specialisation each."""

    dtype: np.dtype = field(default_factory=lambda: np.dtype(np.float32))
    functions: dict[str, onnx.FunctionProto] = field(default_factory=dict)
    signatures: dict[str, tuple] = field(default_factory=dict)

    def add(self, op_type: str, signature: tuple, build) -> None:
        if op_type in self.signatures:
            if self.signatures[op_type] != signature:
                raise PddnetError(f"{op_type} is used with two different shapes/attributes in one "
                                 f"model ({self.signatures[op_type]} vs {signature}); local "
                                 f"functions are specialised per model")
            return
        self.signatures[op_type] = signature
        self.functions[op_type] = build()

    def as_list(self) -> list[onnx.FunctionProto]:
        return list(self.functions.values())


def _function(op_type: str, inputs, outputs, body: Builder, attributes) -> onnx.FunctionProto:
    return helper.make_function(
        DOMAIN, op_type, list(inputs), list(outputs), body.nodes,
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(DOMAIN, DOMAIN_VERSION)],
        attributes=list(attributes) + ["plugin_namespace", "plugin_version"],
        doc_string=f"{DOMAIN}::{op_type}, see docs/ops.md (specialised to this model's shapes)",
    )


def custom_node(b: Builder, op_type: str, inputs, **attrs) -> str:
    """A node in the custom domain carrying the plugin binding attributes."""
    return b.op(op_type, *inputs, domain=DOMAIN, hint=op_type, plugin_namespace=PLUGIN_NAMESPACE,
                plugin_version=PLUGIN_VERSION, **attrs)


# ---------------------------------------------------------------------------------------------
# DeformableSample3D
# ---------------------------------------------------------------------------------------------


def deformable_sample_function(in_shape, n_offsets: int, output_shape, dtype) -> onnx.FunctionProto:
    """Body of ``DeformableSample3D``: X ``(1, C, I, J, K)``, offsets ``(S, 3)``.

    Interpolation matrices are built in the graph from the offsets input (so trained or
    edited offsets stay live): ``W_a = Relu(1 - |clip(v) - arange(n_a)|)``; then three batched
    MatMuls, one per axis.

    With ``dtype`` float16, ``X`` and ``Y`` are float16 but ``offsets`` stay float32 and the
    sampling coordinates and weights are computed in float32 (a voxel coordinate near 64 has
    a float16 spacing of 1/32 voxel), then cast to float16 for the MatMuls -- as the plugin
    spec says: float16 ``X``/``Y``, offsets any float.
    """
    _, c, ni, nj, nk = (int(s) for s in in_shape)
    s = int(n_offsets)
    oi, oj, ok = (int(o) for o in output_shape)
    b = Builder("DeformableSample3D", function=True, dtype=dtype)
    f32 = np.float32
    mats = []
    for axis, (n, o) in enumerate(zip((ni, nj, nk), (oi, oj, ok))):
        off = b.op("Slice", "offsets", b.ints([axis]), b.ints([axis + 1]), b.ints([1]))  # (S,1)
        pos = b.op("Add", off, b.const(cell_centres(o)[None, :], dtype=f32))  # (S, o)
        v = b.op("Add", b.op("Mul", pos, b.const(n / 2.0, dtype=f32)),
                 b.const((n - 1) / 2.0, dtype=f32))
        v = b.op("Clip", v, b.const(0.0, dtype=f32), b.const(float(n - 1), dtype=f32))
        dist = b.op("Sub", b.op("Unsqueeze", v, b.ints([-1])),
                    b.const(np.arange(n, dtype=np.float64)[None, None], dtype=f32))
        w = b.op("Relu", b.op("Sub", b.const(1.0, dtype=f32), b.op("Abs", dist)))  # (S, o, n)
        if b.dtype != np.dtype(f32):
            w = b.op("Cast", w, to=helper.np_dtype_to_tensor_dtype(b.dtype), hint="Cast")
        mats.append(w)
    x = b.reshape("X", (c, 1, ni, nj * nk))
    y = b.matmul(mats[0], x)  # (C, S, oi, nj*nk)
    y = b.reshape(y, (c, s, oi, nj, nk))
    y = b.matmul(b.reshape(mats[1], (s, 1, oj, nj)), y)  # (C, S, oi, oj, nk)
    wk_t = b.reshape(b.op("Transpose", mats[2], perm=[0, 2, 1]), (s, 1, nk, ok))
    y = b.matmul(y, wk_t)  # (C, S, oi, oj, ok)
    b.op("Reshape", y, b.ints((1, c * s, oi, oj, ok)), outputs=["Y"])
    return _function("DeformableSample3D", ["X", "offsets"], ["Y"], b, ["output_shape"])


# ---------------------------------------------------------------------------------------------
# Correlation
# ---------------------------------------------------------------------------------------------


def correlation_function(feat_shape, grid, disp_size: int, capture: float,
                         dtype) -> onnx.FunctionProto:
    """Body of ``Correlation``: SSD of fixed features at control points and moving features at
    every displaced point, without materialising the ``C x G^3 x L^3`` moving samples.

    One slab per control-grid slice ``g_i`` (bounding memory; the slabs are unrolled):

    1. ``T1 = W_i[g_i] @ M``: moving features interpolated along ``i``, ``(C, L, J, K)``.
    2. ``T2 = W_j @ T1`` per control index ``g_j``: ``(G_j, C, L, L, K)``.
    3. ``cross = (-2 f[g_i, g_j]) @ T2`` over channels, then ``@ W_k^T`` per ``g_k``:
       the ``-2 f.m`` term, ``(G_j, G_k, L, L, L)``.
    4. ``|m|^2`` from channel Gram terms, never from the interpolated features: trilinear
       weights have two taps per axis, so ``|m|^2`` is a quadratic form in the weights over
       the Gram terms ``A_oo'[b, e] = sum_c T1[c, b + o, e + o'] ...`` of neighbouring voxels
       of ``T1`` (small). They are interpolated along ``j`` with products of weights into
       ``G0[e] = sum_c T2[e]^2`` and ``G1[e] = sum_c T2[e] T2[e+1]``, then along ``k``:
       ``|m|^2 = sum_e W_k[e]^2 G0[e] + 2 W_k[e] W_k[e+1] G1[e]``.
    5. ``cost = |f|^2 + cross + |m|^2``.
    """
    _, c, ni, nj, nk = (int(s) for s in feat_shape)
    gi, gj, gk = (int(g) for g in grid)
    L = int(disp_size)
    steps = displacement_steps(L, capture)
    pos = [cell_centres(g)[:, None] + steps[None, :] for g in (gi, gj, gk)]  # (G_a, L)
    ai = interp_matrix(cell_centres(gi), ni)  # control points, (G, n)
    aj = interp_matrix(cell_centres(gj), nj)
    ak = interp_matrix(cell_centres(gk), nk)
    wi = interp_matrix(pos[0], ni)  # (Gi, L, ni)
    wj = interp_matrix(pos[1], nj)  # (Gj, L, nj)
    wk = interp_matrix(pos[2], nk)  # (Gk, L, nk)
    # quadratic-form weights: along j for the Gram terms, along k for |m|^2 (both 2-tap)
    wj_sq = wj ** 2                                   # same voxel twice
    wj_pair = wj[:, :, :-1] * wj[:, :, 1:]            # voxels b and b+1
    wk_norm_t = np.concatenate([wk ** 2, 2.0 * wk[:, :, :-1] * wk[:, :, 1:]],
                               axis=2).transpose(0, 2, 1)  # (Gk, 2nk-1, L): [G0; G1] -> |m|^2

    b = Builder("Correlation", function=True, dtype=dtype)
    # fixed features at the control points: (Gi, Gj, Gk, C) and |f|^2
    f = b.reshape("feat_fixed", (c, ni, nj * nk))
    f = b.matmul(b.const(ai), f)  # (C, Gi, nj*nk)
    f = b.reshape(f, (c * gi, nj, nk))
    f = b.matmul(b.const(aj), f)  # (C*Gi, Gj, nk)
    f = b.matmul(f, b.const(ak.T))  # (C*Gi, Gj, Gk)
    f = b.op("Transpose", b.reshape(f, (c, gi, gj, gk)), perm=[1, 2, 0, 3])  # (Gi, Gj, C, Gk)
    f_sq = b.op("ReduceSumSquare", f, b.ints([2]), keepdims=1)  # (Gi, Gj, 1, Gk)
    f_sq = b.reshape(b.op("Transpose", f_sq, perm=[0, 1, 3, 2]), (gi, gj, gk, 1, 1))
    f_neg2 = b.op("Transpose", b.op("Mul", f, b.const(-2.0)), perm=[0, 1, 3, 2])  # (Gi,Gj,Gk,C)

    m = b.reshape("feat_moving", (c, ni, nj * nk))
    wj_b = b.const(wj.reshape(gj, 1, 1, L, nj))
    wk_t_c = b.const(wk.transpose(0, 2, 1)[None])  # (1, Gk, nk, L)
    wk_norm_c = b.const(wk_norm_t[None])          # (1, Gk, 2nk-1, L)
    wj_sq_c = b.const(wj_sq.reshape(gj, 1, L, nj))
    wj_pair_c = b.const(wj_pair.reshape(gj, 1, L, nj - 1))
    wj_pair2_c = b.const(2.0 * wj_pair.reshape(gj, 1, L, nj - 1))

    def gram(x, y):  # sum over channels of x * y: (C, L, B, E) -> (1, L, B, E)
        return b.op("ReduceSum", b.op("Mul", x, y), b.ints([0]), keepdims=0)

    def part(x, j0, j1, k0, k1):  # T1[:, :, j0:j1, k0:k1]
        return b.op("Slice", x, b.ints([j0, k0]), b.ints([j1, k1]), b.ints([2, 3]))

    def take(x, i):  # x[i] along axis 0 (the index constant has shape (1,): keeps that axis)
        y = b.op("Gather", x, b.ints(i), axis=0)
        if b.dtype != np.dtype(np.float32):
            # drop the axis in float16 bodies: with the (1, ...) slab the float16 graph crashes
            # ONNX Runtime 1.32's NCHWc layout pass (segfault at session creation)
            y = b.op("Squeeze", y, b.ints([0]))
        return y

    slabs = []
    for i0 in range(gi):
        t1 = b.reshape(b.matmul(b.const(wi[i0]), m), (c, L, nj, nk))  # (C, L, nj, nk)
        t2 = b.matmul(wj_b, b.reshape(t1, (1, c, L, nj, nk)))  # (Gj, C, L, L, nk)
        # cross term: contract channels with -2 f, then interpolate along k
        f_slab = take(f_neg2, i0)  # (1, Gj, Gk, C)
        cross = b.matmul(f_slab, b.reshape(t2, (gj, c, L * L * nk)))  # (Gj, Gk, L*L*nk)
        cross = b.matmul(b.reshape(cross, (gj, gk, L * L, nk)), wk_t_c)  # (Gj, Gk, L*L, L)
        # |m|^2: Gram terms of T1 neighbours (b, e), interpolated along j, then along k
        a00 = b.op("ReduceSumSquare", t1, b.ints([0]), keepdims=0)  # (L, nj, nk)
        a01 = gram(part(t1, 0, nj, 0, nk - 1), part(t1, 0, nj, 1, nk))
        a10 = gram(part(t1, 0, nj - 1, 0, nk), part(t1, 1, nj, 0, nk))
        a11 = b.op("Add", gram(part(t1, 0, nj - 1, 0, nk - 1), part(t1, 1, nj, 1, nk)),
                   gram(part(t1, 0, nj - 1, 1, nk), part(t1, 1, nj, 0, nk - 1)))
        # (Gj, dx, dy, e): G0 = sum_b wj^2 a00 + 2 wj wj' a10; G1 = wj^2 a01 + wj wj' a11
        g0 = b.op("Add", b.matmul(wj_sq_c, a00), b.matmul(wj_pair2_c, a10))
        g1 = b.op("Add", b.matmul(wj_sq_c, a01), b.matmul(wj_pair_c, a11))
        g = b.reshape(b.op("Concat", g0, g1, axis=3), (gj, 1, L * L, 2 * nk - 1))
        norm = b.matmul(g, wk_norm_c)  # (Gj, Gk, L*L, L)
        cost = b.reshape(b.op("Add", cross, norm), (gj, gk, L, L, L))
        fs = take(f_sq, i0)  # (1, Gj, Gk, 1, 1) -> unsqueezed below
        slabs.append(b.op("Add", cost, b.op("Unsqueeze", fs, b.ints([-1]))))
    out = b.op("Concat", *slabs, axis=0) if len(slabs) > 1 else slabs[0]
    b.op("Reshape", out, b.ints((gi, gj, gk, L, L, L)), outputs=["cost"])
    return _function("Correlation", ["feat_fixed", "feat_moving"], ["cost"], b,
                     ["grid", "disp_size", "capture"])


# ---------------------------------------------------------------------------------------------
# MinConv and MeanFieldStep
# ---------------------------------------------------------------------------------------------


def _body_builder(name: str, dtype) -> Builder:
    """A function-body builder in ``dtype``, or a type-polymorphic one (constants
    ``CastLike`` the formal input ``cost``) when ``dtype`` is ``None``: one local function for
    float32 and float16 call sites of the same op (docs/precision.md)."""
    if dtype is None:
        return Builder(name, function=True, dtype=np.float32, like="cost")
    return Builder(name, function=True, dtype=dtype)


def minconv_function(grid, disp_size: int, mode: str, dtype,
                     max_broadcast: int = 1 << 27) -> onnx.FunctionProto:
    """Body of ``MinConv`` on ``(Gi, Gj, Gk, L, L, L)``.

    ``dtype`` ``None`` builds a type-polymorphic body (see :func:`_body_builder`).

    ``approx``: ``MaxPool`` of the negated cost (a min-pool with clipped windows) and the
    smoothing as three banded-matrix MatMuls, one per displacement axis, the sign folded into
    the first. ``exact``: per axis ``ReduceMin(x[j] + p (i - j)^2)`` over a broadcast
    ``(..., L, L)`` tensor, in chunks along ``G_i`` that bound its size.
    """
    gi, gj, gk = (int(g) for g in grid)
    L = int(disp_size)
    k = gi * gj * gk
    b = _body_builder("MinConv", dtype)
    if mode == "approx":
        v = b.reshape(b.op("Neg", "cost"), (k, 1, L, L, L))
        v = b.op("MaxPool", v, kernel_shape=[3, 3, 3], strides=[1, 1, 1], pads=[1] * 6)
        smooth = smoothing_matrix(L)
        v = b.matmul(b.const(-smooth), b.reshape(v, (k, L, L * L)))     # along d_i (sign back)
        v = b.matmul(b.const(smooth), b.reshape(v, (k * L, L, L)))      # along d_j
        v = b.matmul(b.reshape(v, (k * L * L, L)), b.const(smooth.T))   # along d_k
        b.op("Reshape", v, b.ints((gi, gj, gk, L, L, L)), outputs=["output"])
        inputs = ["cost"]
    elif mode == "exact":
        sq = (np.arange(L)[:, None] - np.arange(L)[None, :]) ** 2.0  # (out i, in j)
        quad = b.op("Mul", "penalty", b.const(sq))  # (L, L)
        per_row = k // gi * L ** 4  # broadcast elements per G_i slice
        chunk = max(1, min(gi, max_broadcast // per_row))
        parts = []
        for i0 in range(0, gi, chunk):
            n = min(chunk, gi - i0)
            x = b.op("Slice", "cost", b.ints([i0]), b.ints([i0 + n]), b.ints([0]))
            x = b.reshape(x, (n * gj * gk, L, L, L))
            for axis in (1, 2, 3):
                trailing = 3 - axis
                q = b.reshape(quad, (L, L) + (1,) * trailing)
                x = b.op("ReduceMin", b.op("Add", b.op("Unsqueeze", x, b.ints([axis])), q),
                         b.ints([axis + 1]), keepdims=0)
            parts.append(x)
        out = b.op("Concat", *parts, axis=0) if len(parts) > 1 else parts[0]
        b.op("Reshape", out, b.ints((gi, gj, gk, L, L, L)), outputs=["output"])
        inputs = ["cost", "penalty"]
    else:
        raise PddnetError(f"MinConv: unknown mode {mode!r}")
    return _function("MinConv", inputs, ["output"], b, ["mode"])


def mean_field_function(grid, disp_size: int, mode: str, dtype) -> onnx.FunctionProto:
    """Body of ``MeanFieldStep``: ``MinConv`` then grid smoothing as three MatMuls."""
    gi, gj, gk = (int(g) for g in grid)
    L3 = int(disp_size) ** 3
    b = _body_builder("MeanFieldStep", dtype)
    inputs = ["cost"] + (["penalty"] if mode == "exact" else [])
    y = custom_node(b, "MinConv", inputs, mode=mode)
    y = b.matmul(b.const(smoothing_matrix(gi)), b.reshape(y, (gi, gj * gk * L3)))
    y = b.matmul(b.const(smoothing_matrix(gj)), b.reshape(y, (gi, gj, gk * L3)))
    y = b.matmul(b.const(smoothing_matrix(gk)), b.reshape(y, (gi * gj, gk, L3)))
    L = int(disp_size)
    b.op("Reshape", y, b.ints((gi, gj, gk, L, L, L)), outputs=["output"])
    return _function("MeanFieldStep", inputs, ["output"], b, ["mode"])
