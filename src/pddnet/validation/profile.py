"""Per-block timing of an ONNX Runtime run, from ONNX Runtime's profiler.

ONNX Runtime inlines the ``ai.pddnet`` local functions itself, but names the inlined nodes
``_inlfunc_<Function>[_token_N]_<body node>``: the caller's name -- and with it the contract
prefix ``fixed/``, ``moving/`` or ``head/`` -- is lost. So before profiling,
:func:`inline_named` inlines the functions the same way (ONNX semantics: formal inputs and
outputs bound to the caller's tensors, everything else renamed apart, attribute references
resolved) but names every inlined node ``<caller node name>/<body node name>``, recursively
(``head/MeanFieldStep_0/MeanFieldStep/MinConv_0/MinConv/MaxPool_0``). The graph ONNX Runtime
then optimises and runs is the same one it would build from the original model; only names
differ.

:func:`summarise_profile` reads the profiler's JSON trace (Chrome trace format; node events
``<node name>_kernel_time`` with durations in microseconds, one ``model_run`` event per run),
keeps the runs after the first ``skip_runs`` and returns per-run milliseconds grouped by
contract prefix, by custom op (outermost function, and nested chains), by prefix and custom op
together, and by ONNX op type, with the slowest nodes.
"""

from __future__ import annotations

import itertools
import json
from collections import defaultdict
from typing import Any

import onnx

from pddnet.errors import PddnetError

PREFIXES = ("fixed", "moving", "head")
GRAPH_NODES = "(graph)"  # nodes outside any custom op


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
        for n in f.node:
            m = onnx.NodeProto()
            m.CopyFrom(n)
            m.name = f"{prefix}/{n.name or n.op_type}"
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
        needed: set[tuple[str, str]] = set()
        todo = [(n.domain, n.op_type) for n in nodes]
        while todo:
            key = todo.pop()
            if key in funcs and key not in needed:
                needed.add(key)
                todo.extend((n.domain, n.op_type) for n in funcs[key].node)
        new.functions.extend(f for f in model.functions if (f.domain, f.name) in needed)
    return new, callers


def _classify(name: str, callers: dict[str, list[str]], ordered: list[str]
              ) -> tuple[str, list[str]]:
    prefix = name.split("/", 1)[0] if "/" in name else ""
    prefix = prefix if prefix in PREFIXES else "other"
    for c in ordered:  # longest caller names first
        if name.startswith(c + "/"):
            return prefix, callers[c]
    return prefix, []


def summarise_profile(trace: str | list, callers: dict[str, list[str]] | None = None, *,
                      skip_runs: int = 1, top: int = 15) -> dict[str, Any]:
    """Group the node kernel times of an ONNX Runtime profile (path or parsed events).

    Times are milliseconds per run, averaged over the runs after the first ``skip_runs``.
    ``callers`` is the map from :func:`inline_named` (without it, no custom-op grouping).
    """
    events = json.load(open(trace)) if isinstance(trace, str) else trace
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events
                  if e.get("cat") == "Session" and e.get("name") == "model_run")
    if len(runs) <= skip_runs:
        raise PddnetError(f"the profile holds {len(runs)} run(s); need more than "
                          f"skip_runs={skip_runs}")
    kept = runs[skip_runs:]
    n = len(kept)

    def in_kept(ts: float) -> bool:
        return any(a <= ts <= b for a, b in kept)

    callers = callers or {}
    ordered = sorted(callers, key=len, reverse=True)
    by_prefix: dict[str, float] = defaultdict(float)
    by_function: dict[str, float] = defaultdict(float)
    nested: dict[str, float] = defaultdict(float)
    by_pf: dict[str, float] = defaultdict(float)
    by_op: dict[str, float] = defaultdict(float)
    per_node: dict[tuple[str, str], float] = defaultdict(float)
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        if not in_kept(e["ts"]):
            continue
        name = e["name"][: -len("_kernel_time")]
        op = e.get("args", {}).get("op_name", "?")
        ms = e["dur"] / 1e3 / n
        prefix, chain = _classify(name, callers, ordered)
        outer = chain[0] if chain else GRAPH_NODES
        by_prefix[prefix] += ms
        by_function[outer] += ms
        nested["/".join(chain) if chain else GRAPH_NODES] += ms
        by_pf[f"{prefix}/{outer}"] += ms
        by_op[op] += ms
        per_node[(name, op)] += ms
    total = sum(by_prefix.values())

    def ranked(d: dict[str, float]) -> dict[str, float]:
        return {k: round(v, 4) for k, v in sorted(d.items(), key=lambda kv: -kv[1])}

    run_ms = [(b - a) / 1e3 for a, b in kept]
    return {
        "runs": n,
        "model_run_ms": sum(run_ms) / n,
        "kernel_ms": total,
        "by_prefix": ranked(by_prefix),
        "by_function": ranked(by_function),
        "by_function_nested": ranked(nested),
        "by_prefix_function": ranked(by_pf),
        "by_op_type": ranked(by_op),
        "top_nodes": [{"node": k[0], "op": k[1], "ms": round(v, 4)}
                      for k, v in sorted(per_node.items(), key=lambda kv: -kv[1])[:top]],
    }
