"""The fused head in C: correlation -> two mean-field steps -> softmax, expectation, entropy.

A small plain-C library (``pdd_head.c`` + the kernel sets ``pdd_k_*.c``, no Python API) built
by the project's own install (``setup.py``) and called here through :mod:`ctypes`. ONNX Runtime
cannot take it as a custom-op kernel (that needs ORT's C API headers, which the wheel does not
ship), so the runtime calls it between its sessions instead: the features part runs in ONNX
Runtime, this library computes the head's cost-volume part, and the rest of the head (the
upsampling) runs in ONNX Runtime again (:class:`NativeHead`).

The ``.onnx`` stays the contract: :func:`plan_head` reads every parameter from the head graph
(the ``Correlation`` attributes, the scalar constants around the two ``MeanFieldStep`` nodes,
their mode and penalties, the softmax scale, the displacement table of the expectation) and
refuses, with the reason, any head that is not the standard float32 one (a ``Cast``, a Q/DQ
pair, an unknown node): that head runs in ONNX Runtime as before.

The same library computes the feature network's OBELISK sampling (the two
``DeformableSample3D`` nodes and their difference, ``pdd_sample.c``): the runtime's features
backend around it is :mod:`pddnet.backends.native.features`. It has no ISA-specific code.

The same library holds the ``features`` refinement loop in double precision
(``pdd_refine.c``, :func:`feature_refine`; ``pddnet.runtime.refine.feature_optimise`` calls it
where the library loads and ``PDDNET_NATIVE`` is not ``off``). It has no ISA-specific code.

Kernel sets: ``avx512`` (AVX-512 F/VL/DQ + FMA), ``avx2`` (AVX2 + FMA), ``sse2`` (x86-64
baseline) and ``portable`` (the same C without vectorisation; the only one built on other CPUs,
e.g. aarch64). The best of ``avx2``, ``sse2``, ``portable`` that this CPU runs is chosen at run
time (:data:`AUTO_ORDER`); ``PDDNET_NATIVE=off|auto|avx512|avx2|sse2|portable`` overrides it.
"""

from __future__ import annotations

import ctypes
import importlib.machinery
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pddnet.errors import PddnetError
from pddnet.spec import contract as C

ENV = "PDDNET_NATIVE"
#: the passes of one C head run, timed by the library (:attr:`HeadKernels.last_pass_ms`)
PASSES = ("prepare", "correlation+step1_jk", "step1_i+second_input", "step2_jk",
          "step2_i+softmax")
ISAS = ("portable", "sse2", "avx2", "avx512")
#: the sets ``auto`` picks from, best first. ``avx512`` is built and tested but only runs when
#: asked for: on the Xeon of docs/benchmarks.md it was slower than ``avx2`` (the head's passes
#: are bound by the L1/L2 traffic of the L^3 blocks, not by vector width)
AUTO_ORDER = ("avx2", "sse2", "portable")
ABI_VERSION = 5
#: where the build puts the library: a folder that is not a Python package, so nothing that
#: walks the package's modules tries to import it as an extension module
_HERE = Path(__file__).resolve().parent / "lib"

_lib: ctypes.CDLL | None = None
_lib_error: str | None = None
_lib_path: str | None = None


def _find_library() -> Path | None:
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        p = _HERE / f"_pddnet_head{suffix}"
        if p.is_file():
            return p
    found = sorted(_HERE.glob("_pddnet_head*.so")) + sorted(_HERE.glob("_pddnet_head*.dylib"))
    return found[0] if found else None


