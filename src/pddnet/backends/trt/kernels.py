"""Triton kernels of the TensorRT plugins, one per custom op of ``docs/ops.md``, and launchers.

The kernels are the bodies of the ``pddnet::<OpType>`` TensorRT plugins
(:mod:`pddnet.backends.trt.plugins`): compiled to PTX for an engine that runs with no Python
(:func:`compile_aot`), or launched from Python on TensorRT's stream (the launchers below).
With ``TRITON_INTERPRET=1`` set *before* this module is imported they run on the CPU on torch
CPU tensors, which is how ``tests/backends/test_kernels.py`` checks them against
:mod:`pddnet.model.ops`.

Launchers (torch tensors in, torch tensor out; float32 or float16; the result has the
input's dtype, every kernel accumulates in float32):

- :func:`deformable_sample` — ``DeformableSample3D``
- :func:`correlation` — ``Correlation`` (fused: the moving features are sampled and the squared
  differences summed over channels in registers; the ``C x G^3 x L^3`` samples never exist)
- :func:`minconv` — ``MinConv``, modes ``approx`` and ``exact``
- :func:`mean_field_step` — ``MeanFieldStep`` (two kernels: min-convolution, grid smoothing)

The fused head (:mod:`pddnet.backends.trt.head`, TensorRT-only ops, one kernel each):

- :func:`minconv_affine` — ``MinConvAffine``: ``MinConv(a x + b y + c)``, the mean-field input
  combination formed in the load
- :func:`grid_smooth` — ``GridSmooth``: the grid smoothing alone
- :func:`displacement_head` — ``DisplacementHead[Probs]``: the last grid smoothing, softmax,
  expectation and entropy (and optionally the probabilities) in one online-softmax sweep
- :func:`fused_head` — the four launches together (what the rewritten engine head runs)

Importing this module never fails for a missing triton: the kernels are then plain functions
that are never run, and every launcher raises :class:`~pddnet.errors.PddnetError` naming the
extra to install. ``import pddnet.export`` does not import this module.

Kernel argument order is TensorRT's AOT calling convention: input pointers, then int32
scalars, then output pointers, then ``tl.constexpr`` parameters (which are compiled in).
All tensors are contiguous (TensorRT's LINEAR format). Offsets inside one channel or one
control point's row are int32; channel and row base addresses are 64-bit (int64 offsets or
pointer increments), so only a single channel / row must stay below 2^31 elements.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

from pddnet._optional import require
from pddnet.errors import PddnetError

try:  # guarded: the module must import without triton (see the module docstring)
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    import types as _types

    triton = None
    tl = _types.SimpleNamespace(constexpr=None)


def _jit(**options):
    """``triton.jit(**options)``, or the identity without triton (the kernel is never run)."""
    if triton is None:
        return lambda fn: fn
    return triton.jit(**options)


_PURPOSE = "the Triton kernels of the TensorRT plugins (pddnet.backends.trt.kernels)"

#: Launch configuration per kernel (block sizes are powers of two; masks handle the tails).
DEFORM_BLOCK = 256
DEFORM_WARPS = 4
CORR_BLOCK_D = 128
CORR_WARPS = 4
SMOOTH_TILE = 4096  # elements of the (G_k x BLOCK_D) tile of the grid-smoothing kernel
SMOOTH_WARPS = 4

#: Default ``triton.backends.compiler.GPUTarget`` of :func:`compile_aot`; ``None`` means the
#: current CUDA device (the engine-building GPU). Set it to compile without a GPU (tests).
AOT_TARGET = None


def _triton():
    return require("triton", _PURPOSE)


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def minconv_block(disp_size: int) -> int:
    """Elements held by one min-convolution program: the whole ``L^3`` cube, padded."""
    return next_pow2(disp_size ** 3)


def minconv_warps(disp_size: int) -> int:
    return 4 if minconv_block(disp_size) <= 1024 else 8


def float_bits(value: float) -> int:
    """The float32 bit pattern of ``value`` as a signed int32 (scalar kernel args are int32)."""
    return struct.unpack("<i", struct.pack("<f", float(value)))[0]


# =============================================================================================
# Kernels
# =============================================================================================

@_jit()
def _axis_coords(pos, n):
    """Trilinear taps along one axis at normalised ``pos`` (border clamp, align_corners=False).

    Returns the lower voxel index, the upper one (clamped) and the weight of the upper one.
    """
    v = ((pos + 1.0) * n - 1.0) * 0.5
    v = tl.minimum(tl.maximum(v, 0.0), (n - 1) * 1.0)
    v0 = tl.floor(v)
    w1 = v - v0
    i0 = v0.to(tl.int32)
    i1 = tl.minimum(i0 + 1, n - 1)
    return i0, i1, w1


@_jit()
def _corners(i0, i1, wi, j0, j1, wj, J, K):
    """Row offsets ``(i*J + j)*K`` and bilinear weights of the four ``(i, j)`` corners."""
    return ((i0 * J + j0) * K, (i0 * J + j1) * K, (i1 * J + j0) * K, (i1 * J + j1) * K,
            (1.0 - wi) * (1.0 - wj), (1.0 - wi) * wj, wi * (1.0 - wj), wi * wj)


@_jit()
def _trilinear(ptr, r00, r01, r10, r11, w00, w01, w10, w11, k0, k1, wk, mask):
    """Trilinear sample of one channel from its eight taps, in float32."""
    v = w00 * ((1.0 - wk) * tl.load(ptr + r00 + k0, mask=mask, other=0.0).to(tl.float32)
               + wk * tl.load(ptr + r00 + k1, mask=mask, other=0.0).to(tl.float32))
    v += w01 * ((1.0 - wk) * tl.load(ptr + r01 + k0, mask=mask, other=0.0).to(tl.float32)
                + wk * tl.load(ptr + r01 + k1, mask=mask, other=0.0).to(tl.float32))
    v += w10 * ((1.0 - wk) * tl.load(ptr + r10 + k0, mask=mask, other=0.0).to(tl.float32)
                + wk * tl.load(ptr + r10 + k1, mask=mask, other=0.0).to(tl.float32))
    v += w11 * ((1.0 - wk) * tl.load(ptr + r11 + k0, mask=mask, other=0.0).to(tl.float32)
                + wk * tl.load(ptr + r11 + k1, mask=mask, other=0.0).to(tl.float32))
    return v


@_jit(do_not_specialize=["C", "I", "J", "K", "PO", "QO", "RO"])
def _deformable_sample_kernel(x_ptr, off_ptr, C, I, J, K, PO, QO, RO, y_ptr,
                              BLOCK: tl.constexpr):
    """``Y[0, c*S + s, p, q, r] = trilinear(X[0, c], u_pqr + o_s)``.

    Grid ``(cdiv(I'*J'*K', BLOCK), S)``: a program owns ``BLOCK`` consecutive output voxels
    (innermost ``r`` fastest, so stores and the gathers of neighbouring voxels are coalesced)
    of one offset ``s``; the eight taps and weights are computed once and reused for every
    channel.
    """
    pid = tl.program_id(0)
    s = tl.program_id(1)
    S = tl.num_programs(1)
    P = PO * QO * RO
    n = pid * BLOCK + tl.arange(0, BLOCK)
    mask = n < P
    r = n % RO
    q = (n // RO) % QO
    p = n // (RO * QO)
    oi = tl.load(off_ptr + s * 3 + 0).to(tl.float32)
    oj = tl.load(off_ptr + s * 3 + 1).to(tl.float32)
    ok = tl.load(off_ptr + s * 3 + 2).to(tl.float32)
    ui = (2 * p + 1).to(tl.float32) / (PO * 1.0) - 1.0 + oi
    uj = (2 * q + 1).to(tl.float32) / (QO * 1.0) - 1.0 + oj
    uk = (2 * r + 1).to(tl.float32) / (RO * 1.0) - 1.0 + ok
    i0, i1, wi = _axis_coords(ui, I)
    j0, j1, wj = _axis_coords(uj, J)
    k0, k1, wk = _axis_coords(uk, K)
    r00, r01, r10, r11, w00, w01, w10, w11 = _corners(i0, i1, wi, j0, j1, wj, J, K)
    xc = x_ptr  # channel pointers advance by one volume per iteration (64-bit arithmetic)
    yc = y_ptr + s.to(tl.int64) * P
    for _c in range(0, C):
        v = _trilinear(xc, r00, r01, r10, r11, w00, w01, w10, w11, k0, k1, wk, mask)
        tl.store(yc + n, v.to(y_ptr.dtype.element_ty), mask=mask)
        xc += I * J * K
        yc += S * P


@_jit(do_not_specialize=["C", "I", "J", "K", "GI", "GJ", "GK", "q_bits"])
def _correlation_kernel(fix_ptr, mov_ptr, C, I, J, K, GI, GJ, GK, q_bits, out_ptr,
                        L: tl.constexpr, BLOCK_D: tl.constexpr):
    """``cost[g, d] = sum_c (f_c(x_g) - m_c(x_g + delta_d))^2``, fused.

    Grid ``(G_i*G_j*G_k, cdiv(L^3, BLOCK_D))``: a program owns one control point and
    ``BLOCK_D`` consecutive displacements (``d_k`` fastest: coalesced stores, and neighbouring
    lanes gather neighbouring voxels). Per channel it samples the fixed features at ``x_g``
    (scalar) and the moving features at the ``BLOCK_D`` displaced points (eight gathers), and
    adds the squared difference to a float32 accumulator held in registers. ``q_bits`` is the
    float32 bit pattern of the capture range ``q`` (TensorRT passes only integer scalars).
    """
    g = tl.program_id(0)
    db = tl.program_id(1)
    D: tl.constexpr = L * L * L
    gk = g % GK
    gj = (g // GK) % GJ
    gi = g // (GK * GJ)
    q = q_bits.to(tl.float32, bitcast=True)
    if L > 1:
        step = 2.0 * q / (L - 1)
    else:  # torch.linspace(-q, q, 1) == [-q]
        step = 0.0 * q
    d = db * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = d < D
    dk = d % L
    dj = (d // L) % L
    di = d // (L * L)
    xi = (2 * gi + 1) * 1.0 / (GI * 1.0) - 1.0
    xj = (2 * gj + 1) * 1.0 / (GJ * 1.0) - 1.0
    xk = (2 * gk + 1) * 1.0 / (GK * 1.0) - 1.0
    # fixed features at the control point: scalar taps
    fi0, fi1, fwi = _axis_coords(xi, I)
    fj0, fj1, fwj = _axis_coords(xj, J)
    fk0, fk1, fwk = _axis_coords(xk, K)
    # moving features at x_g + delta_d: vector taps
    mi0, mi1, mwi = _axis_coords(xi + (di.to(tl.float32) * step - q), I)
    mj0, mj1, mwj = _axis_coords(xj + (dj.to(tl.float32) * step - q), J)
    mk0, mk1, mwk = _axis_coords(xk + (dk.to(tl.float32) * step - q), K)
    m00, m01, m10, m11, w00, w01, w10, w11 = _corners(mi0, mi1, mwi, mj0, mj1, mwj, J, K)
    f00, f01, f10, f11, v00, v01, v10, v11 = _corners(fi0, fi1, fwi, fj0, fj1, fwj, J, K)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    fc = fix_ptr  # channel pointers advance by one volume per iteration (64-bit arithmetic)
    mc = mov_ptr
    for _c in range(0, C):
        f = _trilinear(fc, f00, f01, f10, f11, v00, v01, v10, v11, fk0, fk1, fwk, True)
        m = _trilinear(mc, m00, m01, m10, m11, w00, w01, w10, w11, mk0, mk1, mwk, mask)
        diff = f - m
        acc += diff * diff
        fc += I * J * K
        mc += I * J * K
    tl.store(out_ptr + g.to(tl.int64) * D + d, acc.to(out_ptr.dtype.element_ty), mask=mask)


@_jit()
def _tap(x, d, c, t, stride, n, mask):
    """Value of the in-register cube ``x`` at ``clamp(c + t, 0, n - 1)`` along one axis."""
    cc = tl.minimum(tl.maximum(c + t, 0), n - 1)
    idx = tl.where(mask, d + (cc - c) * stride, d)
    return tl.gather(x, idx, 0)


@_jit()
def _min3(x, d, c, stride, n, mask):
    """3-neighbour minimum along one axis, replicate padding (= window clipped to the cube)."""
    return tl.minimum(tl.minimum(_tap(x, d, c, -1, stride, n, mask), x),
                      _tap(x, d, c, 1, stride, n, mask))


@_jit()
def _smooth5(x, d, c, stride, n, mask):
    """One axis of ``smooth3``: replicate-pad by 2, two 3-averages = clamped [1,2,3,2,1]/9."""
    y = 3.0 * x
    y += 2.0 * (_tap(x, d, c, -1, stride, n, mask) + _tap(x, d, c, 1, stride, n, mask))
    y += _tap(x, d, c, -2, stride, n, mask) + _tap(x, d, c, 2, stride, n, mask)
    return y * (1.0 / 9.0)


@_jit()
def _envelope(x, d, c, stride, n: tl.constexpr, pen, mask):
    """One axis of the exact min-convolution: ``min_t x(t) + pen (c - t)^2`` (brute force)."""
    y = tl.full(x.shape, float("inf"), tl.float32)
    for t in tl.static_range(n):
        idx = tl.where(mask, d + (t - c) * stride, d)
        dist = (c - t).to(tl.float32)
        y = tl.minimum(y, tl.gather(x, idx, 0) + pen * dist * dist)
    return y


@_jit()
def _minconv_cube(x, d, pen_ptr, L: tl.constexpr, EXACT: tl.constexpr, mask):
    """The separable min-convolution passes on one control point's register cube ``x``."""
    dk = d % L
    dj = (d // L) % L
    di = d // (L * L)
    if EXACT:
        pen = tl.load(pen_ptr).to(tl.float32)
        x = _envelope(x, d, di, L * L, L, pen, mask)
        x = _envelope(x, d, dj, L, L, pen, mask)
        x = _envelope(x, d, dk, 1, L, pen, mask)
    else:
        x = _min3(x, d, dk, 1, L, mask)
        x = _min3(x, d, dj, L, L, mask)
        x = _min3(x, d, di, L * L, L, mask)
        x = _smooth5(x, d, di, L * L, L, mask)
        x = _smooth5(x, d, dj, L, L, mask)
        x = _smooth5(x, d, dk, 1, L, mask)
    return x


@_jit()
def _minconv_kernel(cost_ptr, pen_ptr, out_ptr, L: tl.constexpr, EXACT: tl.constexpr,
                    BLOCK: tl.constexpr):
    """Min-convolution over the last three axes of ``(G, L, L, L)``.

    Grid ``(G,)``: a program owns one control point's whole ``L^3`` cube, loaded once
    (coalesced) into registers; every separable pass (min-pool / smoothing / lower envelope
    along ``i``, ``j``, ``k``) reads its neighbours from the register cube with ``tl.gather``
    (shared memory on the GPU), so intermediate results stay float32 and never touch global
    memory; the result is stored once. ``pen_ptr`` is read only when ``EXACT``.
    """
    g = tl.program_id(0).to(tl.int64)
    D: tl.constexpr = L * L * L
    d = tl.arange(0, BLOCK)
    mask = d < D
    x = tl.load(cost_ptr + g * D + d, mask=mask, other=0.0).to(tl.float32)
    x = _minconv_cube(x, d, pen_ptr, L, EXACT, mask)
    tl.store(out_ptr + g * D + d, x.to(out_ptr.dtype.element_ty), mask=mask)


@_jit(do_not_specialize=["a_bits", "b_bits", "c_bits"])
def _minconv_affine_kernel(x_ptr, y_ptr, pen_ptr, a_bits, b_bits, c_bits, out_ptr,
                           L: tl.constexpr, EXACT: tl.constexpr, HAS_Y: tl.constexpr,
                           BLOCK: tl.constexpr):
    """``MinConv(a x + b y + c)`` with the affine combination fused into the load.

    The mean-field input of either step: the first step's ``a0 D + a1`` (``HAS_Y`` false,
    ``y_ptr`` never read), the second step's ``a4 + a2 D + a3 first`` (``x = D``,
    ``y = first``). Same grid and cube layout as :func:`_minconv_kernel`; ``a``, ``b``, ``c``
    travel as float32 bit patterns (int32 scalars, as TensorRT's AOT launch passes them). The
    combination is formed in float32 and never stored: one read of ``x`` (and ``y``), one
    write of the min-convolution.
    """
    g = tl.program_id(0).to(tl.int64)
    D: tl.constexpr = L * L * L
    d = tl.arange(0, BLOCK)
    mask = d < D
    a = a_bits.to(tl.float32, bitcast=True)
    c = c_bits.to(tl.float32, bitcast=True)
    x = a * tl.load(x_ptr + g * D + d, mask=mask, other=0.0).to(tl.float32) + c
    if HAS_Y:
        b = b_bits.to(tl.float32, bitcast=True)
        x += b * tl.load(y_ptr + g * D + d, mask=mask, other=0.0).to(tl.float32)
    x = _minconv_cube(x, d, pen_ptr, L, EXACT, mask)
    tl.store(out_ptr + g * D + d, x.to(out_ptr.dtype.element_ty), mask=mask)


@_jit()
def _row_tile(src_ptr, gi, t, gj, u, GI, GJ, row, tile, mask):
    """The ``(G_k, D)`` tile of grid row ``(clamp(gi + t), clamp(gj + u))`` as float32."""
    ii = tl.minimum(tl.maximum(gi + t, 0), GI - 1)
    jj = tl.minimum(tl.maximum(gj + u, 0), GJ - 1)
    ptr = src_ptr + (ii * GJ + jj).to(tl.int64) * row
    return tl.load(ptr + tile, mask=mask, other=0.0).to(tl.float32)


@_jit()
def _row_smooth_j(src_ptr, gi, t, gj, GI, GJ, row, tile, mask):
    """Grid row ``clamp(gi + t)`` smoothed along ``j``: clamped ``[1, 2, 3, 2, 1]`` (undivided)."""
    y = 3.0 * _row_tile(src_ptr, gi, t, gj, 0, GI, GJ, row, tile, mask)
    y += 2.0 * (_row_tile(src_ptr, gi, t, gj, -1, GI, GJ, row, tile, mask)
                + _row_tile(src_ptr, gi, t, gj, 1, GI, GJ, row, tile, mask))
    y += (_row_tile(src_ptr, gi, t, gj, -2, GI, GJ, row, tile, mask)
          + _row_tile(src_ptr, gi, t, gj, 2, GI, GJ, row, tile, mask))
    return y


@_jit()
def _gather_k(x, kk, t, GK, mask):
    """Rows ``clamp(k + t)`` of the register tile ``x`` (axis 0 is the grid axis ``k``)."""
    idx = tl.where(mask, tl.minimum(tl.maximum(kk + t, 0), GK - 1), kk)
    return tl.gather(x, idx, 0)


@_jit()
def _smooth_tile(src_ptr, gi, gj, GI, GJ, GK, row, tile, k, mask, BLOCK_K: tl.constexpr,
                 BLOCK_D: tl.constexpr):
    """``smooth3`` over the control grid of the ``(BLOCK_K, BLOCK_D)`` tile at ``(g_i, g_j)``.

    Along ``i`` and ``j``: the 5x5 clamped neighbour tiles from global memory (25 loads,
    L2-resident); along ``k``: gathers within the register tile. Returns float32.
    """
    acc = 3.0 * _row_smooth_j(src_ptr, gi, 0, gj, GI, GJ, row, tile, mask)
    acc += 2.0 * (_row_smooth_j(src_ptr, gi, -1, gj, GI, GJ, row, tile, mask)
                  + _row_smooth_j(src_ptr, gi, 1, gj, GI, GJ, row, tile, mask))
    acc += (_row_smooth_j(src_ptr, gi, -2, gj, GI, GJ, row, tile, mask)
            + _row_smooth_j(src_ptr, gi, 2, gj, GI, GJ, row, tile, mask))
    acc = acc * (1.0 / 81.0)
    kk = tl.broadcast_to(k, [BLOCK_K, BLOCK_D])
    out = 3.0 * acc
    out += 2.0 * (_gather_k(acc, kk, -1, GK, mask) + _gather_k(acc, kk, 1, GK, mask))
    out += _gather_k(acc, kk, -2, GK, mask) + _gather_k(acc, kk, 2, GK, mask)
    return out * (1.0 / 9.0)


@_jit(do_not_specialize=["GI", "GJ", "GK", "D"])
def _grid_smooth_kernel(src_ptr, GI, GJ, GK, D, dst_ptr, BLOCK_K: tl.constexpr,
                        BLOCK_D: tl.constexpr):
    """``smooth3`` over the first three (control-grid) axes of ``(G_i, G_j, G_k, D)``.

    Grid ``(G_i*G_j, cdiv(D, BLOCK_D))``: a program owns the whole ``k`` line of one
    ``(g_i, g_j)`` for ``BLOCK_D`` consecutive displacements, a ``(BLOCK_K, BLOCK_D)`` tile
    (``d`` innermost: coalesced). Smoothing along ``i`` and ``j`` reads the 5x5 clamped
    neighbour tiles from global memory (25 loads, L2-resident: every tile is read by 25
    programs); along ``k`` it gathers within the register tile. Weights: per axis the clamped
    ``[1, 2, 3, 2, 1] / 9`` of ``smooth3``.
    """
    pij = tl.program_id(0)
    db = tl.program_id(1)
    gj = pij % GJ
    gi = pij // GJ
    k = tl.arange(0, BLOCK_K)[:, None]
    d = db * BLOCK_D + tl.arange(0, BLOCK_D)[None, :]
    mask = (k < GK) & (d < D)
    tile = k * D + d  # offsets inside one (g_i, g_j) row of G_k * D elements
    row = GK * D
    out = _smooth_tile(src_ptr, gi, gj, GI, GJ, GK, row, tile, k, mask, BLOCK_K, BLOCK_D)
    dst = dst_ptr + (gi * GJ + gj).to(tl.int64) * row
    tl.store(dst + tile, out.to(dst_ptr.dtype.element_ty), mask=mask)


@_jit()
def _head_body(src_ptr, GI, GJ, GK, scale_bits, q_bits, disp_ptr, ent_ptr, probs_ptr,
               L: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
               WRITE_PROBS: tl.constexpr):
    """Grid smoothing, softmax, expectation and entropy of one ``(g_i, g_j)`` line (see
    :func:`_head_kernel`)."""
    pij = tl.program_id(0)
    gj = pij % GJ
    gi = pij // GJ
    D: tl.constexpr = L * L * L
    scale = scale_bits.to(tl.float32, bitcast=True)
    q = q_bits.to(tl.float32, bitcast=True)
    if L > 1:
        step = 2.0 * q / (L - 1)
    else:  # torch.linspace(-q, q, 1) == [-q]
        step = 0.0 * q
    k = tl.arange(0, BLOCK_K)[:, None]
    kmask = k < GK
    row = GK * D
    NEG: tl.constexpr = -1.0e30  # finite "minus infinity": exp(NEG - m) == 0, never NaN
    m_run = tl.full([BLOCK_K], NEG, tl.float32)
    s_run = tl.zeros([BLOCK_K], tl.float32)  # sum exp(z - m)
    u_run = tl.zeros([BLOCK_K], tl.float32)  # sum exp(z - m) (z - m)
    e_i = tl.zeros([BLOCK_K], tl.float32)    # sum exp(z - m) delta_d (three axes)
    e_j = tl.zeros([BLOCK_K], tl.float32)
    e_k = tl.zeros([BLOCK_K], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)[None, :]
        mask = kmask & (d < D)
        z = scale * _smooth_tile(src_ptr, gi, gj, GI, GJ, GK, row, k * D + d, k, mask,
                                 BLOCK_K, BLOCK_D)
        z = tl.where(mask, z, NEG)
        m_new = tl.maximum(m_run, tl.max(z, 1))
        alpha = tl.exp(m_run - m_new)
        zc = z - m_new[:, None]
        p = tl.where(mask, tl.exp(zc), 0.0)
        u_run = alpha * (u_run + (m_run - m_new) * s_run) + tl.sum(p * zc, 1)
        s_run = alpha * s_run + tl.sum(p, 1)
        di = (d // (L * L)).to(tl.float32) * step - q
        dj = ((d // L) % L).to(tl.float32) * step - q
        dk = (d % L).to(tl.float32) * step - q
        e_i = alpha * e_i + tl.sum(p * di, 1)
        e_j = alpha * e_j + tl.sum(p * dj, 1)
        e_k = alpha * e_k + tl.sum(p * dk, 1)
        m_run = m_new
    kv = tl.arange(0, BLOCK_K)
    valid = kv < GK
    g = (gi * GJ + gj) * GK + kv
    inv = 1.0 / tl.where(valid, s_run, 1.0)
    out_ty = disp_ptr.dtype.element_ty
    tl.store(disp_ptr + g * 3 + 0, (e_i * inv).to(out_ty), mask=valid)
    tl.store(disp_ptr + g * 3 + 1, (e_j * inv).to(out_ty), mask=valid)
    tl.store(disp_ptr + g * 3 + 2, (e_k * inv).to(out_ty), mask=valid)
    ent = tl.log(tl.where(valid, s_run, 1.0)) - u_run * inv
    tl.store(ent_ptr + g, ent.to(ent_ptr.dtype.element_ty), mask=valid)
    if WRITE_PROBS:  # second sweep: the smoothing is recomputed (the logits are never stored)
        base = probs_ptr + (gi * GJ + gj).to(tl.int64) * row
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)[None, :]
            mask = kmask & (d < D)
            z = scale * _smooth_tile(src_ptr, gi, gj, GI, GJ, GK, row, k * D + d, k, mask,
                                     BLOCK_K, BLOCK_D)
            z = tl.where(mask, z, NEG)
            p = tl.exp(z - m_run[:, None]) * inv[:, None]
            tl.store(base + k * D + d, p.to(probs_ptr.dtype.element_ty), mask=mask)


@_jit(do_not_specialize=["GI", "GJ", "GK", "scale_bits", "q_bits"])
def _head_kernel(src_ptr, GI, GJ, GK, scale_bits, q_bits, disp_ptr, ent_ptr,
                 L: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """The end of the head in one pass over the second step's min-convolution ``M``.

    ``z = scale * smooth3_grid(M)`` (the logits; ``scale = -a5``, or the folded
    ``-a5 a0 a2``), then per control point ``p = softmax(z)`` over the ``L^3``
    displacements, ``grid_disp = sum_d p delta_d`` (normalised units, ``(G, 3)``) and
    ``entropy = -sum_d p log p`` (nats, ``(G,)``). Grid ``(G_i*G_j,)``: a program owns the
    whole ``k`` line of one ``(g_i, g_j)`` and sweeps the displacements in blocks of
    ``BLOCK_D``, smoothing each ``(BLOCK_K, BLOCK_D)`` tile as :func:`_grid_smooth_kernel`
    does and folding it into an online softmax (running maximum ``m``, ``s = sum e^(z-m)``,
    ``sum e^(z-m) (z-m)`` and ``sum e^(z-m) delta``, rescaled when ``m`` grows): the
    regularised cost, the logits and the probabilities are never written; 16 bytes per
    control point are. ``delta_d`` is computed from ``L`` and ``q`` (``q_bits``: float32 bit
    pattern) as in :func:`_correlation_kernel`.
    """
    _head_body(src_ptr, GI, GJ, GK, scale_bits, q_bits, disp_ptr, ent_ptr, disp_ptr, L,
               BLOCK_K, BLOCK_D, False)


@_jit(do_not_specialize=["GI", "GJ", "GK", "scale_bits", "q_bits"])
def _head_probs_kernel(src_ptr, GI, GJ, GK, scale_bits, q_bits, disp_ptr, ent_ptr, probs_ptr,
                       L: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """:func:`_head_kernel` that also writes ``probs`` ``(G, L^3)``: a second sweep recomputes
    the smoothed logits and stores ``e^(z - m) / s`` (one more read of ``M``, one write)."""
    _head_body(src_ptr, GI, GJ, GK, scale_bits, q_bits, disp_ptr, ent_ptr, probs_ptr, L,
               BLOCK_K, BLOCK_D, True)


# =============================================================================================
# Launchers (torch tensors; CUDA, or CPU under TRITON_INTERPRET=1)
# =============================================================================================

def _torch():
    return require("torch", "the Triton kernel launchers (pddnet.backends.trt.kernels)")


def _check_float(name: str, t) -> None:
    torch = _torch()
    if t.dtype not in (torch.float32, torch.float16):
        raise PddnetError(f"{name}: expected float32 or float16, got {t.dtype}")


def _output(out, shape, like):
    torch = _torch()
    if out is None:
        return torch.empty(shape, dtype=like.dtype, device=like.device)
    if tuple(out.shape) != tuple(shape) or out.dtype != like.dtype or not out.is_contiguous():
        raise PddnetError(f"out: expected a contiguous {like.dtype} tensor of shape "
                          f"{tuple(shape)}, got {out.dtype} {tuple(out.shape)}")
    return out


def deformable_sample(x, offsets, out_shape, *, out=None, block: int | None = None):
    """``DeformableSample3D``: ``x (1, C, I, J, K)``, ``offsets (S, 3)`` -> ``(1, C*S, *out_shape)``.

    Same contract as :func:`pddnet.model.ops.deformable_sample`. ``out`` (optional) receives
    the result; ``block`` overrides the number of output voxels per program (a power of two).
    """
    _triton()
    _check_float("deformable_sample x", x)
    if x.dim() != 5 or x.shape[0] != 1 or offsets.dim() != 2 or offsets.shape[1] != 3:
        raise PddnetError(f"deformable_sample: expected x (1,C,I,J,K) and offsets (S,3), got "
                          f"{tuple(x.shape)} and {tuple(offsets.shape)}")
    po, qo, ro = (int(n) for n in out_shape)
    c, ni, nj, nk = (int(n) for n in x.shape[1:])
    s = int(offsets.shape[0])
    x = x.contiguous()
    offsets = offsets.contiguous()
    y = _output(out, (1, c * s, po, qo, ro), x)
    block = int(block or DEFORM_BLOCK)
    grid = (triton.cdiv(po * qo * ro, block), s)
    _deformable_sample_kernel[grid](x, offsets, c, ni, nj, nk, po, qo, ro, y,
                                    BLOCK=block, num_warps=DEFORM_WARPS)
    return y


def correlation(feat_fixed, feat_moving, grid, disp_size: int, capture: float, *, out=None,
                block: int | None = None):
    """``Correlation``: ``(1, C, I, J, K)`` twice -> ``cost (G_i, G_j, G_k, L, L, L)``.

    Same contract as :func:`pddnet.model.ops.correlation`. ``block`` overrides the number of
    displacements per program (a power of two).
    """
    _triton()
    _check_float("correlation feat_fixed", feat_fixed)
    if (feat_fixed.shape != feat_moving.shape or feat_fixed.dim() != 5
            or feat_fixed.shape[0] != 1 or feat_fixed.dtype != feat_moving.dtype):
        raise PddnetError(f"correlation: feature maps must both be (1,C,I,J,K) of one dtype; got "
                          f"{tuple(feat_fixed.shape)} {feat_fixed.dtype} and "
                          f"{tuple(feat_moving.shape)} {feat_moving.dtype}")
    gi, gj, gk = (int(g) for g in grid)
    L = int(disp_size)
    c, ni, nj, nk = (int(n) for n in feat_fixed.shape[1:])
    fixed = feat_fixed.contiguous()
    moving = feat_moving.contiguous()
    cost = _output(out, (gi, gj, gk, L, L, L), fixed)
    block = int(block or min(CORR_BLOCK_D, next_pow2(L ** 3)))
    launch = (gi * gj * gk, triton.cdiv(L ** 3, block))
    _correlation_kernel[launch](fixed, moving, c, ni, nj, nk, gi, gj, gk, float_bits(capture),
                                cost, L=L, BLOCK_D=block, num_warps=CORR_WARPS)
    return cost


def _minconv_args(cost, mode: str, penalty):
    torch = _torch()
    _check_float("minconv cost", cost)
    if cost.dim() != 6 or not (cost.shape[3] == cost.shape[4] == cost.shape[5]):
        raise PddnetError(f"minconv: expected cost (G_i, G_j, G_k, L, L, L), got {tuple(cost.shape)}")
    if mode not in ("approx", "exact"):
        raise PddnetError(f"minconv: unknown mode {mode!r} (expected 'approx' or 'exact')")
    cost = cost.contiguous()
    if mode == "exact":
        if penalty is None:
            raise PddnetError("minconv(mode='exact') needs a penalty")
        pen = torch.as_tensor(penalty, device=cost.device)
        if pen.numel() != 1:
            raise PddnetError(f"minconv: penalty must be a scalar, got shape {tuple(pen.shape)}")
        if not pen.is_floating_point():
            pen = pen.to(torch.float32)
        pen = pen.reshape(()).contiguous()
    else:
        pen = cost  # never read when EXACT is False
    return cost, pen


def _launch_minconv(cost, pen, dst, exact: bool):
    L = int(cost.shape[3])
    n_g = int(cost.shape[0] * cost.shape[1] * cost.shape[2])
    _minconv_kernel[(n_g,)](cost, pen, dst, L=L, EXACT=exact, BLOCK=minconv_block(L),
                            num_warps=minconv_warps(L))


def minconv(cost, mode: str = "approx", penalty=None, *, out=None):
    """``MinConv`` over the displacement axes of ``(G_i, G_j, G_k, L, L, L)``.

    Same contract as :func:`pddnet.model.ops.minconv`; ``penalty`` (a scalar, tensor or
    float) is needed by, and only read in, mode ``exact``.
    """
    _triton()
    cost, pen = _minconv_args(cost, mode, penalty)
    y = _output(out, tuple(cost.shape), cost)
    _launch_minconv(cost, pen, y, mode == "exact")
    return y


def smooth_block(grid_k: int, block: int | None = None) -> tuple[int, int]:
    """``(BLOCK_K, BLOCK_D)`` of the grid-smoothing kernel for a grid of ``G_k`` along ``k``."""
    bk = next_pow2(grid_k)
    bd = int(block) if block else max(16, min(128, SMOOTH_TILE // bk))
    return bk, bd


def _launch_grid_smooth(src, dst, block: int | None = None):
    gi, gj, gk = (int(n) for n in src.shape[:3])
    n_d = int(src[0, 0, 0].numel())
    bk, bd = smooth_block(gk, block)
    launch = (gi * gj, triton.cdiv(n_d, bd))
    _grid_smooth_kernel[launch](src, gi, gj, gk, n_d, dst, BLOCK_K=bk, BLOCK_D=bd,
                                num_warps=SMOOTH_WARPS)


def mean_field_step(cost, mode: str = "approx", penalty=None, *, out=None,
                    block: int | None = None):
    """``MeanFieldStep``: :func:`minconv` then ``smooth3`` over the control grid.

    Two kernels: the min-convolution writes a float32 intermediate (so float16 inputs are
    rounded once, at the end), the grid smoothing reads it and writes ``out``. ``block``
    overrides the displacements per program of the smoothing kernel.
    """
    _triton()
    torch = _torch()
    cost, pen = _minconv_args(cost, mode, penalty)
    y = _output(out, tuple(cost.shape), cost)
    tmp = torch.empty(cost.shape, dtype=torch.float32, device=cost.device)
    _launch_minconv(cost, pen, tmp, mode == "exact")
    _launch_grid_smooth(tmp, y, block)
    return y


def minconv_affine(x, y=None, coeffs=(1.0, 0.0, 0.0), mode: str = "approx", penalty=None, *,
                   out=None):
    """``MinConv(a x + b y + c)`` for ``coeffs = (a, b, c)``, the combination fused into the load.

    ``x`` and ``y`` (optional; ``b`` is then ignored) are ``(G_i, G_j, G_k, L, L, L)``; the
    result has ``x``'s dtype. The reference is ``ops.minconv(a * x + b * y + c, mode, penalty)``.
    """
    _triton()
    x, pen = _minconv_args(x, mode, penalty)
    if y is not None:
        _check_float("minconv_affine y", y)
        if tuple(y.shape) != tuple(x.shape):
            raise PddnetError(f"minconv_affine: y must have x's shape {tuple(x.shape)}, got "
                              f"{tuple(y.shape)}")
        y = y.contiguous()
    a, b, c = (float(v) for v in coeffs)
    dst = _output(out, tuple(x.shape), x)
    L = int(x.shape[3])
    n_g = int(x.shape[0] * x.shape[1] * x.shape[2])
    _minconv_affine_kernel[(n_g,)](x, x if y is None else y, pen, float_bits(a), float_bits(b),
                                   float_bits(c), dst, L=L, EXACT=mode == "exact",
                                   HAS_Y=y is not None, BLOCK=minconv_block(L),
                                   num_warps=minconv_warps(L))
    return dst


def grid_smooth(x, *, out=None, block: int | None = None):
    """``smooth3`` over the control-grid axes of ``(G_i, G_j, G_k, ...)`` (``ops.smooth_grid``)."""
    _triton()
    _check_float("grid_smooth x", x)
    if x.dim() < 3:
        raise PddnetError(f"grid_smooth: expected (G_i, G_j, G_k, ...), got {tuple(x.shape)}")
    x = x.contiguous()
    y = _output(out, tuple(x.shape), x)
    _launch_grid_smooth(x, y, block)
    return y


def head_block(grid_k: int, block: int | None = None) -> tuple[int, int]:
    """``(BLOCK_K, BLOCK_D)`` of the head kernel (as :func:`smooth_block`)."""
    return smooth_block(grid_k, block)


def displacement_head(m, scale: float, capture: float, *, probs: bool = False,
                      block: int | None = None, out=None):
    """Grid smoothing + softmax + expectation + entropy of ``m`` ``(G_i, G_j, G_k, L, L, L)``.

    ``m`` is the second mean-field step's min-convolution (before its grid smoothing); the
    logits are ``scale * smooth3_grid(m)``. Returns ``(grid_disp (G_i, G_j, G_k, 3),
    entropy (G_i, G_j, G_k))`` and, with ``probs=True``, ``probs (G_i, G_j, G_k, L^3)`` too,
    all in ``m``'s dtype. Reference: ``ops.displacement_probabilities(ops.smooth_grid(m),
    -scale)``, ``ops.expected_displacement``, ``ops.displacement_entropy``. ``out``
    (optional): a tuple of tensors of those shapes to fill.
    """
    _triton()
    _check_float("displacement_head m", m)
    if m.dim() != 6 or not (m.shape[3] == m.shape[4] == m.shape[5]):
        raise PddnetError(f"displacement_head: expected (G_i, G_j, G_k, L, L, L), got "
                          f"{tuple(m.shape)}")
    m = m.contiguous()
    gi, gj, gk, L = (int(n) for n in m.shape[:4])
    shapes = [(gi, gj, gk, 3), (gi, gj, gk)] + ([(gi, gj, gk, L ** 3)] if probs else [])
    if out is not None and len(out) != len(shapes):
        raise PddnetError(f"displacement_head: out must hold {len(shapes)} tensors, got "
                          f"{len(out)}")
    res = [_output(None if out is None else out[i], shp, m) for i, shp in enumerate(shapes)]
    disp, ent = res[0], res[1]
    bk, bd = head_block(gk, block)
    args = (m, gi, gj, gk, float_bits(scale), float_bits(capture), disp, ent)
    if probs:
        p = res[2]
        _head_probs_kernel[(gi * gj,)](*args, p, L=L, BLOCK_K=bk, BLOCK_D=bd,
                                       num_warps=SMOOTH_WARPS)
        return disp, ent, p
    _head_kernel[(gi * gj,)](*args, L=L, BLOCK_K=bk, BLOCK_D=bd, num_warps=SMOOTH_WARPS)
    return disp, ent


def fused_head(ssd, alpha, capture: float, mode: str = "approx", penalty=None, *,
               probs: bool = False, block: int | None = None):
    """Everything after the correlation, as the fused TensorRT head runs it: four launches.

    ``ssd`` is the correlation ``(G_i, G_j, G_k, L, L, L)``, ``alpha`` the model's six
    scalars; the model (``PDDNet.regularise`` and the softmax) computes
    ``cost = a1 + a0 ssd``, ``first = MFS(cost)``, ``second = MFS(a4 + a2 cost + a3 first)``,
    ``p = softmax(-a5 second)``. Here: ``minconv_affine(ssd; a0, 0, a1)``, :func:`grid_smooth`
    (= ``first``), ``minconv_affine(ssd, first; a2 a0, a3, a4 + a2 a1)``, and
    :func:`displacement_head` with ``scale = -a5``. Returns what :func:`displacement_head`
    returns.
    """
    a0, a1, a2, a3, a4, a5 = (float(v) for v in alpha)
    m1 = minconv_affine(ssd, None, (a0, 0.0, a1), mode, penalty)
    first = grid_smooth(m1, block=block)
    m2 = minconv_affine(ssd, first, (a2 * a0, a3, a4 + a2 * a1), mode, penalty)
    return displacement_head(m2, -a5, capture, probs=probs, block=block)


# =============================================================================================
# Ahead-of-time compilation to PTX (for the TensorRT AOT plugins)
# =============================================================================================

@dataclass(frozen=True)
class KernelABI:
    """The non-constexpr parameters of a kernel, in TensorRT's AOT order."""

    kernel: str
    inputs: tuple[str, ...]
    scalars: tuple[str, ...]
    outputs: tuple[str, ...]


#: Kernel ABI per op bound to an AOT plugin. ``MeanFieldStep`` has none: it needs two
#: launches and an AOT plugin is one kernel (see :mod:`pddnet.backends.trt.plugins`); the
#: fused head splits it into ``MinConvAffine`` + ``GridSmooth`` instead.
AOT_ABI = {
    "DeformableSample3D": KernelABI("_deformable_sample_kernel", ("x_ptr", "off_ptr"),
                                    ("C", "I", "J", "K", "PO", "QO", "RO"), ("y_ptr",)),
    "Correlation": KernelABI("_correlation_kernel", ("fix_ptr", "mov_ptr"),
                             ("C", "I", "J", "K", "GI", "GJ", "GK", "q_bits"), ("out_ptr",)),
    "MinConv": KernelABI("_minconv_kernel", ("cost_ptr", "pen_ptr"), (), ("out_ptr",)),
    # the fused head (pddnet.backends.trt.head): TensorRT-only ops, one kernel each
    "MinConvAffine": KernelABI("_minconv_affine_kernel", ("x_ptr", "y_ptr", "pen_ptr"),
                               ("a_bits", "b_bits", "c_bits"), ("out_ptr",)),
    "GridSmooth": KernelABI("_grid_smooth_kernel", ("src_ptr",), ("GI", "GJ", "GK", "D"),
                            ("dst_ptr",)),
    "DisplacementHead": KernelABI("_head_kernel", ("src_ptr",),
                                  ("GI", "GJ", "GK", "scale_bits", "q_bits"),
                                  ("disp_ptr", "ent_ptr")),
    "DisplacementHeadProbs": KernelABI("_head_probs_kernel", ("src_ptr",),
                                       ("GI", "GJ", "GK", "scale_bits", "q_bits"),
                                       ("disp_ptr", "ent_ptr", "probs_ptr")),
}


@dataclass(frozen=True)
class CompiledKernel:
    """A kernel compiled to PTX, ready for ``trtp.aot_impl``."""

    name: str
    ptx: str
    num_warps: int
    shared: int
    params: int  # parameters of the PTX entry (= inputs + scalars + outputs)


_TRITON_DTYPES = {"float32": "fp32", "float16": "fp16", "fp32": "fp32", "fp16": "fp16"}


def _entry_params(ptx: str, name: str) -> list[str]:
    m = re.search(r"\.entry\s+" + re.escape(name) + r"\s*\(([^)]*)\)", ptx)
    if m is None:
        raise PddnetError(f"compiled PTX has no entry {name!r}")
    return [p.strip() for p in m.group(1).split(",") if p.strip()]


def strip_scratch_params(ptx: str, name: str, expected: int) -> str:
    """Drop the trailing scratch-pointer parameters Triton (>= 3.3) appends to every kernel.

    Triton adds ``global_scratch`` (and, since 3.5, ``profile_scratch``) pointer parameters
    after the user's arguments; its own launcher passes NULL for them. TensorRT's AOT launch
    passes exactly ``inputs + extra args + outputs``, so the PTX entry must declare exactly
    those. The extra parameters are removed only when the kernel body never references them
    (no scratch memory was allocated); otherwise this raises.
    """
    params = _entry_params(ptx, name)
    if len(params) < expected:
        raise PddnetError(f"PTX entry {name} has {len(params)} parameters, fewer than the "
                          f"{expected} of its ABI")
    if len(params) == expected:
        return ptx
    extra = params[expected:]
    body_start = ptx.index(")", ptx.index(".entry " + name)) + 1
    body = ptx[body_start:]
    for p in extra:
        pname = p.split()[-1]
        if not p.startswith(".param .u64") or re.search(r"\b" + re.escape(pname) + r"\b", body):
            raise PddnetError(f"PTX entry {name}: extra parameter {p!r} is used by the kernel; "
                              "it cannot be launched by TensorRT's AOT plugin interface")
    m = re.search(r"(\.entry\s+" + re.escape(name) + r"\s*\()([^)]*)(\))", ptx)
    kept = ",\n\t".join(params[:expected])
    return ptx[:m.start(2)] + "\n\t" + kept + "\n" + ptx[m.end(2):]


def compile_aot(op: str, dtypes: dict[str, str], constexprs: dict, *, num_warps: int,
                target=None, options: dict | None = None) -> CompiledKernel:
    """Compile the kernel of ``op`` to PTX with Triton (``triton.compile``; nothing is launched).

    Args:
        op: a key of :data:`AOT_ABI`.
        dtypes: element type (``"float32"`` / ``"float16"``) of every pointer parameter, by name.
        constexprs: values of the kernel's ``tl.constexpr`` parameters.
        num_warps: warps per program (the launch's ``block_x`` is ``32 * num_warps``).
        target: a ``triton.backends.compiler.GPUTarget``; default: :data:`AOT_TARGET`, else
            the current CUDA device (the engine-building GPU).
        options: extra Triton compile options, e.g. ``{"ptx_version": 84}`` when the driver
            that will run the engine is older than the PTX ISA this Triton emits by default.

    Needs a triton with its CUDA backend (``ptxas`` ships in the wheel); a GPU only for the
    default ``target``. Not under ``TRITON_INTERPRET=1``: the kernels are then interpreter
    objects, not compilable functions. The scalar parameters are declared ``i32``, the
    pointers by ``dtypes``; the trailing scratch parameters Triton adds are removed
    (:func:`strip_scratch_params`), so the entry takes exactly the ABI's parameters.
    """
    tr = _triton()
    abi = AOT_ABI[op]
    fn = globals()[abi.kernel]
    if not isinstance(fn, tr.runtime.jit.JITFunction):
        raise PddnetError("compile_aot: the kernels were created by the Triton interpreter "
                          "(TRITON_INTERPRET=1 was set when pddnet.backends.trt.kernels was imported); "
                          "compile PTX in a process without it")
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in abi.scalars:
            signature[name] = "i32"
        else:
            signature[name] = "*" + _TRITON_DTYPES[str(dtypes[name])]
    src = tr.compiler.ASTSource(fn=fn, signature=signature, constexprs=dict(constexprs))
    if target is None:
        target = AOT_TARGET or tr.runtime.driver.active.get_current_target()
    opts = {"num_warps": int(num_warps), **(options or {})}
    compiled = tr.compile(src, target=target, options=opts)
    md = compiled.metadata
    for attr in ("global_scratch_size", "profile_scratch_size"):
        if getattr(md, attr, 0):
            raise PddnetError(f"{op}: the compiled kernel needs {attr}={getattr(md, attr)}; "
                              "TensorRT's AOT plugin interface cannot provide scratch memory")
    expected = len(abi.inputs) + len(abi.scalars) + len(abi.outputs)
    ptx = strip_scratch_params(compiled.asm["ptx"], md.name, expected)
    return CompiledKernel(name=md.name, ptx=ptx, num_warps=int(md.num_warps),
                          shared=int(md.shared), params=expected)


__all__ = [
    "deformable_sample", "correlation", "minconv", "mean_field_step", "compile_aot",
    "minconv_affine", "grid_smooth", "displacement_head", "fused_head", "head_block",
    "strip_scratch_params", "float_bits", "AOT_ABI", "KernelABI", "CompiledKernel",
    "minconv_block", "minconv_warps", "smooth_block", "next_pow2",
]
