"""TensorRT plugins ``pddnet::<OpType>`` for the custom ops, as quickly deployable plugins.

One plugin per op of ``docs/ops.md``, registered by :func:`register_plugins` with
TensorRT's ``tensorrt.plugin`` module (``trtp``) under the namespace ``pddnet`` and the
op_type as name, version ``"1"``, so that the ONNX parser binds the ``ai.pddnet`` nodes
(which carry ``plugin_namespace="pddnet"``, ``plugin_version="1"``) to them. Each plugin has

- ``@trtp.register``: output shape (symbolic) and dtype (the input's); the attributes are those
  of the spec, with these types: ints -> ``numpy.typing.NDArray[np.int32]``, int -> ``int``,
  float -> ``float``, string -> ``str``;
- ``@trtp.aot_impl``: compiles the op's Triton kernel (:mod:`pddnet.backends.trt.kernels`) to PTX at
  engine-build time, on the building GPU, and returns it with its launch parameters, so the
  engine embeds the kernel and runs with no Python (``trtexec``, the C++ runtime);
- ``@trtp.impl``: the JIT fallback, a Python callback that launches the same kernel on
  TensorRT's stream through torch (needs torch with CUDA and triton at *run* time).

TensorRT versions (from NVIDIA's release notes and the ``tensorrt.plugin`` sources):
``trtp.register`` / ``trtp.impl`` (quickly deployable plugins) need TensorRT >= 10.6
(experimental until 10.9); ``trtp.aot_impl``, ``trtp.KernelLaunchParams``, ``trtp.SymInt32``,
``trtp.SymIntExprs`` and the ``PREFER_AOT_PYTHON_PLUGINS`` network flag need >= 10.9 (release
notes 10.9: "Ahead-of-Time Compilable Python Plugins"). With an older TensorRT only the JIT
plugins are registered. The project's extra pins ``tensorrt>=10.7``; DESIGN.md's "aot_impl,
TRT >= 10.7" is one release early.

Choosing AOT or JIT: a plugin that has both is built AOT when the network is created with
``NetworkDefinitionCreationFlag.PREFER_AOT_PYTHON_PLUGINS`` (or the ONNX node carries the bool
attribute ``aot=1``), JIT with ``PREFER_JIT_PYTHON_PLUGINS``; TensorRT refuses to choose when
neither is given. A plugin with one implementation uses it.

Deviations from the ONNX op signatures that the exporter's TensorRT preparation must handle:

- ``MinConv`` / ``MeanFieldStep``: a quickly deployable plugin has a fixed list of input
  tensors (no optional inputs, no defaults), so these plugins always take ``(cost, penalty)``.
  An ``approx`` node (one input in the ONNX model) needs a penalty input added before parsing
  (any float scalar; it is not read).
- ``MeanFieldStep`` has no AOT implementation: an AOT plugin is exactly one kernel launch, and
  the step needs two (the grid smoothing couples every control point's min-convolution, so no
  single launch can do both without a grid-wide barrier). For Python-free engines, do not bind
  ``MeanFieldStep`` to the plugin: the fused head (:mod:`pddnet.backends.trt.head`) rewrites it
  into ``MinConvAffine`` + ``GridSmooth`` and the softmax into ``DisplacementHead`` (the
  TensorRT-only plugins of :data:`HEAD_OPS`, all AOT), or keep its local function, which
  TensorRT inlines into the ``MinConv`` plugin (AOT) plus native MatMuls.
- AOT kernels take no attributes at run time (TensorRT does not serialize attributes of AOT
  plugins): they are compiled in (``tl.constexpr``) or passed as int32 scalar arguments
  (``trtp.SymInt32``); the float ``capture`` travels as its float32 bit pattern.
- Static shapes where the kernel needs compile-time sizes: ``MinConv``'s ``L`` (the cube held
  by one program) must be a build-time constant; batch/grid/feature sizes may be dynamic.
- Some TensorRT releases pass *all* attributes to ``aot_impl`` positionally in the node's
  attribute order (``_TemplateAOTPlugin.get_launch_params``), so every ``aot_impl`` here takes
  all attributes, and the exporter should write them in the spec's order (as listed in
  ``docs/ops.md``).

What has been run, and what not (nothing TensorRT-side can run where this was written: no GPU,
no TensorRT):

- run: every kernel under the Triton interpreter against :mod:`pddnet.model.ops` in float64
  (``tests/backends/test_kernels.py``); compilation of the three AOT kernels to PTX for sm_90 with the
  ``ptxas`` of the triton wheel, and the PTX entry having exactly TensorRT's parameter list;
  importing this module without tensorrt; :func:`register_plugins` failing with the pip extra.
- not run: anything that imports ``tensorrt`` (the decorators, shape functions, ``aot_impl`` /
  ``impl`` bodies), engine building, ONNX parsing with the plugins bound, any GPU execution or
  timing, the JIT path's torch/CUDA stream handling. The code is written against the
  documented ``tensorrt.plugin`` API and NVIDIA's samples and must be checked on a GPU with
  TensorRT >= 10.9 before it is relied on.

Importing this module needs neither tensorrt nor triton nor torch.
"""

