"""Main-graph ``Constant`` nodes as initializers.

After inlining, the custom ops' bodies bring their constant matrices (interpolation, smoothing)
into the main graph as ``Constant`` nodes; ONNX Runtime's quantiser treats only initializers as
weights, so the INT8 preparation turns them into initializers first.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper


def constant_values(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """Every tensor of ``graph`` whose value is fixed: its initializers and the outputs of its
    standard ``Constant`` nodes (``value`` attribute), by name."""
    out = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for n in graph.node:
        if n.op_type == "Constant" and n.domain in ("", "ai.onnx"):
            for a in n.attribute:
                if a.name == "value":
                    out[n.output[0]] = numpy_helper.to_array(a.t)
    return out


def constants_to_initializers(model: onnx.ModelProto) -> int:
    """Main-graph ``Constant`` nodes (from inlined bodies) -> initializers, so that the
    quantiser treats the bodies' constant matrices as weights. In place; returns how many."""
    keep = []
    for n in model.graph.node:
        if n.op_type == "Constant" and len(n.attribute) == 1 and n.attribute[0].name == "value":
            t = onnx.TensorProto()
            t.CopyFrom(n.attribute[0].t)
            t.name = n.output[0]
            model.graph.initializer.append(t)
        else:
            keep.append(n)
    moved = len(model.graph.node) - len(keep)
    del model.graph.node[:]
    model.graph.node.extend(keep)
    return moved


class ConstantsToInitializers:
    """The pass form: ``call(model) -> (copy with the constants as initializers, changed)``."""

    def call(self, model: onnx.ModelProto) -> tuple[onnx.ModelProto, bool]:
        out = onnx.ModelProto()
        out.CopyFrom(model)
        return out, constants_to_initializers(out) > 0
