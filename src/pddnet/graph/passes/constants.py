"""Main-graph ``Constant`` nodes as initializers.

After inlining, the custom ops' bodies bring their constant matrices (interpolation, smoothing)
into the main graph as ``Constant`` nodes; ONNX Runtime's quantiser treats only initializers as
weights, so the INT8 preparation turns them into initializers first.
"""

from __future__ import annotations

import onnx


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
