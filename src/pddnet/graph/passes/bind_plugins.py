"""Plugin binding: the graph rewrite that prepares an exported model for TensorRT's ONNX parser.

Which ops to bind for a TensorRT version is decided by :func:`pddnet.backends.trt.binding.plan_binding`.

A pass in the style of onnx-ir: :class:`BindPlugins` has ``call(model) -> (model, changed)``
and never modifies its input. For the ops it binds (``ops``) it

1. **drops their local functions**, so the parser cannot inline them and must import every
   such node with the registered plugin ``pddnet::<op>`` (the robust recipe: before
   TensorRT 10.7 the parser prefers a local function over any plugin; 10.7-10.14 prefer a
   registered plugin; from 10.15 a local function wins unless the node carries
   ``plugin_namespace`` or the parser flag ``ENABLE_PLUGIN_OVERRIDE`` is set -- onnx-tensorrt
   changelog and ``ModelImporter.cpp``);
2. writes each bound node's **attributes in the order of docs/ops.md** followed by
   ``plugin_namespace``/``plugin_version`` (``onnx.helper.make_node`` sorts keyword attributes
   alphabetically, e.g. ``capture, disp_size, grid``; some TensorRT releases hand the
   attributes to ``aot_impl`` positionally in node order). The AttributeProtos are moved, not
   rebuilt, so values and types are preserved exactly; a missing ``mode`` is written as
   ``"approx"`` (a quickly deployable plugin has no attribute defaults);
3. gives ``MinConv``/``MeanFieldStep`` nodes with one input a **dummy scalar penalty** (a
   plugin's input list is fixed, so these plugins always take ``(cost, penalty)``; in
   ``approx`` mode the penalty is not read). In the main graph it is an initializer, inside a
   function body a ``Constant`` node.

For custom nodes it does *not* bind it removes ``plugin_namespace``/``plugin_version``
(``strip_unbound``), so that no registered plugin can capture them on any parser version and
the parser inlines their local function -- e.g. ``MeanFieldStep``, whose plugin is JIT only
(two kernel launches; no ``aot_impl``), for engines that must run without Python.

Whether the parser hands ``plugin_namespace``/``plugin_version`` to the plugin as fields is
not documented; the plugins do not declare them, and they come last so that they can never
shift the positions of the spec's attributes.

Torch-free and TensorRT-free.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from pddnet.errors import PddnetError
from pddnet.graph.model import called_functions
from pddnet.spec import contract as C

#: Attribute order of each op's spec (docs/ops.md), without the binding attributes.
SPEC_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "DeformableSample3D": ("output_shape",),
    "Correlation": ("grid", "disp_size", "capture"),
    "MinConv": ("mode",),
    "MeanFieldStep": ("mode",),
}
BINDING_ATTRIBUTES = ("plugin_namespace", "plugin_version")
#: Plugins whose input list is ``(cost, penalty)`` while the ONNX op's penalty is optional.
PENALTY_OPS = ("MinConv", "MeanFieldStep")
DUMMY_PENALTY = "pddnet/plugin_penalty_unused"


def _ordered_attributes(node: onnx.NodeProto) -> list[onnx.AttributeProto]:
    order = SPEC_ATTRIBUTES[node.op_type] + BINDING_ATTRIBUTES
    by_name = {a.name: a for a in node.attribute}
    out = []
    for name in order:
        if name in by_name:
            out.append(by_name.pop(name))
        elif name == "mode":
            out.append(helper.make_attribute("mode", "approx"))
        elif name == "plugin_namespace":
            out.append(helper.make_attribute("plugin_namespace", C.PLUGIN_NAMESPACE))
        elif name == "plugin_version":
            out.append(helper.make_attribute("plugin_version", C.PLUGIN_VERSION))
        else:
            raise PddnetError(f"{node.op_type} node {node.name!r} lacks its attribute {name!r} "
                              "(docs/ops.md); it cannot be bound to the plugin")
    # attributes the spec does not know stay, after the spec's (never reordered among
    # themselves), before the binding attributes
    extra = [a for a in node.attribute if a.name in by_name]
    return out[:len(SPEC_ATTRIBUTES[node.op_type])] + extra + out[len(SPEC_ATTRIBUTES[node.op_type]):]


def _same_attrs(node: onnx.NodeProto, attrs: list[onnx.AttributeProto]) -> bool:
    return [a.SerializeToString() for a in node.attribute] == \
        [a.SerializeToString() for a in attrs]


@dataclass
class BindPlugins:
    """Rewrite a model so that TensorRT imports the custom ops in ``ops`` with plugins.

    Args:
        ops: custom op types to bind (``pddnet::<op>`` must be registered when parsing);
            ``()`` binds nothing (every function is inlined, i.e. ``--plugins native``).
        strip_unbound: remove the binding attributes from custom nodes that are not bound.
        penalty_dtype: dtype of the dummy penalty (any float works: ``approx`` never reads it).
    """

    ops: Sequence[str]
    strip_unbound: bool = True
    penalty_dtype: type = np.float32
    log: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        unknown = [o for o in self.ops if o not in SPEC_ATTRIBUTES]
        if unknown:
            raise PddnetError(f"BindPlugins: unknown op(s) {unknown}; the custom ops are "
                              f"{list(SPEC_ATTRIBUTES)}")
        self.ops = tuple(self.ops)

    # -- the pass -------------------------------------------------------------------------
    def call(self, model: onnx.ModelProto) -> tuple[onnx.ModelProto, bool]:
        """Return ``(rewritten copy, changed)``; ``model`` itself is not modified."""
        self.log = []
        out = onnx.ModelProto()
        out.CopyFrom(model)
        changed = False
        bound_present = set()

        # main graph
        needs_dummy = False
        for node in out.graph.node:
            c, d = self._rewrite_node(node, DUMMY_PENALTY, where="graph")
            changed |= c
            needs_dummy |= d
            if node.domain == C.DOMAIN and node.op_type in self.ops:
                bound_present.add(node.op_type)
        if needs_dummy and DUMMY_PENALTY not in {t.name for t in out.graph.initializer}:
            out.graph.initializer.append(
                numpy_helper.from_array(np.array(0.0, dtype=self.penalty_dtype), DUMMY_PENALTY))

        # drop the functions of bound ops, rewrite the bodies of the others
        keep = []
        for fn in out.functions:
            if fn.domain == C.DOMAIN and fn.name in self.ops:
                self.log.append(f"dropped the local function of {fn.name} (bound to plugin "
                                f"{C.PLUGIN_NAMESPACE}::{fn.name})")
                changed = True
                continue
            local_dummy = f"{DUMMY_PENALTY}_{fn.name}"
            body_needs = False
            for node in fn.node:
                c, d = self._rewrite_node(node, local_dummy, where=f"function {fn.name}")
                changed |= c
                body_needs |= d
                if node.domain == C.DOMAIN and node.op_type in self.ops:
                    bound_present.add(node.op_type)
            if body_needs:
                const = helper.make_node(
                    "Constant", [], [local_dummy], name=f"{fn.name}/plugin_penalty_unused",
                    value=numpy_helper.from_array(np.array(0.0, dtype=self.penalty_dtype)))
                fn.node.insert(0, const)
            keep.append(fn)
        if len(keep) != len(out.functions):
            del out.functions[:]
            out.functions.extend(keep)
        pruned = _prune_functions(out)
        if pruned:
            changed = True
            self.log.append(f"removed local functions no longer called: {pruned}")
        missing = [o for o in self.ops if o not in bound_present]
        if missing:
            self.log.append(f"no {missing} nodes in this model: nothing to bind for them")
        return out, changed

    __call__ = call

    def _rewrite_node(self, node: onnx.NodeProto, dummy: str, *, where: str) -> tuple[bool, bool]:
        """Rewrite one node in place; returns ``(changed, uses the dummy penalty)``."""
        if node.domain != C.DOMAIN:
            return False, False
        if node.op_type not in self.ops:
            if not self.strip_unbound:
                return False, False
            kept = [a for a in node.attribute if a.name not in BINDING_ATTRIBUTES]
            if len(kept) == len(node.attribute):
                return False, False
            del node.attribute[:]
            node.attribute.extend(kept)
            self.log.append(f"{where}: {node.op_type} node {node.name!r} left unbound (binding "
                            "attributes removed; its local function is inlined)")
            return True, False
        changed = False
        attrs = _ordered_attributes(node)
        if not _same_attrs(node, attrs):
            copies = []
            for a in attrs:
                b = onnx.AttributeProto()
                b.CopyFrom(a)
                copies.append(b)
            del node.attribute[:]
            node.attribute.extend(copies)
            changed = True
        uses_dummy = False
        if node.op_type in PENALTY_OPS and (len(node.input) < 2 or not node.input[1]):
            if len(node.input) < 2:
                node.input.append(dummy)
            else:
                node.input[1] = dummy
            uses_dummy = changed = True
            self.log.append(f"{where}: {node.op_type} node {node.name!r}: added the unused "
                            "penalty input the plugin requires")
        return changed, uses_dummy


def _prune_functions(model: onnx.ModelProto) -> list[str]:
    """Remove local functions of the custom domain that nothing calls any more."""
    reach = {(f.domain, f.name) for f in called_functions(model, model.graph.node)}
    drop = [f.name for f in model.functions if f.domain == C.DOMAIN and (f.domain, f.name)
            not in reach]
    if drop:
        keep = [f for f in model.functions if not (f.domain == C.DOMAIN and f.name in drop)]
        del model.functions[:]
        model.functions.extend(keep)
    return drop


__all__ = ["BindPlugins", "SPEC_ATTRIBUTES", "BINDING_ATTRIBUTES", "PENALTY_OPS", "DUMMY_PENALTY"]
