"""The OBELISK sampling of the feature network in C, between two ONNX Runtime sessions.

The features part of a model (:func:`pddnet.graph.split.split_model`) is ``image`` -> pool,
``Conv0`` + ReLU (the 4-channel map ``X``) -> two ``DeformableSample3D`` nodes on ``X`` with
two offset sets -> their difference (``Sub``, "ObeliskDiff") -> ``Conv1`` ... ``Conv3`` ->
``features``. ONNX Runtime runs the ``DeformableSample3D`` function bodies as dense
interpolation matrices and batched MatMuls; :class:`NativeFeaturesBackend` runs the part before
the sampling and the part after it in ONNX Runtime (two sessions) and the sampling and the
difference in one pass of the C library (``pdd_sample.c``, :func:`obelisk_sample`).

:func:`plan_features` reads the sampling from the graph (the two nodes and their ``Sub``, the
offsets -- initializers or ``Constant`` nodes -- and ``output_shape``) and refuses, with the
reason, any features part that is not that pattern in float32 (a sampled map of another type,
more or fewer nodes, another reader of the sampled tensors); the runtime then runs the plain
ONNX Runtime features session (:class:`pddnet.runtime.runner.PairRunner`). What surrounds the
sampling stays in the ONNX Runtime parts as the graph has it: an INT8 graph's
``QuantizeLinear`` on the difference (``Conv1`` in INT8) or a ``DequantizeLinear`` / ``Cast``
giving a float32 map, so the C pass computes exactly the float32 nodes the graph holds.
"""

from __future__ import annotations

import ctypes
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from pddnet.backends import native as nat
from pddnet.backends.base import Backend, TensorSpec
from pddnet.backends.native.conv import ConvPlan, conv3x3x3, plan_conv, work_floats
from pddnet.errors import PddnetError
from pddnet.spec import contract as C


class NotStandardFeatures(PddnetError):
    """The features graph is not the float32 OBELISK pattern the C sampling computes."""


def sampling_status() -> tuple[bool, str | None]:
    """Whether the C sampling runs here: ``(True, None)``, or ``(False, reason)`` where the
    library is not built / does not load or ``PDDNET_NATIVE=off`` (it has no ISA-specific
    code: any other ``PDDNET_NATIVE`` value runs it)."""
    return nat.refine_status()


def obelisk_sample(x: np.ndarray, offsets0: np.ndarray, offsets1: np.ndarray,
                   output_shape, *, threads: int = 1, out: np.ndarray | None = None) -> np.ndarray:
    """``sample(x, offsets0) - sample(x, offsets1)`` in one C pass (``docs/ops.md``,
    ``DeformableSample3D``: trilinear, border clamp, ``align_corners=False``).

    Args:
        x: ``(1, C, I, J, K)`` float32.
        offsets0, offsets1: ``(S, 3)`` normalised offsets (array order), the same ``S``.
        output_shape: ``(I', J', K')``.
        threads: pthreads over output slabs (results do not depend on it).
        out: a ``(1, C*S, I', J', K')`` float32 C-contiguous array to write (else a new one).

    Returns:
        ``(1, C*S, I', J', K')`` float32; channel ``c*S + s`` is channel ``c`` at offset ``s``.
    """
    lib = nat._load()
    if lib is None:
        raise PddnetError(nat._lib_error or "the C kernel library is not available")
    x = np.ascontiguousarray(x, dtype=np.float32)
    o0 = np.ascontiguousarray(offsets0, dtype=np.float32)
    o1 = np.ascontiguousarray(offsets1, dtype=np.float32)
    m = tuple(int(v) for v in output_shape)
    if x.ndim != 5 or x.shape[0] != 1 or min(x.shape) < 1:
        raise PddnetError(f"obelisk_sample: x must be (1, C, I, J, K), got {x.shape}")
    if o0.ndim != 2 or o0.shape[1] != 3 or o0.shape != o1.shape or o0.shape[0] < 1:
        raise PddnetError(f"obelisk_sample: offsets must both be (S, 3), got {o0.shape} and "
                          f"{o1.shape}")
    if len(m) != 3 or min(m) < 1:
        raise PddnetError(f"obelisk_sample: output_shape must be 3 positive sizes, got {m}")
    want = (1, x.shape[1] * o0.shape[0], *m)
    if out is None:
        out = np.empty(want, np.float32)
    elif out.shape != want or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise PddnetError(f"obelisk_sample: out must be a C-contiguous float32 {want} array")
    ints = (ctypes.c_int * 9)(x.shape[1], *x.shape[2:], o0.shape[0], *m, max(1, int(threads)))
    fp = ctypes.POINTER(ctypes.c_float)
    rc = lib.pdd_obelisk_sample(ints, *(a.ctypes.data_as(fp) for a in (x, o0, o1, out)))
    if rc == -2:
        raise PddnetError(f"obelisk_sample: out of memory for {x.shape} -> {want}")
    if rc != 0:
        raise PddnetError(f"obelisk_sample: the C library refused the arguments (status {rc})")
    return out