# No ``from __future__ import annotations`` here: ``tensorrt.plugin`` inspects the annotations of
# the decorated functions with ``issubclass``, so they must be real classes, not strings.

import logging
import math
from typing import Tuple, Union

import numpy as np
import numpy.typing as npt

from pddnet._optional import require
from pddnet.errors import PddnetError
from pddnet.spec.contract import CUSTOM_OPS, PLUGIN_NAMESPACE

log = logging.getLogger(__name__)

_PURPOSE = "registering the TensorRT plugins (pddnet.backends.trt.plugins)"
_INTS = npt.NDArray[np.int32]
_MAX_AOT_SHARED = 48 * 1024  # dynamic shared memory without an opt-in attribute

#: plugin id -> "aot+jit" or "jit" for every plugin registered by this process.
_REGISTERED: dict[str, str] = {}


def plugin_id(op: str) -> str:
    """``pddnet::<op>``: the id under which the plugin of ``op`` is registered."""
    return f"{PLUGIN_NAMESPACE}::{op}"


def registered() -> dict[str, str]:
    """Plugins registered by :func:`register_plugins` in this process: id -> ``"aot+jit"``/``"jit"``."""
    return dict(_REGISTERED)


def register_plugins(ops=None) -> list[str]:
    """Register the TensorRT plugins of ``ops`` (default: every custom op); return their ids.

    Idempotent: a plugin this process already registered is not registered again (TensorRT
    refuses a second definition). Registers the AOT implementation too where the installed
    TensorRT has ``tensorrt.plugin.aot_impl`` (>= 10.9).

    Raises:
        PddnetError: tensorrt (or its ``tensorrt.plugin`` module) is not importable (the message
            names the extra: ``pip install 'pddnet[gpu]'``), an op is unknown, or another module
            already registered a plugin under a ``pddnet::`` id.
    """
    require("tensorrt", _PURPOSE)
    trtp = require("tensorrt.plugin", _PURPOSE)
    names = tuple(CUSTOM_OPS) if ops is None else tuple(ops)
    unknown = [op for op in names if op not in _DEFINE]
    if unknown:
        raise PddnetError(f"register_plugins: unknown op(s) {unknown}; the custom ops are "
                          f"{list(CUSTOM_OPS)}, the fused-head ops {list(HEAD_OPS)}")
    aot = all(hasattr(trtp, a) for a in ("aot_impl", "KernelLaunchParams", "SymInt32",
                                         "SymIntExprs"))
    if not aot:
        log.warning("this TensorRT has no tensorrt.plugin.aot_impl (needs >= 10.9): registering "
                    "the JIT plugins only; engines using them need Python at run time")
    ids = []
    for op in names:
        pid = plugin_id(op)
        if pid not in _REGISTERED:
            if _defined_elsewhere(trtp, op):
                raise PddnetError(f"a TensorRT plugin {pid} is already registered by other code in "
                                  "this process; pddnet cannot register its own")
            _REGISTERED[pid] = _DEFINE[op](trtp, aot)
        ids.append(pid)
    return ids