def _load() -> ctypes.CDLL | None:
    """The library (loaded once), or ``None`` with the reason in ``_lib_error``."""
    global _lib, _lib_error, _lib_path
    if _lib is not None or _lib_error is not None:
        return _lib
    path = _find_library()
    if path is None:
        _lib_error = ("the C kernel library is not built (no _pddnet_head library next to "
                      f"{_HERE}); reinstall with a C compiler: pip install . / make setup")
        return None
    try:
        lib = ctypes.CDLL(str(path))
        if lib.pdd_abi_version() != ABI_VERSION:
            raise OSError(f"ABI version {lib.pdd_abi_version()}, expected {ABI_VERSION}")
    except (OSError, AttributeError) as exc:
        _lib_error = f"the C kernel library {path} does not load: {exc}"
        return None
    f32p = ctypes.POINTER(ctypes.c_float)
    lib.pdd_isa_available.argtypes = [ctypes.c_int]
    lib.pdd_head_create.restype = ctypes.c_void_p
    lib.pdd_head_create.argtypes = [ctypes.POINTER(ctypes.c_int), f32p,
                                    ctypes.POINTER(ctypes.c_double)]
    lib.pdd_head_destroy.argtypes = [ctypes.c_void_p]
    lib.pdd_head_isa.argtypes = [ctypes.c_void_p]
    lib.pdd_head_bytes.argtypes = [ctypes.c_void_p]
    lib.pdd_head_bytes.restype = ctypes.c_size_t
    lib.pdd_head_last_times.argtypes = [ctypes.c_void_p]
    for name, n in (("pdd_head_run", 5), ("pdd_head_correlation", 3),
                    ("pdd_head_softmax", 4)):
        getattr(lib, name).argtypes = [ctypes.c_void_p] + [ctypes.c_void_p] * n
    for name in ("pdd_head_minconv", "pdd_head_mean_field"):
        getattr(lib, name).argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                       ctypes.c_float]
    lib.pdd_upsample.restype = ctypes.c_int
    lib.pdd_upsample.argtypes = [ctypes.c_void_p] * 7
    dp = ctypes.POINTER(ctypes.c_double)
    lib.pdd_feature_refine.restype = ctypes.c_int
    lib.pdd_feature_refine.argtypes = [ctypes.POINTER(ctypes.c_int), dp, dp, dp, dp, dp, dp]
    lib.pdd_obelisk_sample.restype = ctypes.c_int
    lib.pdd_obelisk_sample.argtypes = [ctypes.POINTER(ctypes.c_int), f32p, f32p, f32p, f32p]
    lib.pdd_conv3_work_floats.restype = ctypes.c_longlong
    lib.pdd_conv3_work_floats.argtypes = [ctypes.POINTER(ctypes.c_int)]
    lib.pdd_conv3_winograd.restype = ctypes.c_int
    lib.pdd_conv3_winograd.argtypes = [ctypes.POINTER(ctypes.c_int)] + [f32p] * 7
    _lib, _lib_path = lib, str(path)
    return lib


def requested_isa() -> str:
    """``PDDNET_NATIVE`` normalised: ``off``, ``auto`` (unset) or a kernel set name."""
    v = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if v in ("0", "no", "false", "none"):
        v = "off"
    if v not in ("off", "auto") + ISAS:
        raise PddnetError(f"{ENV}={os.environ.get(ENV)!r}: use one of off, auto, "
                          f"{', '.join(ISAS)}")
    return v


def status() -> dict[str, Any]:
    """What ``pddnet doctor`` and the summaries report: whether the library is there, which
    kernel sets this CPU runs, which one a head gets now (``isa``), or why none."""
    req = requested_isa()
    lib = _load()
    out: dict[str, Any] = {"built": lib is not None, "path": _lib_path, "requested": req,
                           "isas": {}, "isa": None, "reason": None}
    if lib is None:
        out["reason"] = _lib_error
        return out
    out["isas"] = {name: bool(lib.pdd_isa_available(i)) for i, name in enumerate(ISAS)}
    if req == "off":
        out["reason"] = f"{ENV}=off"
    elif req == "auto":
        out["isa"] = next(n for n in AUTO_ORDER if out["isas"][n])
    elif out["isas"][req]:
        out["isa"] = req
    else:
        out["reason"] = f"{ENV}={req} but this CPU or build has no {req} kernels"
    return out


# --------------------------------------------------------------------------------------------
# The `features` refinement loop (pdd_refine.c)
# --------------------------------------------------------------------------------------------

def refine_status() -> tuple[bool, str | None]:
    """Whether :func:`feature_refine` runs here: ``(True, None)``, or ``(False, reason)`` where
    the library is not built / does not load or ``PDDNET_NATIVE=off``. The loop has no
    ISA-specific code: any other ``PDDNET_NATIVE`` value runs it."""
    req = requested_isa()
    if _load() is None:
        return False, _lib_error
    if req == "off":
        return False, f"{ENV}=off"
    return True, None


