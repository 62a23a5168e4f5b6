"""Per-block timing of an ONNX Runtime run, from ONNX Runtime's profiler.

ONNX Runtime inlines the ``ai.pddnet`` local functions itself, but names the inlined nodes
``_inlfunc_<Function>[_token_N]_<body node>``: the caller's name -- and with it the contract
prefix ``fixed/``, ``moving/`` or ``head/`` -- is lost. So before profiling,
:func:`pddnet.graph.passes.inline.inline_named` inlines the functions the same way (ONNX semantics: formal inputs and
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

import json
from collections import defaultdict
from typing import Any

from pddnet.errors import PddnetError

PREFIXES = ("fixed", "moving", "head")
GRAPH_NODES = "(graph)"  # nodes outside any custom op


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
    ``callers`` is the map from :func:`pddnet.graph.passes.inline.inline_named` (without it, no custom-op grouping).
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