def _defined_elsewhere(trtp, op: str) -> bool:
    ns = getattr(getattr(trtp, "op", None), PLUGIN_NAMESPACE, None)
    return ns is not None and hasattr(ns, op)


# ------------------------------------------------------------------------------------------
# Helpers shared by the plugin definitions (run only inside TensorRT callbacks)
# ------------------------------------------------------------------------------------------

def _kernels():
    """:mod:`pddnet.backends.trt.kernels`, after checking that triton is importable."""
    require("triton", "the Triton kernels of the TensorRT plugins")
    from pddnet.backends.trt import kernels

    return kernels


def _dtype_name(trt_dtype) -> str:
    """``"float32"`` / ``"float16"`` for a TensorRT data type; anything else is an error."""
    trt = require("tensorrt", _PURPOSE)
    if trt_dtype == trt.float32:
        return "float32"
    if trt_dtype == trt.float16:
        return "float16"
    raise PddnetError(f"pddnet plugins support float32 and float16 tensors, got {trt_dtype}")


def _static(expr, what: str) -> int:
    """The value of a build-time-constant shape expression, or a clear error."""
    if getattr(expr, "is_fake", False) or not expr.is_constant:
        raise PddnetError(f"{what} must be a build-time constant for the AOT kernel "
                          "(give the network a static shape for it, or use the JIT plugin)")
    return int(expr.constant_value())


def _torch_views(*tensors):
    """``torch`` and zero-copy CUDA views of TensorRT tensors (``__cuda_array_interface__``)."""
    torch = require("torch", "the JIT TensorRT plugins (pddnet.backends.trt.plugins)")
    return torch, [torch.as_tensor(t, device="cuda") for t in tensors]


def _sym(trtp, values):
    """``trtp.SymIntExprs`` of int32 kernel arguments (ints or shape expressions)."""
    return trtp.SymIntExprs.from_tuple([trtp.SymInt32(v) for v in values])


def _launch(trtp, grid, compiled):
    lp = trtp.KernelLaunchParams()
    lp.grid_x, lp.grid_y = grid
    lp.block_x = compiled.num_warps * 32
    lp.shared_mem = compiled.shared
    if compiled.shared > _MAX_AOT_SHARED:
        raise PddnetError(f"kernel {compiled.name} needs {compiled.shared} B of shared memory, "
                          f"more than the {_MAX_AOT_SHARED} B an AOT plugin launch may use")
    return lp


# ------------------------------------------------------------------------------------------
# DeformableSample3D
# ------------------------------------------------------------------------------------------

