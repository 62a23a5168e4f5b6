"""Inline local functions, naming each inlined node after its caller.

ONNX Runtime inlines the ``ai.pddnet`` local functions itself but names the inlined nodes
``_inlfunc_<Function>[_token_N]_<body node>``, losing the caller's name and with it the contract
prefix (``fixed/``, ``moving/``, ``head/``) that profiling and the precision tools group by. This
pass inlines with ONNX semantics (formal inputs and outputs bound to the caller's tensors,
everything else renamed apart, attribute references resolved) and names every inlined node
``<caller node name>/<body node name>``, recursively
(``head/MeanFieldStep_0/MeanFieldStep/MinConv_0/MinConv/MaxPool_0``). The computation is the
same graph any runtime would build from the original model; only names differ.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Collection

import onnx

from pddnet.errors import PddnetError
from pddnet.graph.model import called_functions


def inline_named(model: onnx.ModelProto, only=None
                 ) -> tuple[onnx.ModelProto, dict[str, list[str]]]:
    """Inline every local function, naming inlined nodes after their caller (module docstring).

    ``only``: names of main-graph nodes to inline (functions they call are inlined with them);
    other calls stay, and the functions they need stay in the model.

    Returns the inlined model (no functions left, or only those still called) and
    ``{caller node name: [function names, outermost first]}`` for every inlined call.
    """
    funcs = {(f.domain, f.name): f for f in model.functions}
    callers: dict[str, list[str]] = {}
    counter = itertools.count()

    def expand(node: onnx.NodeProto, chain: list[str]) -> list[onnx.NodeProto]:
        f = funcs.get((node.domain, node.op_type))
        if f is None:
            return [node]
        prefix = node.name or f"{f.name}_call{next(counter)}"
        if prefix in callers:
            prefix = f"{prefix}_call{next(counter)}"
        callers[prefix] = chain + [f.name]
        bind = dict(zip(f.input, node.input))
        bind.update({x: "" for x in f.input[len(node.input):]})
        bind.update(zip(f.output, node.output))
        given = {a.name: a for a in node.attribute}
        defaults = {a.name: a for a in f.attribute_proto}

        def rn(x: str) -> str:
            return bind[x] if x in bind else (f"{prefix}/{x}" if x else "")

        out: list[onnx.NodeProto] = []
        for i, n in enumerate(f.node):
            m = onnx.NodeProto()
            m.CopyFrom(n)
            # an unnamed body node is named by its op type and position (names must be unique)
            m.name = f"{prefix}/{n.name or f'{n.op_type}_{i}'}"
            m.input[:] = [rn(x) for x in n.input]
            m.output[:] = [rn(x) for x in n.output]
            attrs = []
            for a in n.attribute:
                if a.ref_attr_name:
                    src = given.get(a.ref_attr_name) or defaults.get(a.ref_attr_name)
                    if src is None:
                        continue  # not given, no default: the attribute is absent
                    b = onnx.AttributeProto()
                    b.CopyFrom(src)
                    b.name = a.name
                    attrs.append(b)
                elif a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
                    raise PddnetError(f"inline_named: function {f.name} has a control-flow node "
                                      f"{n.name!r}; subgraphs are not supported")
                else:
                    attrs.append(a)
            del m.attribute[:]
            m.attribute.extend(attrs)
            out.extend(expand(m, chain + [f.name]))
        return out

    new = onnx.ModelProto()
    new.CopyFrom(model)
    nodes = [n for node in model.graph.node
             for n in (expand(node, []) if only is None or node.name in only else [node])]
    del new.graph.node[:]
    new.graph.node.extend(nodes)
    del new.functions[:]
    if only is not None:  # keep the functions the remaining calls need (transitively)
        new.functions.extend(called_functions(model, nodes))
    return new, callers


@dataclass
class InlineNamed:
    """The pass form of :func:`inline_named`: ``call(model) -> (model, changed)``.

    ``only``: main-graph node names to inline (``None``: every call). After a call,
    ``callers`` holds ``{caller node name: [function names, outermost first]}``.
    """

    only: Collection[str] | None = None
    callers: dict[str, list[str]] = field(default_factory=dict)

    def call(self, model: onnx.ModelProto) -> tuple[onnx.ModelProto, bool]:
        new, self.callers = inline_named(model, self.only)
        return new, bool(self.callers)