def feature_refine(fixed: np.ndarray, moving: np.ndarray, theta: np.ndarray, *, steps: int,
                   lr: float, betas=(0.9, 0.999), eps: float = 1e-8, weight: float,
                   threads: int = 1) -> tuple[np.ndarray, list[float], list[float]]:
    """The whole ``features`` refinement in C, double precision (``docs/refinement.md``; the
    numpy path it equals is :func:`pddnet.runtime.refine.feature_optimise`).

    Args:
        fixed, moving: ``(N, k)`` channels-last normalised, projected features of the
            ``(n_i, n_j, n_k)`` feature grid (``FeatureSampler.fixed`` / ``.moving``).
        theta: ``(n_i, n_j, n_k, 3)`` the start, normalised units (not modified).
        steps, lr, betas, eps, weight: as :class:`pddnet.spec.refine.RefineOptions`.
        threads: pthreads over slabs of the grid (results do not depend on it).

    Returns:
        ``(S(theta) after the last step (n_i, n_j, n_k, 3) float64, [E before, E after],
        [data before, data after])``.
    """
    lib = _load()
    if lib is None:
        raise PddnetError(_lib_error or "the C kernel library is not available")
    th = np.array(theta, dtype=np.float64, order="C", copy=True)
    if th.ndim != 4 or th.shape[-1] != 3:
        raise PddnetError(f"feature_refine: theta must be (n_i, n_j, n_k, 3), got {th.shape}")
    n = th.shape[:3]
    N = int(np.prod(n))
    f = np.ascontiguousarray(fixed, dtype=np.float64)
    m = np.ascontiguousarray(moving, dtype=np.float64)
    if f.shape != m.shape or f.ndim != 2 or f.shape[0] != N or not 1 <= f.shape[1] <= 64:
        raise PddnetError(f"feature_refine: features must both be (N, k) with N = {N} and "
                          f"1 <= k <= 64, got {f.shape} and {m.shape}")
    if min(n) < 2:
        raise PddnetError(f"feature_refine: the feature grid {n} needs >= 2 points per axis")
    if int(steps) < 0:
        raise PddnetError(f"feature_refine: steps must be >= 0, got {steps}")
    ints = (ctypes.c_int * 6)(*n, f.shape[1], int(steps), max(1, int(threads)))
    params = np.array([lr, betas[0], betas[1], eps, weight], np.float64)
    u = np.empty_like(th)
    out = np.zeros(4, np.float64)
    dp = ctypes.POINTER(ctypes.c_double)
    rc = lib.pdd_feature_refine(ints, *(a.ctypes.data_as(dp) for a in (params, f, m, th, u,
                                                                          out)))
    if rc == -2:
        raise PddnetError(f"feature_refine: out of memory for the feature grid {n}")
    if rc != 0:
        raise PddnetError(f"feature_refine: the C library refused the arguments (status {rc})")
    return u, [float(out[0]), float(out[2])], [float(out[1]), float(out[3])]


# --------------------------------------------------------------------------------------------
# Reading the head from the graph
# --------------------------------------------------------------------------------------------

class NotStandardHead(PddnetError):
    """The head graph is not the standard float32 head the C kernels compute (the reason)."""


@dataclass
class HeadPlan:
    """Everything the C head needs, read from a head graph, and what ONNX Runtime still runs."""

    channels: int
    feat_shape: tuple[int, int, int]
    grid: tuple[int, int, int]
    disp_size: int
    capture: float
    mode: str
    a1: float = 1.0
    b1: float = 0.0
    a2: float = 1.0
    b2: float = 0.0
    c2: float = 1.0
    scale: float = -1.0
    shift: float = 0.0
    pen1: float = 0.0
    pen2: float = 0.0
    expect: np.ndarray = field(default_factory=lambda: np.zeros((3, 1)))
    #: tensors the C head produces for the tail: {"probs"|"grid_disp"|"entropy": graph name}
    produces: dict[str, str] = field(default_factory=dict)
    tail: Any = None  # onnx.ModelProto of the remaining nodes (None: nothing left)
    #: the upsampling to the image grid when the C library runs it (:class:`Upsampling`)
    upsample: "Upsampling | None" = None
    #: outputs that are another tensor under a second name (Identity nodes of the rest)
    aliases: dict[str, str] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        return {"grid": list(self.grid), "disp_size": self.disp_size, "capture": self.capture,
                "minconv": self.mode, "channels": self.channels,
                "affine": {"a1": self.a1, "b1": self.b1, "a2": self.a2, "c2": self.c2,
                           "b2": self.b2, "logit_scale": self.scale, "logit_shift": self.shift},
                "penalties": [self.pen1, self.pen2] if self.mode == "exact" else None,
                "native_outputs": sorted(self.produces),
                "upsampling": "native" if self.upsample is not None else "onnxruntime"}


@dataclass
class Upsampling:
    """The head's last linear map, read from its graph: ``out = scale * (U_i x U_j x U_k)
    grid`` (the trilinear upsampling of :meth:`pddnet.export.onnx_export` in voxels), with
    each interpolation matrix as CSR rows (``ptr`` of the three axes one after the other)."""

    shape: tuple[int, int, int]
    ptr: np.ndarray
    col: np.ndarray
    val: np.ndarray
    scale: np.ndarray
    output: str

    @classmethod
    def from_matrices(cls, mats: list[np.ndarray], scale: np.ndarray, output: str):
        ptr, col, val, base = [], [], [], 0
        for m in mats:
            rows, cols = np.nonzero(m)
            counts = np.bincount(rows, minlength=m.shape[0])
            ptr.append(base + np.concatenate([[0], np.cumsum(counts)]))
            col.append(cols)
            val.append(m[rows, cols])
            base += len(cols)
        return cls(tuple(int(m.shape[0]) for m in mats),
                   np.ascontiguousarray(np.concatenate(ptr), np.int32),
                   np.ascontiguousarray(np.concatenate(col), np.int32),
                   np.ascontiguousarray(np.concatenate(val), np.float32),
                   np.ascontiguousarray(scale, np.float32), output)