# --------------------------------------------------------------------------------------------
# Reading the sampling from the features graph
# --------------------------------------------------------------------------------------------

@dataclass
class SamplingPlan:
    """The OBELISK sampling read from a features graph, and the two ONNX Runtime parts."""

    channels: int
    in_shape: tuple[int, int, int]
    out_shape: tuple[int, int, int]
    offsets0: np.ndarray  # (S, 3) float32: the Sub's first operand
    offsets1: np.ndarray  # (S, 3) float32: subtracted
    x_name: str           # the sampled map (the "pre" part's output)
    y_name: str           # the difference (the "post" part's input)
    nodes: tuple[str, str, str]  # the two DeformableSample3D nodes and the Sub
    pre: Any = None       # onnx.ModelProto: image -> X
    post: Any = None      # onnx.ModelProto: Y -> features

    @property
    def offsets(self) -> int:
        return int(self.offsets0.shape[0])

    @property
    def y_shape(self) -> tuple[int, ...]:
        return (1, self.channels * self.offsets, *self.out_shape)

    def describe(self) -> dict[str, Any]:
        return {"nodes": list(self.nodes), "channels": self.channels,
                "input_shape": list(self.in_shape), "output_shape": list(self.out_shape),
                "offsets": self.offsets}


def plan_features(features: Any) -> SamplingPlan:
    """Read the C sampling's parameters from a features model (``onnx.ModelProto``, the
    ``features`` part of :func:`pddnet.graph.split.split_model`) and build the parts before
    and after it. Raises :class:`NotStandardFeatures` with the reason when the graph is not
    the standard float32 pattern."""
    import onnx
    from onnx import helper

    from pddnet.graph.passes.constants import constant_values
    from pddnet.graph.split import _backward, _make_part, _value_types

    g = features.graph
    consts = constant_values(g)
    ins = [i.name for i in g.input if i.name not in consts]
    outs = [o.name for o in g.output]
    if ins != [C.FEATURES_INPUT] or outs != [C.FEATURES_OUTPUT]:
        raise NotStandardFeatures(f"the features part has inputs {ins} and outputs {outs}, "
                                  f"expected [{C.FEATURES_INPUT!r}] -> [{C.FEATURES_OUTPUT!r}]")
    ds = [n for n in g.node if n.domain == C.DOMAIN and n.op_type == "DeformableSample3D"]
    if len(ds) != 2:
        raise NotStandardFeatures(f"the features part has {len(ds)} DeformableSample3D nodes, "
                                  "expected 2")
    readers: dict[str, list] = {}
    for n in g.node:
        for x in n.input:
            readers.setdefault(x, []).append(n)
    producer = {o: n for n in g.node for o in n.output if o}
    for n in ds:
        if len(n.input) != 2 or len(n.output) != 1:
            raise NotStandardFeatures(f"DeformableSample3D node {n.name!r} has "
                                      f"{len(n.input)} inputs and {len(n.output)} outputs")
    x_name = ds[0].input[0]
    if ds[1].input[0] != x_name:
        raise NotStandardFeatures("the two DeformableSample3D nodes sample different maps")
    shapes = []
    for n in ds:
        at = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        try:
            shapes.append(tuple(int(v) for v in at["output_shape"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise NotStandardFeatures(f"DeformableSample3D node {n.name!r} lacks output_shape "
                                      f"({exc})") from exc
    if shapes[0] != shapes[1] or len(shapes[0]) != 3 or min(shapes[0]) < 1:
        raise NotStandardFeatures(f"DeformableSample3D output shapes {shapes} are not one valid "
                                  "(I', J', K')")
    offs = []
    for n in ds:
        o = consts.get(n.input[1])
        if o is None:
            raise NotStandardFeatures(f"the offsets of {n.name!r} ({n.input[1]!r}) are not a "
                                      "constant of the graph")
        if o.dtype != np.float32 or o.ndim != 2 or o.shape[1] != 3 or o.shape[0] < 1:
            raise NotStandardFeatures(f"the offsets of {n.name!r} are {o.dtype} {o.shape}, "
                                      "expected float32 (S, 3)")
        offs.append(np.ascontiguousarray(o))
    if offs[0].shape != offs[1].shape:
        raise NotStandardFeatures(f"the two offset sets differ in size: {offs[0].shape} and "
                                  f"{offs[1].shape}")
    subs = {tuple(r.output): r for n in ds for r in readers.get(n.output[0], [])}
    sub = next(iter(subs.values())) if len(subs) == 1 else None
    if sub is None or sub.op_type != "Sub" or sub.domain not in ("", "ai.onnx") or \
            sorted(sub.input) != sorted(n.output[0] for n in ds) or \
            any(len(readers.get(n.output[0], [])) != 1 or n.output[0] in outs for n in ds):
        what = sorted({f"{r.op_type} {r.name!r}" for r in subs.values()})
        raise NotStandardFeatures("the two sampled tensors are not read by one Sub of the "
                                  f"two (read by {what})")
    o0, o1 = (offs[0], offs[1]) if sub.input[0] == ds[0].output[0] else (offs[1], offs[0])
    y_name = sub.output[0]
    if y_name in outs:
        raise NotStandardFeatures("the sampled difference is the features part's output")
    types = dict(_value_types(features))
    xt = types.get(x_name)
    if xt is None:
        raise NotStandardFeatures(f"the type of the sampled map {x_name!r} is unknown")
    tt = xt.tensor_type
    if tt.elem_type != onnx.TensorProto.FLOAT:
        p = producer.get(x_name)
        src = f" (from {p.op_type} {p.name!r})" if p is not None else ""
        raise NotStandardFeatures(f"the sampled map {x_name!r} is "
                                  f"{onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)}{src}, "
                                  "not float32: another precision")
    dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim]
    if len(dims) != 5 or dims[0] != 1 or min(dims) < 1:
        raise NotStandardFeatures(f"the sampled map {x_name!r} has shape {dims}, expected static "
                                  "(1, C, I, J, K)")
    plan = SamplingPlan(channels=dims[1], in_shape=tuple(dims[2:]), out_shape=shapes[0],
                        offsets0=o0, offsets1=o1, x_name=x_name, y_name=y_name,
                        nodes=(ds[0].name, ds[1].name, sub.name))
    types[y_name] = helper.make_tensor_type_proto(onnx.TensorProto.FLOAT, plan.y_shape)
    if x_name == C.FEATURES_INPUT:
        raise NotStandardFeatures("the sampling reads the image directly")
    try:
        pre_nodes = _backward(g, [x_name], stop={C.FEATURES_INPUT}, part="features")
        post_nodes = _backward(g, [C.FEATURES_OUTPUT], stop={y_name}, part="features")
    except PddnetError as exc:
        raise NotStandardFeatures(f"the features part does not cut at the sampling: {exc}") \
            from exc
    key = lambda n: tuple(n.output)  # noqa: E731  (outputs name a node: SSA)
    sampling = {key(n) for n in ds} | {key(sub)}
    pre_keys = {key(n) for n in pre_nodes}
    if any(key(n) in pre_keys or key(n) in sampling for n in post_nodes) or \
            any(key(n) in sampling for n in pre_nodes):
        raise NotStandardFeatures("the part after the sampling reads tensors from before it")
    plan.pre = _make_part(features, pre_nodes, "features_pre",
                          inputs=[(C.FEATURES_INPUT, C.FEATURES_INPUT)],
                          outputs=[(x_name, x_name)], types=types)
    plan.post = _make_part(features, post_nodes, "features_post", inputs=[(y_name, y_name)],
                           outputs=[(C.FEATURES_OUTPUT, C.FEATURES_OUTPUT)], types=types)
    return plan


# --------------------------------------------------------------------------------------------
# The features as a backend
# --------------------------------------------------------------------------------------------

class NativeFeaturesBackend(Backend):
    """A features model run as ONNX Runtime (image -> ``X``) + the C sampling (``X`` -> the
    OBELISK difference) + ONNX Runtime (-> ``features``). Same input and output as the
    features model. ``threads`` is the C sampling's thread count too; the other options go to
    the two ONNX Runtime sessions. :meth:`activate` raises :class:`NotStandardFeatures` (or
    :class:`PddnetError`) when the features cannot run here.

    :meth:`describe` is the first ONNX Runtime session's description (backend
    ``onnxruntime``: the engine that runs the network) with ``native_sampling`` added."""

    name = "native"

    def __init__(self, model: Any, *, label: str = "features", threads: int | None = None,
                 conv: bool = True, **ort_options: Any):
        super().__init__(model, label=label)
        self.threads = int(threads or os.cpu_count() or 1)
        self._ort_options = dict(ort_options)
        self._want_conv = conv
        self._pre = self._post = self._post_b = None
        self._y: np.ndarray | None = None
        self._conv_bufs: tuple[np.ndarray, np.ndarray] | None = None
        self._lock = threading.Lock()
        self.plan: SamplingPlan | None = None
        #: the 3x3x3 convolution after the sampling in C (``None``: in ONNX Runtime, see
        #: :attr:`conv_reason`)
        self.conv: ConvPlan | None = None
        self.conv_reason: str | None = None
        #: milliseconds of the last run's three parts
        self.last_parts_ms: dict[str, float] = {}

    def _load_impl(self) -> None:
        from pddnet.backends.onnxrt import OnnxRuntimeBackend

        ok, why = sampling_status()
        if not ok:
            raise PddnetError(f"the C sampling is off: {why}")
        self.plan = plan_features(self._model)
        post = self.plan.post
        self.conv, self.conv_reason = None, "not asked for"
        if self._want_conv:
            try:
                self.conv = plan_conv(post, self.plan.y_name, C.FEATURES_OUTPUT)
                self.conv_reason = None
            except PddnetError as exc:
                self.conv_reason = str(exc)
        opts = dict(self._ort_options, threads=self.threads, stages=False)
        try:
            self._pre = OnnxRuntimeBackend(self.plan.pre, label=f"{self.label}_pre",
                                           **opts).activate()
            if self.conv is None or self.conv.before is not None:
                self._post = OnnxRuntimeBackend(self.conv.before if self.conv else post,
                                                label=f"{self.label}_post", **opts).activate()
            if self.conv:
                self._post_b = OnnxRuntimeBackend(self.conv.after, label=f"{self.label}_post2",
                                                  **opts).activate()
        except BaseException:
            self._unload_impl()
            raise

    def _unload_impl(self) -> None:
        for b in (self._pre, self._post, self._post_b):
            if b is not None:
                b.deactivate()
        self._pre = self._post = self._post_b = self._y = self._conv_bufs = None

    def _input_specs_impl(self) -> list[TensorSpec]:
        return self._pre.input_specs

    @property
    def output_names(self) -> list[str]:
        return [C.FEATURES_OUTPUT]

    def _run_impl(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        p = self.plan
        t0 = time.perf_counter()
        x = self._pre.run({C.FEATURES_INPUT: feeds[C.FEATURES_INPUT]})[p.x_name]
        t1 = time.perf_counter()
        with self._lock:  # one difference buffer, reused: its pages are touched once
            if self._y is None:
                self._y = np.empty(p.y_shape, np.float32)
            if x.shape != (1, p.channels, *p.in_shape):
                raise PddnetError(f"{self.label}: the map before the sampling has shape "
                                  f"{x.shape}, expected {(1, p.channels, *p.in_shape)}")
            y = obelisk_sample(x, p.offsets0, p.offsets1, p.out_shape, threads=self.threads,
                               out=self._y)
            t2 = time.perf_counter()
            if self._post is not None:  # everything after, or what comes before the conv
                out = self._post.run({p.y_name: y})
            t3 = t4 = time.perf_counter()
            if self.conv is not None:
                out = self._run_conv(out[self.conv.x_name] if self._post is not None else y)
                t4 = time.perf_counter()
                out = self._post_b.run({self.conv.y_name: out})
        t5 = time.perf_counter()
        self.last_parts_ms = {"pre": (t1 - t0) * 1e3, "sampling": (t2 - t1) * 1e3,
                              "post": (t5 - t2) * 1e3}
        if self.conv is not None:
            self.last_parts_ms["conv"] = (t4 - t3) * 1e3
        return {C.FEATURES_OUTPUT: out[C.FEATURES_OUTPUT]}

    def _run_conv(self, x: np.ndarray) -> np.ndarray:
        """The C convolution on its input, or on the part's input with the 1x1x1
        convolution before it fused (``conv.pre``)."""
        cp = self.conv
        want = (1, cp.cin if cp.pre is None else cp.pre[1].shape[0], *cp.shape)
        if x.shape != want:
            raise PddnetError(f"{self.label}: the input of {cp.node!r} has shape {x.shape}, "
                              f"expected {want}")
        if self._conv_bufs is None:  # reused: their pages are touched once
            self._conv_bufs = (np.empty((1, cp.cout, *cp.shape), np.float32),
                               np.empty(work_floats(cp.cin, cp.cout, cp.shape, self.threads),
                                        np.float32))
        out, work = self._conv_bufs
        return conv3x3x3(x, cp.u, cp.bias, relu=cp.relu, threads=self.threads, out=out,
                         work=work, pre=cp.pre[1:] if cp.pre is not None else None)

    def describe(self) -> dict[str, Any]:
        if not self.is_active:
            return {"backend": "onnxruntime", "label": self.label}
        d = self._pre.describe()
        d["label"] = self.label
        d["native_sampling"] = {"threads": self.threads, "library": nat._lib_path,
                                "plan": self.plan.describe()}
        d["native_conv"] = self.conv_status()
        return d

    def conv_status(self) -> dict[str, Any]:
        """Where the 3x3x3 convolution after the sampling runs: ``winograd`` (C) with its
        plan, or ``onnxruntime`` with the reason."""
        if self.conv is not None:
            return {"implementation": "winograd", "reason": None, **self.conv.describe()}
        return {"implementation": "onnxruntime", "reason": self.conv_reason}
