"""A small builder for ONNX graphs and local-function bodies.

Keeps node names predictable (``<prefix>/<OpType>_<n>``), which matters downstream: the runtime
splits the graph by name prefix, precision keep-lists name nodes, and plugin binding
rewrites nodes by op type. Torch-free.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from pddnet.errors import PddnetError


class Builder:
    """Accumulates nodes and constants for a graph (constants become initializers) or a
    function body (constants become ``Constant`` nodes, since functions cannot see the
    graph's initializers).

    ``like`` (function bodies only) makes the body *type-polymorphic*: float constants are
    written in ``dtype`` and followed by ``CastLike(constant, like)``, so the body computes in
    whatever float type its formal input ``like`` has at each call site (one local function
    serving float32 and float16 callers; docs/precision.md)."""

    def __init__(self, prefix: str = "", *, function: bool = False, dtype=np.float32,
                 like: str | None = None):
        if like is not None and not function:
            raise PddnetError("Builder: like= is for function bodies only")
        self.prefix = prefix
        self.function = function
        self.dtype = np.dtype(dtype)
        self.like = like
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._count: dict[str, int] = {}

    def _unique(self, hint: str) -> str:
        n = self._count.get(hint, 0)
        self._count[hint] = n + 1
        base = f"{self.prefix}/{hint}" if self.prefix else hint
        return f"{base}_{n}"

    def const(self, value, hint: str = "const", dtype=None) -> str:
        """A constant tensor; floats use the builder's dtype unless ``dtype`` is given."""
        arr = np.asarray(value)
        if dtype is not None:
            arr = arr.astype(dtype)
        elif arr.dtype.kind == "f":
            arr = arr.astype(self.dtype)
        name = self._unique(hint)
        tensor = numpy_helper.from_array(np.ascontiguousarray(arr), name)
        if self.function:
            self.nodes.append(helper.make_node("Constant", [], [name], value=tensor,
                                               name=self._unique("Constant")))
            if self.like is not None and dtype is None and arr.dtype.kind == "f":
                return self.op("CastLike", name, self.like, hint="CastLike")
        else:
            self.initializers.append(tensor)
        return name

    def ints(self, values, hint: str = "shape") -> str:
        return self.const(np.asarray(values, dtype=np.int64), hint)

    def op(self, op_type: str, *inputs: str, outputs: int | list[str] = 1, domain: str = "",
           hint: str | None = None, **attrs):
        """Append a node; returns its output name (or list of names when several)."""
        node_name = self._unique(hint or op_type)
        if isinstance(outputs, int):
            out_names = [f"{node_name}:{i}" if outputs > 1 else node_name
                         for i in range(outputs)]
        else:
            out_names = list(outputs)
        self.nodes.append(helper.make_node(op_type, list(inputs), out_names, name=node_name,
                                           domain=domain or None, **attrs))
        return out_names[0] if len(out_names) == 1 else out_names

    # shorthands for the ops used everywhere
    def reshape(self, x: str, shape, hint: str = "Reshape") -> str:
        return self.op("Reshape", x, self.ints(shape), hint=hint)

    def matmul(self, a: str, b: str, hint: str = "MatMul") -> str:
        return self.op("MatMul", a, b, hint=hint)


def float_tensor_type(dtype) -> int:
    return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


def value_info(name: str, shape, dtype=np.float32) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, float_tensor_type(dtype), list(shape))


ELEM_TYPE_NAMES = {v: k for k, v in TensorProto.DataType.items()}
