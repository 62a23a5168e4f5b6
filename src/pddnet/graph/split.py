"""Graph splitting for fixed-scan reuse: ``features`` (image -> features) and ``head``.

The exported model (``docs/model-format.md``) computes ``fixed_features`` from ``fixed`` and
``moving_features`` from ``moving`` with shared weights, then a head maps the two feature maps
to ``disp``/``grid_disp`` (and optionally ``probs``/``entropy``). :func:`split_model` cuts it at
the two feature tensors into two in-memory models:

``features``: input ``image`` ``(1, 1, I, J, K)`` float32 -> output ``features``
    ``(1, C, I//3, J//3, K//3)``: the nodes that compute ``fixed_features`` from ``fixed``,
    with both tensors renamed. It serves the moving scan too, which is only valid because the
    moving branch computes the same function: :func:`split_model` checks that the two branches
    are the same graph (node for node, attributes and initializer *values* equal).
``head``: inputs ``fixed_features``, ``moving_features`` -> the model's outputs.

Each part keeps the initializers and local functions (transitively) it uses, every opset
import, the IR version and the metadata (plus ``pddnet.part``), so it runs on any backend the
full model runs on.

:func:`split_after_first_step` cuts a model (or its head) once more, after the first mean-field
step, for the ONNX Runtime backend's two-session mode (memory; see its docstring).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import onnx
from onnx import helper

from pddnet.errors import PddnetError
from pddnet.graph.model import called_functions
from pddnet.spec import contract as C
from pddnet.spec.metadata import set_metadata


@dataclass
class SplitModel:
    """The two parts of a split model (``onnx.ModelProto`` each)."""

    features: onnx.ModelProto
    head: onnx.ModelProto


def split_model(proto: onnx.ModelProto) -> SplitModel:
    """Cut ``proto`` at ``fixed_features``/``moving_features`` (see the module docstring).

    Raises :class:`PddnetError` when the cut is impossible: a feature tensor is missing, the
    head reads an input image directly, or the moving branch differs from the fixed one.
    """
    g = proto.graph
    produced = {o for n in g.node for o in n.output}
    for t in (C.FIXED_FEATURES, C.MOVING_FEATURES):
        if t not in produced:
            raise PddnetError(f"cannot split the model for fixed-scan reuse: it has no tensor "
                              f"{t!r} (docs/model-format.md names the cut points)")
    fixed_nodes = _backward(g, [C.FIXED_FEATURES], stop={C.INPUT_FIXED}, part="features")
    moving_nodes = _backward(g, [C.MOVING_FEATURES], stop={C.INPUT_MOVING}, part="features")
    if _signature(g, fixed_nodes, C.INPUT_FIXED) != _signature(g, moving_nodes, C.INPUT_MOVING):
        raise PddnetError("cannot split the model for fixed-scan reuse: the moving branch "
                          "(moving -> moving_features) is not the same computation as the fixed "
                          "branch, so one feature network cannot serve both")
    outputs = [o.name for o in g.output]
    head_nodes = _backward(g, outputs, stop={C.FIXED_FEATURES, C.MOVING_FEATURES}, part="head")

    types = _value_types(proto)
    features = _make_part(proto, fixed_nodes, "features",
                          inputs=[(C.INPUT_FIXED, C.FEATURES_INPUT)],
                          outputs=[(C.FIXED_FEATURES, C.FEATURES_OUTPUT)], types=types)
    head = _make_part(proto, head_nodes, "head",
                      inputs=[(C.FIXED_FEATURES, C.FIXED_FEATURES),
                              (C.MOVING_FEATURES, C.MOVING_FEATURES)],
                      outputs=[(o, o) for o in outputs], types=types)
    return SplitModel(features, head)


def _subgraph_refs(node: onnx.NodeProto) -> set[str]:
    """Names a node's subgraphs (If/Loop/Scan bodies) read from the enclosing scope."""
    refs: set[str] = set()
    for a in node.attribute:
        for sub in ([a.g] if a.HasField("g") else []) + list(a.graphs):
            local = {i.name for i in sub.input} | {i.name for i in sub.initializer}
            for n in sub.node:
                refs |= {x for x in n.input if x and x not in local}
                refs |= _subgraph_refs(n)
                local |= set(n.output)
    return refs


def _backward(g: onnx.GraphProto, targets: list[str], *, stop: set[str],
              part: str) -> list[onnx.NodeProto]:
    """Nodes needed for ``targets`` given ``stop`` tensors, in the graph's (topological) order."""
    producer = {o: i for i, n in enumerate(g.node) for o in n.output if o}
    inits = {t.name for t in g.initializer}
    graph_inputs = {i.name for i in g.input} - inits
    keep: set[int] = set()
    todo = list(targets)
    seen: set[str] = set()
    while todo:
        t = todo.pop()
        if t in seen or t in stop or t in inits:
            continue
        seen.add(t)
        if t in graph_inputs:
            raise PddnetError(f"cannot split the model for fixed-scan reuse: its {part} part "
                              f"reads the input {t!r} directly (allowed: {sorted(stop)})")
        if t not in producer:
            raise PddnetError(f"cannot split the model: tensor {t!r} has no producer")
        i = producer[t]
        if i not in keep:
            keep.add(i)
            n = g.node[i]
            todo.extend(x for x in n.input if x)
            todo.extend(_subgraph_refs(n))
    return [g.node[i] for i in sorted(keep)]


