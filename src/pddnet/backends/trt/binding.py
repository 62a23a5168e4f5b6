"""Which custom ops to bind to TensorRT plugins (``pddnet build --plugins MODE``).

The rewrite itself is the graph pass :class:`pddnet.graph.passes.bind_plugins.BindPlugins`;
this module decides, per model and TensorRT version, what it binds (:func:`plan_binding`).
Torch-free and TensorRT-free.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import onnx

from pddnet.errors import PddnetError
from pddnet.graph.passes.bind_plugins import SPEC_ATTRIBUTES
from pddnet.spec import contract as C

#: Plugins with an ahead-of-time implementation (engine runs without Python; TensorRT >= 10.9).
AOT_OPS = ("DeformableSample3D", "Correlation", "MinConv")
#: Plugins with a JIT implementation only (the engine needs Python, torch and triton to run).
JIT_ONLY_OPS = ("MeanFieldStep",)
#: The fused head's TensorRT-only ops (AOT; :mod:`pddnet.backends.trt.head` creates the nodes).
HEAD_OPS = ("MinConvAffine", "GridSmooth", "DisplacementHead", "DisplacementHeadProbs")
PLUGIN_MODES = ("auto", "native", "none")


# ------------------------------------------------------------------------------------------
# Choosing what to bind
# ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BindingPlan:
    """What ``pddnet build --plugins MODE`` does for one model and one TensorRT version.

    ``ops is None``: no rewrite at all (``none``); ``()``: every function inlined (``native``).
    """

    mode: str
    ops: tuple[str, ...] | None
    aot: bool
    notes: tuple[str, ...] = ()
    #: fused-head plugins to register after :class:`~pddnet.backends.trt.head.FuseHead`
    #: rewrote the mean-field steps and the softmax (``()``: no fusion)
    fused: tuple[str, ...] = ()

    def describe(self) -> str:
        if self.ops is None:
            return "none (graph parsed as is, no plugins registered)"
        if not self.ops and not self.fused:
            return "native (every custom op inlined from its local function)"
        head = " + fused head" if self.fused else ""
        return f"plugins {', '.join(self.ops)}{head}" + (
            " (AOT: no Python at run time)" if self.aot else " (JIT: Python at run time)")


def custom_ops_in(model: onnx.ModelProto) -> list[str]:
    """Custom op types used anywhere in ``model`` (graph or function bodies), in spec order."""
    used = {n.op_type for n in model.graph.node if n.domain == C.DOMAIN}
    for f in model.functions:
        used |= {n.op_type for n in f.node if n.domain == C.DOMAIN}
    return [o for o in SPEC_ATTRIBUTES if o in used]


def plan_binding(mode: str, model: onnx.ModelProto, *, trt_version: tuple[int, int] | None,
                 triton_available: bool, ops: Sequence[str] | None = None,
                 fuse_head: bool = True) -> BindingPlan:
    """Decide which ops to bind.

    ``auto``: the AOT-capable plugins (:data:`AOT_OPS`) of the ops the model uses, when
    TensorRT >= 10.9 (``tensorrt.plugin.aot_impl``) and triton (PTX compilation at build time)
    are available; otherwise native, with a note saying why. ``MeanFieldStep`` is never bound
    by ``auto`` (its plugin is JIT only): with ``fuse_head`` (default) the fused head replaces
    it (:data:`HEAD_OPS`, all AOT; :mod:`pddnet.backends.trt.head`), otherwise TensorRT inlines
    its function. ``native``: bind nothing. ``none``: no rewrite. ``ops`` overrides the choice
    (library use, e.g. to try the JIT ``MeanFieldStep``; no fused head then).
    """
    if mode not in PLUGIN_MODES:
        raise PddnetError(f"plugins must be one of {PLUGIN_MODES}, got {mode!r}")
    used = custom_ops_in(model)
    if mode == "none":
        return BindingPlan(mode, None, False, ("the graph is parsed as exported; TensorRT's "
                                               "own rules decide between functions and plugins "
                                               "(no pddnet plugin is registered)",))
    if mode == "native" and ops is None:
        return BindingPlan(mode, (), False)
    notes = []
    if ops is not None:
        chosen = tuple(o for o in ops if o in used)
        skipped = [o for o in ops if o not in used]
        if skipped:
            notes.append(f"{skipped} not used by this model")
    else:
        if trt_version is not None and trt_version < (10, 9):
            return BindingPlan(mode, (), False, (
                f"TensorRT {trt_version[0]}.{trt_version[1]} has no AOT Python plugins "
                "(tensorrt.plugin.aot_impl needs >= 10.9): every custom op is inlined",))
        if not triton_available:
            return BindingPlan(mode, (), False, (
                "triton is not importable, so the plugin kernels cannot be compiled to PTX: "
                "every custom op is inlined (pip install triton)",))
        chosen = tuple(o for o in AOT_OPS if o in used)
        if "MeanFieldStep" in used and fuse_head:
            # MinConv used only inside MeanFieldStep's function disappears with the fusion
            direct = {n.op_type for n in model.graph.node if n.domain == C.DOMAIN}
            chosen = tuple(o for o in chosen if o != "MinConv" or o in direct)
            notes.append("MeanFieldStep and the softmax/expectation/entropy run as the fused "
                         "head (AOT plugins MinConvAffine, GridSmooth, DisplacementHead)")
            return BindingPlan(mode, chosen, True, tuple(notes), HEAD_OPS)
        if "MeanFieldStep" in used:
            notes.append("MeanFieldStep stays a local function (its plugin is JIT only); "
                         "TensorRT inlines it into the MinConv plugin and native MatMuls")
    aot = all(o in AOT_OPS for o in chosen)
    return BindingPlan(mode, chosen, aot, tuple(notes))


__all__ = ["BindingPlan", "plan_binding", "custom_ops_in", "AOT_OPS", "JIT_ONLY_OPS",
           "HEAD_OPS", "PLUGIN_MODES"]