def _plan_upsample(tail_nodes: list, consts: dict[str, np.ndarray], grid_disp: str,
                   grid: tuple[int, int, int], outputs: list[str]) -> Upsampling | None:
    """The upsampling when the rest of the head is exactly the exporter's chain (Transpose,
    Reshape, three MatMuls by constant float32 matrices, Reshape, Transpose, Mul by a constant
    per component; Identity nodes that name outputs aside), else ``None`` (ONNX Runtime runs
    the rest)."""
    from onnx import helper

    chain = [n for n in tail_nodes
             if not (n.op_type == "Identity" and n.input[0] == grid_disp)]
    if [n.op_type for n in chain] != ["Transpose", "Reshape", "MatMul", "Reshape", "MatMul",
                                      "MatMul", "Reshape", "Transpose", "Mul"]:
        return None
    if any(n.domain not in ("", "ai.onnx") for n in chain):
        return None
    for a, b in zip(chain, chain[1:]):      # a straight chain, each node reading the last
        if a.output[0] not in b.input:
            return None
    t0, _, m0, _, m1, m2, _, t1, mul = chain

    def perm(n):
        return [int(x) for x in helper.get_attribute_value(n.attribute[0])] \
            if len(n.attribute) == 1 and n.attribute[0].name == "perm" else None

    def const(name, ndim):
        v = consts.get(name)
        return v if v is not None and v.dtype == np.float32 and v.ndim == ndim else None

    gi, gj, gk = grid
    ui, uj, ukt = const(m0.input[0], 2), const(m1.input[0], 2), const(m2.input[1], 2)
    scale = const(mul.input[1], 1)
    if (t0.input[0] != grid_disp or perm(t0) != [3, 0, 1, 2] or perm(t1) != [1, 2, 3, 0]
            or ui is None or uj is None or ukt is None or scale is None or scale.shape != (3,)
            or ui.shape[1] != gi or uj.shape[1] != gj or ukt.shape[0] != gk
            or mul.output[0] not in outputs or mul.input[0] != t1.output[0]):
        return None
    return Upsampling.from_matrices([ui, uj, np.ascontiguousarray(ukt.T)], scale, mul.output[0])


class _Form:
    """A tensor as an affine combination of the head's volumes: sum coef[sym] sym + const."""

    def __init__(self, coef: dict[str, float], const: float = 0.0, reshaped: bool = False):
        self.coef, self.const, self.reshaped = dict(coef), float(const), reshaped

    def scaled(self, k: float) -> "_Form":
        return _Form({s: c * k for s, c in self.coef.items()}, self.const * k, self.reshaped)

    def plus(self, other: "_Form | float", sign: float = 1.0) -> "_Form":
        if isinstance(other, _Form):
            coef = dict(self.coef)
            for s, c in other.coef.items():
                coef[s] = coef.get(s, 0.0) + sign * c
            return _Form(coef, self.const + sign * other.const, self.reshaped or other.reshaped)
        return _Form(self.coef, self.const + sign * float(other), self.reshaped)

    def only(self, *syms: str) -> bool:
        return set(s for s, c in self.coef.items() if c != 0.0) <= set(syms)