def _define_deformable_sample(trtp, aot: bool) -> str:
    pid = plugin_id("DeformableSample3D")

    @trtp.register(pid)
    def _desc(X: trtp.TensorDesc, offsets: trtp.TensorDesc,
              output_shape: _INTS) -> trtp.TensorDesc:
        po, qo, ro = (int(v) for v in output_shape)
        channels = X.shape_expr[1] * offsets.shape_expr[0]
        return trtp.from_shape_expr((X.shape_expr[0], channels, po, qo, ro), dtype=X.dtype)

    @trtp.impl(pid)
    def _impl(X: trtp.Tensor, offsets: trtp.Tensor, output_shape: _INTS,
              outputs: Tuple[trtp.Tensor], stream: int) -> None:
        torch, (x, off, y) = _torch_views(X, offsets, outputs[0])
        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            _kernels().deformable_sample(x, off, tuple(int(v) for v in output_shape), out=y)

    if aot:
        @trtp.aot_impl(pid)
        def _aot(X: trtp.TensorDesc, offsets: trtp.TensorDesc, output_shape: _INTS,
                 outputs: Tuple[trtp.TensorDesc], tactic: int
                 ) -> Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams,
                            trtp.SymIntExprs]:
            K = _kernels()
            po, qo, ro = (int(v) for v in output_shape)
            ck = K.compile_aot("DeformableSample3D",
                               {"x_ptr": _dtype_name(X.dtype),
                                "off_ptr": _dtype_name(offsets.dtype),
                                "y_ptr": _dtype_name(outputs[0].dtype)},
                               {"BLOCK": K.DEFORM_BLOCK}, num_warps=K.DEFORM_WARPS)
            grid = (math.ceil(po * qo * ro / K.DEFORM_BLOCK), offsets.shape_expr[0])
            sx = X.shape_expr
            args = _sym(trtp, (sx[1], sx[2], sx[3], sx[4], po, qo, ro))
            return ck.name, ck.ptx, _launch(trtp, grid, ck), args

    return "aot+jit" if aot else "jit"


# ------------------------------------------------------------------------------------------
# Correlation
# ------------------------------------------------------------------------------------------

def _define_correlation(trtp, aot: bool) -> str:
    pid = plugin_id("Correlation")

    @trtp.register(pid)
    def _desc(feat_fixed: trtp.TensorDesc, feat_moving: trtp.TensorDesc, grid: _INTS,
              disp_size: int, capture: float) -> trtp.TensorDesc:
        gi, gj, gk = (int(v) for v in grid)
        L = int(disp_size)
        return trtp.from_shape_expr((gi, gj, gk, L, L, L), dtype=feat_fixed.dtype)

    @trtp.impl(pid)
    def _impl(feat_fixed: trtp.Tensor, feat_moving: trtp.Tensor, grid: _INTS, disp_size: int,
              capture: float, outputs: Tuple[trtp.Tensor], stream: int) -> None:
        torch, (f, m, y) = _torch_views(feat_fixed, feat_moving, outputs[0])
        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            _kernels().correlation(f, m, tuple(int(v) for v in grid), int(disp_size),
                                   float(capture), out=y)

    if aot:
        @trtp.aot_impl(pid)
        def _aot(feat_fixed: trtp.TensorDesc, feat_moving: trtp.TensorDesc, grid: _INTS,
                 disp_size: int, capture: float, outputs: Tuple[trtp.TensorDesc], tactic: int
                 ) -> Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams,
                            trtp.SymIntExprs]:
            K = _kernels()
            gi, gj, gk = (int(v) for v in grid)
            L = int(disp_size)
            if float(capture) < 0:
                raise PddnetError(f"Correlation: capture must be >= 0, got {capture}")
            block = min(K.CORR_BLOCK_D, K.next_pow2(L ** 3))
            dt = _dtype_name(feat_fixed.dtype)
            ck = K.compile_aot("Correlation",
                               {"fix_ptr": dt, "mov_ptr": _dtype_name(feat_moving.dtype),
                                "out_ptr": _dtype_name(outputs[0].dtype)},
                               {"L": L, "BLOCK_D": block}, num_warps=K.CORR_WARPS)
            sx = feat_fixed.shape_expr
            args = _sym(trtp, (sx[1], sx[2], sx[3], sx[4], gi, gj, gk, K.float_bits(capture)))
            launch = _launch(trtp, (gi * gj * gk, math.ceil(L ** 3 / block)), ck)
            return ck.name, ck.ptx, launch, args

    return "aot+jit" if aot else "jit"


# ------------------------------------------------------------------------------------------
# MinConv and MeanFieldStep
# ------------------------------------------------------------------------------------------

def _check_mode(mode: str) -> str:
    if mode not in ("approx", "exact"):
        raise PddnetError(f"MinConv: unknown mode {mode!r} (expected 'approx' or 'exact')")
    return mode


