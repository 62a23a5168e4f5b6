"""Tiny graphs with the structure the exporter gives custom ops (binding attributes, sorted
attributes, a nested MinConv call inside MeanFieldStep), for the plugin-binding pass and the
TensorRT backend's tests."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from pddnet.spec import contract as C

F = TensorProto.FLOAT
OPSETS = [helper.make_opsetid("", C.OPSET), helper.make_opsetid(C.DOMAIN, 1)]


def function(name, inputs, outputs, nodes, attrs):
    return helper.make_function(C.DOMAIN, name, inputs, outputs, nodes, OPSETS,
                                attributes=list(attrs) + ["plugin_namespace", "plugin_version"])


def custom_node(op, inputs, outputs, name, **attrs):
    # onnx.helper.make_node sorts keyword attributes alphabetically, like the exporter
    return helper.make_node(op, inputs, outputs, name=name, domain=C.DOMAIN,
                            plugin_namespace=C.PLUGIN_NAMESPACE,
                            plugin_version=C.PLUGIN_VERSION, **attrs)


def tiny_model(mode="approx"):
    """cost (2,2,2,3,3,3) -> Correlation-like Identity -> MeanFieldStep(MinConv + Neg).

    The functions are placeholders made of standard ops (they run in ONNX Runtime); what
    matters is the structure the exporter produces: nodes with the binding attributes,
    alphabetically sorted attributes, a nested MinConv call inside MeanFieldStep.
    """
    pen = ["penalty"] if mode == "exact" else []
    minconv = function("MinConv", ["cost"] + pen, ["output"],
                  [helper.make_node("Neg", ["cost"], ["n"]),
                   helper.make_node("Neg", ["n"], ["output"])], ["mode"])
    mfs = function("MeanFieldStep", ["cost"] + pen, ["output"],
              [custom_node("MinConv", ["cost"] + pen, ["m"], "MeanFieldStep/MinConv_0", mode=mode),
               helper.make_node("Relu", ["m"], ["output"])], ["mode"])
    corr = function("Correlation", ["a", "b"], ["cost"],
               [helper.make_node("Sub", ["a", "b"], ["cost"])], ["grid", "disp_size", "capture"])
    nodes = [
        custom_node("Correlation", ["x", "y"], ["cost"], "head/Correlation_0", grid=[2, 2, 2],
                disp_size=3, capture=0.3),
        custom_node("MeanFieldStep", ["cost"] + (["pen0"] if pen else []), ["first"],
                "head/MeanFieldStep_0", mode=mode),
        custom_node("MinConv", ["first"] + (["pen0"] if pen else []), ["out"], "head/MinConv_0",
                mode=mode),
    ]
    shape = [2, 2, 2, 3, 3, 3]
    inits = [numpy_helper.from_array(np.array(0.5, np.float32), "pen0")] if pen else []
    g = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", F, shape),
                                          helper.make_tensor_value_info("y", F, shape)],
                          [helper.make_tensor_value_info("out", F, shape)], initializer=inits)
    m = helper.make_model(g, opset_imports=OPSETS, functions=[corr, mfs, minconv])
    m.ir_version = 9
    onnx.checker.check_model(m)
    return m