def plan_head(head: Any) -> HeadPlan:
    """Read the C head's parameters from a head model (``onnx.ModelProto``, the ``head`` part
    of :func:`pddnet.graph.split.split_model`). Raises :class:`NotStandardHead` with the reason
    when the graph is not the standard float32 head."""
    import onnx
    from onnx import helper

    from pddnet.graph.passes.constants import constant_values
    from pddnet.graph.split import _make_part, _value_types

    g = head.graph
    consts = constant_values(g)
    inputs = {i.name: i for i in g.input if i.name not in consts}
    for name in (C.FIXED_FEATURES, C.MOVING_FEATURES):
        if name not in inputs:
            raise NotStandardHead(f"the head has no input {name!r}")
        tt = inputs[name].type.tensor_type
        if tt.elem_type != onnx.TensorProto.FLOAT:
            raise NotStandardHead(f"head input {name!r} is not float32")
    dims = [d.dim_value for d in inputs[C.FIXED_FEATURES].type.tensor_type.shape.dim]
    if len(dims) != 5 or dims[0] != 1 or min(dims) < 1:
        raise NotStandardHead(f"fixed_features has shape {dims}, expected static (1, C, I, J, K)")

    nodes = list(g.node)
    index = {n.name: i for i, n in enumerate(nodes)}
    if len(index) != len(nodes):
        raise NotStandardHead("the head's node names are not unique")
    corr = [n for n in nodes if n.domain == C.DOMAIN and n.op_type == "Correlation"]
    if len(corr) != 1:
        raise NotStandardHead(f"the head has {len(corr)} Correlation nodes, expected 1")
    corr = corr[0]
    if list(corr.input) != [C.FIXED_FEATURES, C.MOVING_FEATURES]:
        raise NotStandardHead("the Correlation node does not read the two float32 feature "
                              f"inputs directly (inputs {list(corr.input)}: a cast or another "
                              "precision)")
    at = {a.name: helper.get_attribute_value(a) for a in corr.attribute}
    try:
        grid = tuple(int(x) for x in at["grid"])
        L = int(at["disp_size"])
        q = float(at["capture"])
    except (KeyError, TypeError, ValueError) as exc:
        raise NotStandardHead(f"the Correlation node lacks an attribute ({exc})") from exc
    if len(grid) != 3 or L < 1 or L % 2 == 0 or L > 64:
        raise NotStandardHead(f"Correlation grid {grid} / disp_size {L} not supported")
    plan = HeadPlan(channels=dims[1], feat_shape=tuple(dims[2:]), grid=grid, disp_size=L,
                    capture=q, mode="approx")

    def scalar(name: str) -> float | None:
        v = consts.get(name)
        if v is None or v.size != 1 or v.dtype != np.float32:
            return None
        return float(v.reshape(()))

    forms: dict[str, _Form] = {corr.output[0]: _Form({"ssd": 1.0})}
    region = {index[corr.name]}
    mfs: list[tuple[_Form, str, float]] = []
    logits: _Form | None = None
    probs = logp = None
    cost_shape = (*grid, L, L, L)
    flat_shape = (*grid, L ** 3)
    for n in nodes:
        ins = [x for x in n.input if x]
        if not any(x in forms for x in ins):
            continue
        op = (n.domain or "", n.op_type)
        a = {x.name: helper.get_attribute_value(x) for x in n.attribute}
        if op in (("", "Mul"), ("", "Add"), ("", "Sub")) and len(ins) == 2:
            f0, f1 = (forms.get(x) for x in ins)
            k0, k1 = scalar(ins[0]), scalar(ins[1])
            if op[1] == "Mul":
                if f0 is not None and k1 is not None:
                    out = f0.scaled(k1)
                elif f1 is not None and k0 is not None:
                    out = f1.scaled(k0)
                else:
                    raise NotStandardHead(f"node {n.name!r}: Mul of two volumes")
            else:
                sign = -1.0 if op[1] == "Sub" else 1.0
                if f0 is not None and (f1 is not None or k1 is not None):
                    out = f0.plus(f1 if f1 is not None else k1, sign)
                elif f1 is not None and k0 is not None and sign > 0:
                    out = f1.plus(k0)
                else:
                    raise NotStandardHead(f"node {n.name!r}: {op[1]} with a non-scalar operand")
            forms[n.output[0]] = out
        elif op == ("", "Identity"):
            forms[n.output[0]] = forms[ins[0]]
        elif op == ("", "Reshape"):
            shape = consts.get(ins[1])
            src = forms.get(ins[0])
            if src is None or shape is None or tuple(int(s) for s in shape) not in (
                    cost_shape, flat_shape):
                raise NotStandardHead(f"node {n.name!r}: Reshape to an unexpected shape")
            forms[n.output[0]] = _Form(src.coef, src.const,
                                       tuple(int(s) for s in shape) == flat_shape)
        elif op == (C.DOMAIN, "MeanFieldStep"):
            src = forms.get(ins[0])
            if src is None or src.reshaped:
                raise NotStandardHead(f"node {n.name!r}: unexpected MeanFieldStep input")
            mode = a.get("mode", b"approx")
            mode = mode.decode() if isinstance(mode, bytes) else str(mode)
            pen = 0.0
            if mode == "exact":
                pen = scalar(ins[1]) if len(ins) > 1 else None
                if pen is None or not pen > 0:
                    raise NotStandardHead(f"node {n.name!r}: exact mode without a constant "
                                          "positive penalty")
            elif mode != "approx":
                raise NotStandardHead(f"node {n.name!r}: unknown mode {mode!r}")
            mfs.append((src, mode, pen))
            forms[n.output[0]] = _Form({f"mfs{len(mfs)}": 1.0})
        elif op in (("", "Softmax"), ("", "LogSoftmax")):
            src = forms[ins[0]]
            if not src.reshaped or a.get("axis", -1) not in (-1, 3):
                raise NotStandardHead(f"node {n.name!r}: softmax not over the L^3 displacements")
            if logits is not None and (logits.coef != src.coef or logits.const != src.const):
                raise NotStandardHead("softmax and log-softmax of different logits")
            logits = src
            if op[1] == "Softmax":
                if probs is not None:
                    raise NotStandardHead("two Softmax nodes")
                probs = n.output[0]
            else:
                logp = n.output[0]
            region.add(index[n.name])
            continue
        else:
            raise NotStandardHead(f"node {n.name!r} ({op[1]}) reads the cost volume; the C "
                                  "head computes only the standard float32 head")
        region.add(index[n.name])

    if len(mfs) != 2 or logits is None or probs is None:
        raise NotStandardHead(f"expected two MeanFieldStep nodes and a Softmax, found "
                              f"{len(mfs)} steps{'' if probs else ' and no Softmax'}")
    (f1, mode1, pen1), (f2, mode2, pen2) = mfs
    if mode1 != mode2:
        raise NotStandardHead("the two mean-field steps use different modes")
    if not (f1.only("ssd") and f2.only("ssd", "mfs1") and logits.only("mfs2")):
        raise NotStandardHead("the mean-field inputs or the logits are not the standard "
                              "affine combinations")
    plan.mode = mode1
    plan.a1, plan.b1 = f1.coef.get("ssd", 0.0), f1.const
    plan.a2, plan.c2, plan.b2 = f2.coef.get("ssd", 0.0), f2.coef.get("mfs1", 0.0), f2.const
    plan.scale, plan.shift = logits.coef.get("mfs2", 0.0), logits.const
    plan.pen1, plan.pen2 = pen1, pen2

    # consumers of the probabilities: the expectation, the entropy chain, the outputs
    consumers: dict[str, list] = {}
    for n in nodes:
        for x in n.input:
            consumers.setdefault(x, []).append(n)
    expect = None
    produces = {"probs": probs}
    for n in consumers.get(probs, []):
        if n.op_type == "MatMul" and n.domain in ("", "ai.onnx") and n.input[0] == probs:
            d = consts.get(n.input[1])
            if d is None or d.shape != (L ** 3, 3) or d.dtype != np.float32:
                raise NotStandardHead(f"node {n.name!r}: expectation without a constant "
                                      "(L^3, 3) displacement table")
            lat = d.astype(np.float64).reshape(L, L, L, 3)
            axes = np.stack([lat[:, 0, 0, 0], lat[0, :, 0, 1], lat[0, 0, :, 2]])
            want = np.stack(np.meshgrid(*axes, indexing="ij"), -1)
            if not np.array_equal(want, lat):
                raise NotStandardHead("the expectation's displacement table is not a "
                                      "tensor-product lattice")
            expect = axes
            produces["grid_disp"] = n.output[0]
            region.add(index[n.name])
    if expect is None:
        raise NotStandardHead("no expectation (MatMul of the probabilities) in the head")
    plan.expect = expect
    if logp is not None:  # -ReduceSum(probs * logp, -1): the entropy
        mul = [n for n in consumers.get(logp, []) if n.op_type == "Mul"
               and set(n.input) == {probs, logp}]
        red = [n for m in mul for n in consumers.get(m.output[0], [])
               if n.op_type == "ReduceSum"]
        neg = [n for r in red for n in consumers.get(r.output[0], []) if n.op_type == "Neg"]
        ok = len(mul) == len(red) == len(neg) == 1 and len(consumers.get(logp, [])) == 1
        if ok:
            r = red[0]
            axes_in = consts.get(r.input[1]) if len(r.input) > 1 else None
            ra = {x.name: helper.get_attribute_value(x) for x in r.attribute}
            ok = axes_in is not None and [int(v) for v in np.ravel(axes_in)] in ([-1], [3]) \
                and int(ra.get("keepdims", 1)) == 0
        if not ok:
            raise NotStandardHead("the log-softmax is not the standard entropy")
        region |= {index[mul[0].name], index[red[0].name], index[neg[0].name]}
        region.add(next(i for i, n in enumerate(nodes) if logp in n.output))
        produces["entropy"] = neg[0].output[0]

    tail_nodes = [n for i, n in enumerate(nodes) if i not in region]
    made = {v for v in produces.values()}
    outputs = [o.name for o in g.output]
    tail_reads = {x for n in tail_nodes for x in n.input if x}
    tail_made = {o for n in tail_nodes for o in n.output}
    for x in tail_reads - tail_made - set(consts):
        if x not in made:
            raise NotStandardHead(f"the rest of the head reads {x!r}, which the C head does "
                                  "not produce")
    for o in outputs:
        if o not in tail_made and o not in made:
            raise NotStandardHead(f"output {o!r} is produced inside the fused part")
    plan.produces = {k: v for k, v in produces.items() if v in tail_reads or v in outputs
                     or k == "grid_disp"}
    tail_out = [o for o in outputs if o in tail_made]
    plan.upsample = _plan_upsample(tail_nodes, consts, produces["grid_disp"], grid, outputs)
    if plan.upsample is not None:
        tail_out = []   # the C library runs the whole rest; Identity outputs are aliases
        plan.aliases = {n.output[0]: n.input[0] for n in tail_nodes if n.op_type == "Identity"}
    if tail_out:
        types = _value_types(head)
        tin = [v for v in plan.produces.values() if v in tail_reads]
        plan.tail = _make_part(head, tail_nodes, "head_tail",
                               inputs=[(x, x) for x in tin], outputs=[(o, o) for o in tail_out],
                               types=types)
    return plan