def _define_minconv(trtp, aot: bool) -> str:
    pid = plugin_id("MinConv")

    @trtp.register(pid)
    def _desc(cost: trtp.TensorDesc, penalty: trtp.TensorDesc, mode: str) -> trtp.TensorDesc:
        return cost.like()

    @trtp.impl(pid)
    def _impl(cost: trtp.Tensor, penalty: trtp.Tensor, mode: str,
              outputs: Tuple[trtp.Tensor], stream: int) -> None:
        torch, (c, p, y) = _torch_views(cost, penalty, outputs[0])
        mode = _check_mode(mode)
        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            _kernels().minconv(c, mode, p if mode == "exact" else None, out=y)

    if aot:
        @trtp.aot_impl(pid)
        def _aot(cost: trtp.TensorDesc, penalty: trtp.TensorDesc, mode: str,
                 outputs: Tuple[trtp.TensorDesc], tactic: int
                 ) -> Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams,
                            trtp.SymIntExprs]:
            K = _kernels()
            exact = _check_mode(mode) == "exact"
            sc = cost.shape_expr
            L = _static(sc[5], "MinConv: the displacement size L (last axis of cost)")
            ck = K.compile_aot("MinConv",
                               {"cost_ptr": _dtype_name(cost.dtype),
                                "pen_ptr": _dtype_name(penalty.dtype),
                                "out_ptr": _dtype_name(outputs[0].dtype)},
                               {"L": L, "EXACT": exact, "BLOCK": K.minconv_block(L)},
                               num_warps=K.minconv_warps(L))
            launch = _launch(trtp, (sc[0] * sc[1] * sc[2], 1), ck)
            return ck.name, ck.ptx, launch, _sym(trtp, ())

    return "aot+jit" if aot else "jit"


def _define_mean_field_step(trtp, aot: bool) -> str:
    pid = plugin_id("MeanFieldStep")

    @trtp.register(pid)
    def _desc(cost: trtp.TensorDesc, penalty: trtp.TensorDesc, mode: str) -> trtp.TensorDesc:
        return cost.like()

    @trtp.impl(pid)
    def _impl(cost: trtp.Tensor, penalty: trtp.Tensor, mode: str,
              outputs: Tuple[trtp.Tensor], stream: int) -> None:
        torch, (c, p, y) = _torch_views(cost, penalty, outputs[0])
        mode = _check_mode(mode)
        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            # two launches on TensorRT's stream; the float32 intermediate comes from torch's
            # caching allocator on that stream
            _kernels().mean_field_step(c, mode, p if mode == "exact" else None, out=y)

    # No aot_impl: one AOT plugin is one kernel launch, MeanFieldStep needs two (module doc).
    return "jit"


# ------------------------------------------------------------------------------------------
# The fused head (pddnet.backends.trt.head): TensorRT-only ops, one AOT kernel each
# ------------------------------------------------------------------------------------------

_FLOATS = npt.NDArray[np.float32]


def _coeffs(coeffs) -> tuple:
    c = tuple(float(v) for v in np.asarray(coeffs, dtype=np.float64).reshape(-1))
    if len(c) != 3:
        raise PddnetError(f"MinConvAffine: coeffs must be [a, b, c], got {list(c)}")
    return c