def _signature(g: onnx.GraphProto, nodes: list[onnx.NodeProto], image: str) -> list[tuple]:
    """A name-free description of a branch: ops, attributes, wiring and initializer values."""
    inits = {t.name: t for t in g.initializer}
    where: dict[str, str] = {image: "<image>"}
    sig = []
    for idx, n in enumerate(nodes):
        ins = []
        for x in n.input:
            if x in where:
                ins.append(where[x])
            elif x in inits:
                t = onnx.TensorProto()
                t.CopyFrom(inits[x])
                t.name = ""
                ins.append("init:" + hashlib.sha1(t.SerializeToString()).hexdigest())
            else:
                ins.append(x)  # "" (absent optional input) or an outer name: compared verbatim
        attrs = []
        for a in sorted(n.attribute, key=lambda a: a.name):
            b = onnx.AttributeProto()
            b.CopyFrom(a)
            if b.HasField("t"):
                b.t.name = ""
            attrs.append(b.SerializeToString())
        sig.append((n.domain, n.op_type, tuple(ins), tuple(attrs), len(n.output)))
        for k, o in enumerate(n.output):
            where[o] = f"{idx}:{k}"
    return sig


def _value_types(proto: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    """Types of every named tensor: declared value infos, completed by shape inference."""
    types: dict[str, onnx.TypeProto] = {}
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=False).graph
    except Exception:  # inference is a convenience here; declared infos still apply
        inferred = proto.graph
    for vi in list(inferred.value_info) + list(proto.graph.value_info) + \
            list(proto.graph.input) + list(proto.graph.output):
        if vi.type.HasField("tensor_type"):
            types[vi.name] = vi.type
    return types


def _make_part(proto: onnx.ModelProto, nodes: list[onnx.NodeProto], part: str, *,
               inputs: list[tuple[str, str]], outputs: list[tuple[str, str]],
               types: dict[str, onnx.TypeProto]) -> onnx.ModelProto:
    rename = {old: new for old, new in inputs + outputs}
    new_nodes = []
    used: set[str] = set()
    for n in nodes:
        m = onnx.NodeProto()
        m.CopyFrom(n)
        m.input[:] = [rename.get(x, x) for x in n.input]
        m.output[:] = [rename.get(x, x) for x in n.output]
        used |= set(n.input) | set(n.output) | _subgraph_refs(n)
        new_nodes.append(m)

    def vinfo(old: str, new: str) -> onnx.ValueInfoProto:
        vi = onnx.ValueInfoProto(name=new)
        if old in types:
            vi.type.CopyFrom(types[old])
        else:
            vi.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
        return vi

    g = proto.graph
    graph = helper.make_graph(
        new_nodes, f"{g.name}_{part}",
        inputs=[vinfo(o, n) for o, n in inputs], outputs=[vinfo(o, n) for o, n in outputs],
        initializer=[t for t in g.initializer if t.name in used],
        value_info=[vi for vi in g.value_info if vi.name in used and vi.name not in rename])
    graph.sparse_initializer.extend(s for s in g.sparse_initializer if s.values.name in used)
    model = helper.make_model(graph, opset_imports=list(proto.opset_import),
                              functions=called_functions(proto, nodes))
    model.ir_version = proto.ir_version
    model.producer_name = proto.producer_name
    model.producer_version = proto.producer_version
    model.doc_string = proto.doc_string
    for p in proto.metadata_props:
        model.metadata_props.add(key=p.key, value=p.value)
    set_metadata(model, C.META_PART, part)
    return model


def split_after_first_step(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, onnx.ModelProto] | None:
    """Cut a model (whole, or its head) right after its first ``MeanFieldStep`` into two models
    run one after the other: everything up to that step, and the rest.

    Why: ONNX Runtime (1.32, CPU) keeps the cost-volume-sized tensors of the second half of the
    head resident until the end of a run, about three times the graph's live set at the paper's
    size, while each half run on its own peaks near its live set (figures in
    docs/benchmarks.md).
    The tensors the second half reads from the first (the cost volume and the first step's
    output) become its inputs. Returns ``None`` when the model has no such step, nothing after
    it, or a carried tensor whose type is unknown.
    """
    g = proto.graph
    k = next((i for i, n in enumerate(g.node)
              if n.domain == C.DOMAIN and n.op_type == "MeanFieldStep"), None)
    if k is None or k == len(g.node) - 1:
        return None
    front, back = list(g.node[:k + 1]), list(g.node[k + 1:])
    inits = {t.name for t in g.initializer}
    graph_inputs = [i.name for i in g.input if i.name not in inits]
    outputs = [o.name for o in g.output]
    made_front = {o for n in front for o in n.output if o}
    reads_front = set().union(*(set(n.input) | _subgraph_refs(n) for n in front))
    reads_back = set().union(*(set(n.input) | _subgraph_refs(n) for n in back))
    carried = [o for n in front for o in n.output if o and o in reads_back]
    types = _value_types(proto)
    if any(t not in types for t in carried):
        return None
    first = _make_part(proto, front, "stage1",
                       inputs=[(x, x) for x in graph_inputs if x in reads_front],
                       outputs=[(o, o) for o in carried + [o for o in outputs
                                                           if o in made_front and o not in carried]],
                       types=types)
    second = _make_part(proto, back, "stage2",
                        inputs=[(x, x) for x in carried + [x for x in graph_inputs
                                                           if x in reads_back]],
                        outputs=[(o, o) for o in outputs if o not in made_front], types=types)
    return first, second