# --------------------------------------------------------------------------------------------
# The library's session object
# --------------------------------------------------------------------------------------------

def _ptr(a: np.ndarray | None):
    return None if a is None else a.ctypes.data_as(ctypes.c_void_p)


class HeadKernels:
    """One C head session: scratch (two cost volumes and the sampled moving features) is
    allocated here, once, and every call reuses it. ``isa``: a kernel set name or ``None``
    (the best this CPU runs, or ``PDDNET_NATIVE``)."""

    def __init__(self, plan: HeadPlan, *, threads: int | None = None, isa: str | None = None):
        lib = _load()
        if lib is None:
            raise PddnetError(_lib_error or "the C kernel library is not available")
        if isa is None:
            st = status()
            if st["isa"] is None:
                raise PddnetError(f"the C head is off: {st['reason']}")
            isa = st["isa"]
        if isa not in ISAS:
            raise PddnetError(f"unknown kernel set {isa!r}; one of {ISAS}")
        if not lib.pdd_isa_available(ISAS.index(isa)):
            raise PddnetError(f"the {isa} kernels are not available on this CPU/build")
        self.plan = plan
        self.threads = int(threads or os.cpu_count() or 1)
        L = plan.disp_size
        ints = (ctypes.c_int * 11)(plan.channels, *plan.feat_shape, *plan.grid, L,
                                   0 if plan.mode == "approx" else 1, self.threads,
                                   ISAS.index(isa))
        fl = np.concatenate([[plan.a1, plan.b1, plan.a2, plan.b2, plan.c2, plan.scale,
                              plan.shift, plan.pen1, plan.pen2],
                             np.asarray(plan.expect, np.float64).reshape(-1)]).astype(np.float32)
        disp = np.tile(np.linspace(-plan.capture, plan.capture, L), 3).astype(np.float64)
        if L == 1:
            disp[:] = -plan.capture
        self._lib = lib
        t0 = time.perf_counter()
        self._h = lib.pdd_head_create(ints, fl.ctypes.data_as(ctypes.POINTER(ctypes.c_float)),
                                      disp.ctypes.data_as(ctypes.POINTER(ctypes.c_double)))
        if not self._h:
            raise PddnetError(f"the C head could not allocate its buffers for grid {plan.grid}, "
                              f"L = {L} (out of memory?)")
        self.create_ms = (time.perf_counter() - t0) * 1e3
        self.isa = ISAS[lib.pdd_head_isa(self._h)]
        self.scratch_bytes = int(lib.pdd_head_bytes(self._h))
        self.last_pass_ms: dict[str, float] = {}

    @property
    def cost_shape(self) -> tuple[int, ...]:
        L = self.plan.disp_size
        return (*self.plan.grid, L, L, L)

    def _feat(self, x: np.ndarray) -> np.ndarray:
        want = (1, self.plan.channels, *self.plan.feat_shape)
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.shape != want:
            raise PddnetError(f"C head: features of shape {x.shape}, expected {want}")
        return x

    def _vol(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.shape != self.cost_shape:
            raise PddnetError(f"C head: volume of shape {x.shape}, expected {self.cost_shape}")
        return x

    def run(self, fixed: np.ndarray, moving: np.ndarray, *, probs: bool = False,
            entropy: bool = False) -> dict[str, np.ndarray]:
        """``{"grid_disp": (G..., 3)[, "probs": (G..., L^3)][, "entropy": (G...)]}``."""
        fixed, moving = self._feat(fixed), self._feat(moving)
        g, L = self.plan.grid, self.plan.disp_size
        out = {"grid_disp": np.empty((*g, 3), np.float32)}
        if probs:
            out["probs"] = np.empty((*g, L ** 3), np.float32)
        if entropy:
            out["entropy"] = np.empty(g, np.float32)
        rc = self._lib.pdd_head_run(self._h, _ptr(fixed), _ptr(moving), _ptr(out.get("probs")),
                                    _ptr(out["grid_disp"]), _ptr(out.get("entropy")))
        if rc != 0:
            raise PddnetError(f"the C head failed (status {rc})")
        times = np.zeros(5, np.float64)
        self._lib.pdd_head_last_times(_ptr(times))
        self.last_pass_ms = dict(zip(PASSES, (float(t) for t in times)))
        return out

    def upsample(self, up: Upsampling, grid_disp: np.ndarray) -> np.ndarray:
        """The grid displacements on the image grid (``(n_i, n_j, n_k, 3)``, a new array)."""
        g = self.plan.grid
        grid_disp = np.ascontiguousarray(grid_disp, dtype=np.float32)
        if grid_disp.shape != (*g, 3):
            raise PddnetError(f"C upsampling: grid of shape {grid_disp.shape}, expected "
                              f"{(*g, 3)}")
        out = np.empty((*up.shape, 3), np.float32)
        ints = np.array([*g, *up.shape, self.threads], np.int32)
        rc = self._lib.pdd_upsample(_ptr(ints), _ptr(up.ptr), _ptr(up.col), _ptr(up.val),
                                    _ptr(up.scale), _ptr(grid_disp), _ptr(out))
        if rc != 0:
            raise PddnetError("the C upsampling could not allocate its scratch (out of memory?)")
        return out

    # single steps (tests, diagnostics)
    def correlation(self, fixed: np.ndarray, moving: np.ndarray) -> np.ndarray:
        out = np.empty(self.cost_shape, np.float32)
        self._lib.pdd_head_correlation(self._h, _ptr(self._feat(fixed)),
                                       _ptr(self._feat(moving)), _ptr(out))
        return out

    def minconv(self, cost: np.ndarray, penalty: float = 0.0) -> np.ndarray:
        out = np.empty(self.cost_shape, np.float32)
        self._lib.pdd_head_minconv(self._h, _ptr(self._vol(cost)), _ptr(out), float(penalty))
        return out

    def mean_field_step(self, cost: np.ndarray, penalty: float = 0.0) -> np.ndarray:
        out = np.empty(self.cost_shape, np.float32)
        self._lib.pdd_head_mean_field(self._h, _ptr(self._vol(cost)), _ptr(out), float(penalty))
        return out

    def softmax(self, cost: np.ndarray) -> dict[str, np.ndarray]:
        """softmax of ``scale * cost + shift``, its expectation and entropy."""
        g, L = self.plan.grid, self.plan.disp_size
        out = {"probs": np.empty((*g, L ** 3), np.float32),
               "grid_disp": np.empty((*g, 3), np.float32), "entropy": np.empty(g, np.float32)}
        self._lib.pdd_head_softmax(self._h, _ptr(self._vol(cost)), _ptr(out["probs"]),
                                   _ptr(out["grid_disp"]), _ptr(out["entropy"]))
        return out

    def close(self) -> None:
        if getattr(self, "_h", None):
            self._lib.pdd_head_destroy(self._h)
            self._h = None

    def __del__(self):  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass


# --------------------------------------------------------------------------------------------
# The head as a backend: C kernels for the cost-volume part, ONNX Runtime for the rest
# --------------------------------------------------------------------------------------------

from pddnet.backends.base import Backend, TensorSpec  # noqa: E402  (after the helpers above)


class NativeHeadBackend(Backend):
    """A head model run by the C kernels (:class:`HeadKernels`) plus an ONNX Runtime session
    for the nodes after the expectation (the upsampling to the image grid). Same inputs and
    outputs as the head model. ``threads`` is the C head's thread count too; the other
    options go to the ONNX Runtime session of the rest. :meth:`activate` raises
    :class:`NotStandardHead` (or :class:`PddnetError`) when the head cannot run here."""

    name = "native"

    def __init__(self, model: Any, *, label: str = "head", threads: int | None = None,
                 isa: str | None = None, **ort_options: Any):
        super().__init__(model, label=label)
        self.threads = threads
        self.isa_request = isa
        self._ort_options = dict(ort_options)
        self._kernels: HeadKernels | None = None
        self._tail = None
        self.plan: HeadPlan | None = None
        self.last_kernel_ms: float | None = None

    def _load_impl(self) -> None:
        from pddnet.backends.onnxrt import OnnxRuntimeBackend

        self.plan = plan_head(self._model)
        self._kernels = HeadKernels(self.plan, threads=self.threads, isa=self.isa_request)
        if self.plan.tail is not None:
            try:
                self._tail = OnnxRuntimeBackend(self.plan.tail, label=f"{self.label}_tail",
                                                threads=self.threads, stages=False,
                                                **self._ort_options).activate()
            except BaseException:
                self._kernels.close()
                raise

    def _unload_impl(self) -> None:
        if self._tail is not None:
            self._tail.deactivate()
        if self._kernels is not None:
            self._kernels.close()
        self._tail = self._kernels = None

    def _input_specs_impl(self) -> list[TensorSpec]:
        p = self.plan
        shape = (1, p.channels, *p.feat_shape)
        return [TensorSpec(C.FIXED_FEATURES, np.dtype(np.float32), shape),
                TensorSpec(C.MOVING_FEATURES, np.dtype(np.float32), shape)]

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self._model.graph.output]

    def _run_impl(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        p = self.plan
        t0 = time.perf_counter()
        got = self._kernels.run(feeds[C.FIXED_FEATURES], feeds[C.MOVING_FEATURES],
                                probs="probs" in p.produces, entropy="entropy" in p.produces)
        self.last_kernel_ms = (time.perf_counter() - t0) * 1e3
        named = {p.produces[k]: v for k, v in got.items() if k in p.produces}
        out = dict(named)
        if p.upsample is not None:
            out[p.upsample.output] = self._kernels.upsample(p.upsample, got["grid_disp"])
            out.update({alias: named[src] for alias, src in p.aliases.items()})
        if self._tail is not None:
            feeds2 = {s.name: named[s.name] for s in self._tail.input_specs}
            out.update(self._tail.run(feeds2))
        return {o: out[o] for o in self.output_names}

    def _describe_impl(self) -> dict[str, Any]:
        k = self._kernels
        return {"head": "native", "isa": k.isa, "threads": k.threads,
                "scratch_mb": round(k.scratch_bytes / 2 ** 20, 1),
                "library": _lib_path, "plan": self.plan.describe(),
                "tail": None if self._tail is None else self._tail.describe()}