def _define_minconv_affine(trtp, aot: bool) -> str:
    pid = plugin_id("MinConvAffine")

    @trtp.register(pid)
    def _desc(x: trtp.TensorDesc, y: trtp.TensorDesc, penalty: trtp.TensorDesc, mode: str,
              coeffs: _FLOATS) -> trtp.TensorDesc:
        return x.like()

    @trtp.impl(pid)
    def _impl(x: trtp.Tensor, y: trtp.Tensor, penalty: trtp.Tensor, mode: str, coeffs: _FLOATS,
              outputs: Tuple[trtp.Tensor], stream: int) -> None:
        torch, (xt, yt, p, out) = _torch_views(x, y, penalty, outputs[0])
        mode = _check_mode(mode)
        a, b, c = _coeffs(coeffs)
        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            _kernels().minconv_affine(xt, yt if b != 0.0 else None, (a, b, c), mode,
                                      p if mode == "exact" else None, out=out)

    if aot:
        @trtp.aot_impl(pid)
        def _aot(x: trtp.TensorDesc, y: trtp.TensorDesc, penalty: trtp.TensorDesc, mode: str,
                 coeffs: _FLOATS, outputs: Tuple[trtp.TensorDesc], tactic: int
                 ) -> Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams,
                            trtp.SymIntExprs]:
            K = _kernels()
            exact = _check_mode(mode) == "exact"
            a, b, c = _coeffs(coeffs)
            sx = x.shape_expr
            L = _static(sx[5], "MinConvAffine: the displacement size L (last axis)")
            ck = K.compile_aot("MinConvAffine",
                               {"x_ptr": _dtype_name(x.dtype), "y_ptr": _dtype_name(y.dtype),
                                "pen_ptr": _dtype_name(penalty.dtype),
                                "out_ptr": _dtype_name(outputs[0].dtype)},
                               {"L": L, "EXACT": exact, "HAS_Y": b != 0.0,
                                "BLOCK": K.minconv_block(L)}, num_warps=K.minconv_warps(L))
            launch = _launch(trtp, (sx[0] * sx[1] * sx[2], 1), ck)
            args = _sym(trtp, tuple(K.float_bits(v) for v in (a, b, c)))
            return ck.name, ck.ptx, launch, args

    return "aot+jit" if aot else "jit"


def _define_grid_smooth(trtp, aot: bool) -> str:
    pid = plugin_id("GridSmooth")

    @trtp.register(pid)
    def _desc(x: trtp.TensorDesc) -> trtp.TensorDesc:
        return x.like()

    @trtp.impl(pid)
    def _impl(x: trtp.Tensor, outputs: Tuple[trtp.Tensor], stream: int) -> None:
        torch, (xt, out) = _torch_views(x, outputs[0])
        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            _kernels().grid_smooth(xt, out=out)

    if aot:
        @trtp.aot_impl(pid)
        def _aot(x: trtp.TensorDesc, outputs: Tuple[trtp.TensorDesc], tactic: int
                 ) -> Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams,
                            trtp.SymIntExprs]:
            K = _kernels()
            sx = x.shape_expr
            gk = _static(sx[2], "GridSmooth: G_k (the tile height)")
            n_d = 1
            for i in range(3, len(sx)):
                n_d *= _static(sx[i], "GridSmooth: the displacement axes")
            bk, bd = K.smooth_block(gk)
            ck = K.compile_aot("GridSmooth", {"src_ptr": _dtype_name(x.dtype),
                                              "dst_ptr": _dtype_name(outputs[0].dtype)},
                               {"BLOCK_K": bk, "BLOCK_D": bd}, num_warps=K.SMOOTH_WARPS)
            launch = _launch(trtp, (sx[0] * sx[1], math.ceil(n_d / bd)), ck)
            return ck.name, ck.ptx, launch, _sym(trtp, (sx[0], sx[1], gk, n_d))

    return "aot+jit" if aot else "jit"


def _head_aot(trtp, op: str, m, capture: float, scale: float, outputs):
    """Shared ``aot_impl`` body of ``DisplacementHead`` / ``DisplacementHeadProbs``."""
    K = _kernels()
    sm = m.shape_expr
    gk = _static(sm[2], f"{op}: G_k (the tile height)")
    L = _static(sm[5], f"{op}: the displacement size L")
    bk, bd = K.head_block(gk)
    dtypes = {"src_ptr": _dtype_name(m.dtype)}
    for name, desc in zip(K.AOT_ABI[op].outputs, outputs):
        dtypes[name] = _dtype_name(desc.dtype)
    ck = K.compile_aot(op, dtypes, {"L": L, "BLOCK_K": bk, "BLOCK_D": bd},
                       num_warps=K.SMOOTH_WARPS)
    args = _sym(trtp, (sm[0], sm[1], gk, K.float_bits(scale), K.float_bits(capture)))
    return ck.name, ck.ptx, _launch(trtp, (sm[0] * sm[1], 1), ck), args


