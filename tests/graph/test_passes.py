"""Graph passes (pddnet.graph.passes), each before/after on a tiny model built here: the pass
returns ``(new model, changed)``, never modifies its input, reports ``changed=False`` when there
is nothing to do, and the rewritten graph computes what the original computes (ONNX Runtime on
fresh random inputs; for the FP16 storage emulation, against float16 rounding done in numpy).

The plugin-binding pass has its own module (tests/backends/test_trt_binding.py): its
before/after checks need the TensorRT binding plan too.
Not tested here: the passes on the real exported network (tests/calibration, tests/validation).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from helpers.trt_models import tiny_model
from pddnet.graph.passes.constants import ConstantsToInitializers
from pddnet.graph.passes.fp16_storage import EmulateFP16Storage
from pddnet.graph.passes.inline import InlineNamed
from pddnet.spec import contract as C
from pddnet.spec.metadata import read_metadata, set_metadata

F32, F16 = TensorProto.FLOAT, TensorProto.FLOAT16


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _tiny_feeds(rng) -> dict[str, np.ndarray]:
    shape = (2, 2, 2, 3, 3, 3)
    return {"x": rng.standard_normal(shape).astype(np.float32),
            "y": rng.standard_normal(shape).astype(np.float32)}


def test_inline_named_before_after():
    rng = np.random.default_rng()
    model = tiny_model()
    before = model.SerializeToString()
    p = InlineNamed()
    out, changed = p.call(model)
    assert changed and model.SerializeToString() == before
    assert not out.functions and all(n.domain != C.DOMAIN for n in out.graph.node)
    names = [n.name for n in out.graph.node]
    # nodes named after their caller, nested calls included
    assert "head/Correlation_0/Sub_0" in names
    assert "head/MeanFieldStep_0/MeanFieldStep/MinConv_0/Neg_1" in names  # unnamed: type_index
    assert p.callers["head/MeanFieldStep_0"] == ["MeanFieldStep"]
    assert p.callers["head/MeanFieldStep_0/MeanFieldStep/MinConv_0"] == ["MeanFieldStep",
                                                                          "MinConv"]
    onnx.checker.check_model(out)
    feeds = _tiny_feeds(rng)
    np.testing.assert_array_equal(_run(out, feeds)[0], _run(model, feeds)[0])
    # nothing left to inline
    again, changed = InlineNamed().call(out)
    assert not changed and again.SerializeToString() == out.SerializeToString()


def test_inline_named_only_some_calls_keeps_the_functions_still_needed():
    rng = np.random.default_rng()
    model = tiny_model()
    out, changed = InlineNamed(only={"head/Correlation_0"}).call(model)
    assert changed
    assert sorted(f.name for f in out.functions) == ["MeanFieldStep", "MinConv"]
    assert [n.op_type for n in out.graph.node if n.domain == C.DOMAIN] == ["MeanFieldStep",
                                                                           "MinConv"]
    feeds = _tiny_feeds(rng)
    np.testing.assert_array_equal(_run(out, feeds)[0], _run(model, feeds)[0])


def _fp16_model(w: np.ndarray) -> onnx.ModelProto:
    """x (float32) -> Cast(f16) -> Mul(w f16) -> Add(Constant f16) -> Cast(f32) -> y."""
    nodes = [
        helper.make_node("Cast", ["x"], ["x16"], name="to16", to=F16),
        helper.make_node("Mul", ["x16", "w"], ["m"], name="mul"),
        helper.make_node("Constant", [], ["c"], name="const",
                         value=numpy_helper.from_array(np.array(0.1, np.float16), "c")),
        helper.make_node("Add", ["m", "c"], ["s"], name="add"),
        helper.make_node("Cast", ["s"], ["y"], name="to32", to=F32),
    ]
    g = helper.make_graph(nodes, "fp16", [helper.make_tensor_value_info("x", F32, [64])],
                          [helper.make_tensor_value_info("y", F32, [64])],
                          initializer=[numpy_helper.from_array(w.astype(np.float16), "w")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", C.OPSET)])
    m.ir_version = 9
    set_metadata(m, C.META_PRECISION, {"mode": "fp16"})
    return m


def test_emulate_fp16_storage_before_after():
    rng = np.random.default_rng()
    w = rng.uniform(-3, 3, 64)
    model = _fp16_model(w)
    before = model.SerializeToString()
    out, changed = EmulateFP16Storage().call(model)
    assert changed and model.SerializeToString() == before
    assert all(t.data_type != F16 for t in out.graph.initializer)
    assert read_metadata(out)[C.META_PRECISION] == {"mode": "fp16", "emulated": "fp16-storage"}
    x = (rng.standard_normal(64) * 1e3).astype(np.float32)  # large values: rounding shows
    r16 = lambda a: np.asarray(a, np.float32).astype(np.float16).astype(np.float32)  # noqa: E731
    w16, c16 = r16(w), r16(np.float32(0.1))
    expected = r16(r16(r16(x) * w16) + c16)  # every float16 tensor stored rounded
    got = _run(out, {"x": x})[0]
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, expected)


def test_constants_to_initializers_before_after():
    rng = np.random.default_rng()
    k = rng.standard_normal((4, 4)).astype(np.float32)
    nodes = [helper.make_node("Constant", [], ["k"], name="k",
                              value=numpy_helper.from_array(k, "k")),
             helper.make_node("MatMul", ["x", "k"], ["y"], name="mm")]
    g = helper.make_graph(nodes, "c", [helper.make_tensor_value_info("x", F32, [3, 4])],
                          [helper.make_tensor_value_info("y", F32, [3, 4])])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", C.OPSET)])
    model.ir_version = 9
    before = model.SerializeToString()
    out, changed = ConstantsToInitializers().call(model)
    assert changed and model.SerializeToString() == before
    assert [n.op_type for n in out.graph.node] == ["MatMul"]
    np.testing.assert_array_equal(numpy_helper.to_array(out.graph.initializer[0]), k)
    x = rng.standard_normal((3, 4)).astype(np.float32)
    np.testing.assert_allclose(_run(out, {"x": x})[0], x.astype(np.float64) @ k, rtol=1e-5,
                               atol=1e-5)
    again, changed = ConstantsToInitializers().call(out)
    assert not changed and again.SerializeToString() == out.SerializeToString()