def _head_impl(m, capture, scale, outputs, stream, probs: bool) -> None:
    torch, views = _torch_views(m, *outputs)
    with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
        _kernels().displacement_head(views[0], float(scale), float(capture), probs=probs,
                                     out=tuple(views[1:]))


def _define_displacement_head(trtp, aot: bool) -> str:
    pid = plugin_id("DisplacementHead")

    @trtp.register(pid)
    def _desc(m: trtp.TensorDesc, capture: float, scale: float
              ) -> Tuple[trtp.TensorDesc, trtp.TensorDesc]:
        s = m.shape_expr
        return (trtp.from_shape_expr((s[0], s[1], s[2], 3), dtype=m.dtype),
                trtp.from_shape_expr((s[0], s[1], s[2]), dtype=m.dtype))

    @trtp.impl(pid)
    def _impl(m: trtp.Tensor, capture: float, scale: float, outputs: Tuple[trtp.Tensor],
              stream: int) -> None:
        _head_impl(m, capture, scale, outputs, stream, False)

    if aot:
        @trtp.aot_impl(pid)
        def _aot(m: trtp.TensorDesc, capture: float, scale: float,
                 outputs: Tuple[trtp.TensorDesc], tactic: int
                 ) -> Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams,
                            trtp.SymIntExprs]:
            return _head_aot(trtp, "DisplacementHead", m, capture, scale, outputs)

    return "aot+jit" if aot else "jit"


def _define_displacement_head_probs(trtp, aot: bool) -> str:
    pid = plugin_id("DisplacementHeadProbs")

    @trtp.register(pid)
    def _desc(m: trtp.TensorDesc, capture: float, scale: float
              ) -> Tuple[trtp.TensorDesc, trtp.TensorDesc, trtp.TensorDesc]:
        s = m.shape_expr
        d3 = s[3] * s[4] * s[5]
        return (trtp.from_shape_expr((s[0], s[1], s[2], 3), dtype=m.dtype),
                trtp.from_shape_expr((s[0], s[1], s[2]), dtype=m.dtype),
                trtp.from_shape_expr((s[0], s[1], s[2], d3), dtype=m.dtype))

    @trtp.impl(pid)
    def _impl(m: trtp.Tensor, capture: float, scale: float, outputs: Tuple[trtp.Tensor],
              stream: int) -> None:
        _head_impl(m, capture, scale, outputs, stream, True)

    if aot:
        @trtp.aot_impl(pid)
        def _aot(m: trtp.TensorDesc, capture: float, scale: float,
                 outputs: Tuple[trtp.TensorDesc], tactic: int
                 ) -> Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams,
                            trtp.SymIntExprs]:
            return _head_aot(trtp, "DisplacementHeadProbs", m, capture, scale, outputs)

    return "aot+jit" if aot else "jit"


#: The TensorRT-only ops of the fused head, created by :mod:`pddnet.backends.trt.head`.
HEAD_OPS = ("MinConvAffine", "GridSmooth", "DisplacementHead", "DisplacementHeadProbs")

_DEFINE = {
    "DeformableSample3D": _define_deformable_sample,
    "Correlation": _define_correlation,
    "MinConv": _define_minconv,
    "MeanFieldStep": _define_mean_field_step,
    "MinConvAffine": _define_minconv_affine,
    "GridSmooth": _define_grid_smooth,
    "DisplacementHead": _define_displacement_head,
    "DisplacementHeadProbs": _define_displacement_head_probs,
}

__all__ = ["register_plugins", "registered", "plugin_id", "HEAD_OPS"]
