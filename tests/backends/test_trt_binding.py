"""The plugin-binding pass (pddnet.graph.passes.bind_plugins), the binding plan
(pddnet.backends.trt.binding) and the TensorRT readiness check (pddnet.backends.trt.support),
before/after on tiny models (tests/helpers/trt_models.py), plus one real export.

Checked: local functions dropped only for bound ops (nested calls included), attribute values
and types preserved while reordered to the spec order with the binding attributes last, the
dummy penalty for one-input MinConv/MeanFieldStep (graph initializer and function-body
Constant), binding attributes stripped from unbound custom nodes, the input never modified,
idempotence, the ``native`` rewrite leaving ONNX Runtime's results bit-identical, the binding
plan per TensorRT version, and the readiness report (our functions need no plugin; rank-5
GridSample fails before 11.2; unsupported ops, Q/DQ zero points, ops without a function).

Not tested here (needs TensorRT): that the real ONNX parser binds the rewritten nodes to the
registered plugins, and what it passes to ``aot_impl``.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from helpers.trt_models import OPSETS, tiny_model
from pddnet.backends.trt.binding import custom_ops_in, plan_binding
from pddnet.backends.trt.support import check_trt_readiness
from pddnet.errors import PddnetError
from pddnet.graph.passes.bind_plugins import DUMMY_PENALTY, BindPlugins
from pddnet.spec import contract as C

F = TensorProto.FLOAT


def _node(model, name):
    return next(n for n in model.graph.node if n.name == name)


def _attr_bytes(node):
    return {a.name: a.SerializeToString() for a in node.attribute}


def test_binds_only_the_chosen_ops_and_keeps_the_input_unchanged():
    model = tiny_model()
    before = model.SerializeToString()
    out, changed = BindPlugins(ops=("Correlation", "MinConv")).call(model)
    assert changed
    assert model.SerializeToString() == before  # the pass copies
    assert [f.name for f in out.functions] == ["MeanFieldStep"]  # bound functions dropped
    onnx.checker.check_model(out)


def test_attributes_preserved_and_in_spec_order():
    model = tiny_model()
    out, _ = BindPlugins(ops=("Correlation", "MinConv", "MeanFieldStep")).call(model)
    corr_in, corr_out = _node(model, "head/Correlation_0"), _node(out, "head/Correlation_0")
    assert [a.name for a in corr_in.attribute] == ["capture", "disp_size", "grid",
                                                   "plugin_namespace", "plugin_version"]
    assert [a.name for a in corr_out.attribute] == ["grid", "disp_size", "capture",
                                                    "plugin_namespace", "plugin_version"]
    assert _attr_bytes(corr_in) == _attr_bytes(corr_out)  # values and types identical
    capture = next(a for a in corr_out.attribute if a.name == "capture")
    assert capture.type == onnx.AttributeProto.FLOAT and capture.f == pytest.approx(0.3)


def test_dummy_penalty_in_graph_and_function_body():
    out, _ = BindPlugins(ops=("MinConv",)).call(tiny_model("approx"))
    node = _node(out, "head/MinConv_0")
    assert list(node.input) == ["first", DUMMY_PENALTY]
    dummy = next(t for t in out.graph.initializer if t.name == DUMMY_PENALTY)
    assert numpy_helper.to_array(dummy).shape == () and dummy.data_type == TensorProto.FLOAT
    mfs = next(f for f in out.functions if f.name == "MeanFieldStep")
    inner = next(n for n in mfs.node if n.op_type == "MinConv")
    assert inner.input[1] == mfs.node[0].output[0] and mfs.node[0].op_type == "Constant"
    onnx.checker.check_model(out, full_check=True)


def test_exact_mode_keeps_the_real_penalty():
    out, _ = BindPlugins(ops=("MinConv", "MeanFieldStep")).call(tiny_model("exact"))
    assert list(_node(out, "head/MinConv_0").input) == ["first", "pen0"]
    assert DUMMY_PENALTY not in {t.name for t in out.graph.initializer}
    assert [f.name for f in out.functions] == ["Correlation"]  # the unbound one stays


def test_unbound_nodes_lose_the_binding_attributes_only():
    model = tiny_model()
    out, _ = BindPlugins(ops=("MinConv",)).call(model)
    mfs = _node(out, "head/MeanFieldStep_0")
    assert [a.name for a in mfs.attribute] == ["mode"]
    corr = _node(out, "head/Correlation_0")
    assert sorted(a.name for a in corr.attribute) == ["capture", "disp_size", "grid"]
    kept = BindPlugins(ops=("MinConv",), strip_unbound=False).call(model)[0]
    assert _attr_bytes(_node(kept, "head/MeanFieldStep_0")) == \
        _attr_bytes(_node(model, "head/MeanFieldStep_0"))


def test_missing_mode_is_written_as_approx():
    model = tiny_model()
    node = _node(model, "head/MinConv_0")
    keep = [a for a in node.attribute if a.name != "mode"]
    del node.attribute[:]
    node.attribute.extend(keep)
    out, _ = BindPlugins(ops=("MinConv",)).call(model)
    attrs = _node(out, "head/MinConv_0").attribute
    assert [a.name for a in attrs] == ["mode", "plugin_namespace", "plugin_version"]
    assert attrs[0].s == b"approx"


def test_idempotent_and_unknown_ops_rejected():
    once, _ = BindPlugins(ops=("MinConv",)).call(tiny_model())
    twice, changed = BindPlugins(ops=("MinConv",)).call(once)
    assert not changed and twice.SerializeToString() == once.SerializeToString()
    with pytest.raises(PddnetError, match="unknown op"):
        BindPlugins(ops=("GridSample",))


def _run(model, feeds):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def test_native_rewrite_runs_identically_in_onnxruntime():
    model = tiny_model("exact")
    out, changed = BindPlugins(ops=()).call(model)
    assert changed and len(out.functions) == 3
    rng = np.random.default_rng(0)
    feeds = {k: rng.normal(size=(2, 2, 2, 3, 3, 3)).astype(np.float32) for k in ("x", "y")}
    np.testing.assert_array_equal(_run(model, feeds)[0], _run(out, feeds)[0])


def test_real_export_binding_and_readiness():
    torch = pytest.importorskip("torch")
    from pddnet.export.onnx_export import export_model
    from pddnet.model.network import PDDNet
    from pddnet.spec.config import preset

    net = PDDNet(preset("tiny"), seed=1).eval()
    with torch.no_grad():
        model = export_model(net, (24, 24, 24))
    assert custom_ops_in(model) == ["DeformableSample3D", "Correlation", "MinConv",
                                    "MeanFieldStep"]
    plan = plan_binding("auto", model, trt_version=(10, 9), triton_available=True)
    assert plan.ops == ("DeformableSample3D", "Correlation") and plan.fused  # the fused head
    out, _ = BindPlugins(plan.ops).call(model)
    assert sorted(f.name for f in out.functions) == ["MeanFieldStep", "MinConv"]
    onnx.checker.check_model(out)
    from pddnet.backends.trt.head import FuseHead

    fused, _ = FuseHead().call(out)
    assert list(fused.functions) == []  # tests/backends/test_trt_head.py checks the rest
    nofuse = plan_binding("auto", model, trt_version=(10, 9), triton_available=True,
                          fuse_head=False)
    out, _ = BindPlugins(nofuse.ops).call(model)
    assert sorted(f.name for f in out.functions) == ["MeanFieldStep"]
    report = check_trt_readiness(model)
    assert report.findings == []
    assert all(not any(st.needs_plugin.values()) for st in report.custom_ops.values())
    assert all(report.ok(v) for v in report.versions)
    # the native rewrite of the real model gives ONNX Runtime the same displacement
    rng = np.random.default_rng(2)
    feeds = {k: rng.normal(size=(1, 1, 24, 24, 24)).astype(np.float32)
             for k in (C.INPUT_FIXED, C.INPUT_MOVING)}
    native, _ = BindPlugins(ops=()).call(model)
    np.testing.assert_array_equal(_run(model, feeds)[0], _run(native, feeds)[0])


@pytest.mark.parametrize("mode,version,triton,expect", [
    ("auto", (10, 9), True, ("Correlation", "MinConv")),
    ("auto", (11, 2), True, ("Correlation", "MinConv")),
    ("auto", (10, 8), True, ()),      # no aot_impl before 10.9
    ("auto", (10, 3), True, ()),      # JetPack 6
    ("auto", (10, 9), False, ()),     # no triton: cannot compile PTX
    ("native", (10, 9), True, ()),
    ("none", (10, 9), True, None),
])
def test_binding_plan(mode, version, triton, expect):
    plan = plan_binding(mode, tiny_model(), trt_version=version, triton_available=triton)
    assert plan.ops == expect
    if mode == "auto" and expect:
        assert plan.aot and any("MeanFieldStep" in n for n in plan.notes)
    if mode == "auto" and not expect:
        assert plan.notes  # says why nothing is bound


def test_binding_plan_explicit_ops_and_bad_mode():
    plan = plan_binding("auto", tiny_model(), trt_version=(10, 9), triton_available=True,
                        ops=("MeanFieldStep", "DeformableSample3D"))
    assert plan.ops == ("MeanFieldStep",) and not plan.aot
    with pytest.raises(PddnetError, match="plugins must be one of"):
        plan_binding("jit", tiny_model(), trt_version=(10, 9), triton_available=True)


# ------------------------------------------------------------------------------------------
# readiness check on third-party style graphs
# ------------------------------------------------------------------------------------------

def _graph_model(nodes, inputs, outputs, inits=(), functions=(), opset=C.OPSET):
    g = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset),
                                            helper.make_opsetid(C.DOMAIN, 1)],
                          functions=list(functions))
    m.ir_version = 9
    return m


def test_gridsample_5d_needs_11_2_even_inside_a_function():
    warp = helper.make_function(
        C.DOMAIN, "Warp", ["img", "grid"], ["out"],
        [helper.make_node("GridSample", ["img", "grid"], ["out"], name="warp/GridSample",
                          mode="linear", padding_mode="border")], OPSETS)
    m = _graph_model(
        [helper.make_node("Warp", ["img", "grid"], ["out"], domain=C.DOMAIN, name="warp"),
         helper.make_node("GridSample", ["img2", "grid2"], ["out2"], name="gs2d")],
        [helper.make_tensor_value_info("img", F, [1, 1, 8, 8, 8]),
         helper.make_tensor_value_info("grid", F, [1, 8, 8, 8, 3]),
         helper.make_tensor_value_info("img2", F, [1, 1, 8, 8]),
         helper.make_tensor_value_info("grid2", F, [1, 8, 8, 2])],
        [helper.make_tensor_value_info("out", F, [1, 1, 8, 8, 8]),
         helper.make_tensor_value_info("out2", F, [1, 1, 8, 8])],
        functions=[warp])
    report = check_trt_readiness(m)
    labels = report.versions
    assert len(report.findings) == 1  # the 4D GridSample is fine everywhere
    f = report.findings[0]
    # the rank of the function's formal input comes from the call site
    assert f.op == "GridSample" and f.versions == labels[:2] and "Warp" in f.where()
    assert "5D" in f.reason
    assert report.custom_ops["Warp"].needs_plugin == {labels[0]: True, labels[1]: True,
                                                      labels[2]: False}
    assert not report.ok(labels[0]) and report.ok(labels[2])


def test_gridsample_rank_from_shape_inference_in_the_graph():
    m = _graph_model([helper.make_node("GridSample", ["img", "grid"], ["out"], name="gs")],
                     [helper.make_tensor_value_info("img", F, [1, 1, 4, 4, 4]),
                      helper.make_tensor_value_info("grid", F, [1, 4, 4, 4, 3])],
                     [helper.make_tensor_value_info("out", F, [1, 1, 4, 4, 4])])
    f = check_trt_readiness(m).findings
    assert len(f) == 1 and "5D" in f[0].reason and f[0].versions[-1] == "11.0-11.1"


def test_unsupported_ops_zero_points_and_missing_functions():
    zp = numpy_helper.from_array(np.array(3, np.int8), "zp")
    zp0 = numpy_helper.from_array(np.array(0, np.int8), "zp0")
    sc = numpy_helper.from_array(np.array(0.1, np.float32), "sc")
    m = _graph_model(
        [helper.make_node("QuantizeLinear", ["x", "sc", "zp"], ["q"], name="q_bad"),
         helper.make_node("DequantizeLinear", ["q", "sc", "zp0"], ["d"], name="dq_ok"),
         helper.make_node("Unique", ["d"], ["u"], name="uniq"),
         helper.make_node("Mystery", ["d"], ["z"], domain="com.vendor", name="myst")],
        [helper.make_tensor_value_info("x", F, [4])],
        [helper.make_tensor_value_info("u", F, None), helper.make_tensor_value_info("z", F, None)],
        inits=[zp, zp0, sc])
    report = check_trt_readiness(m)
    by = {f.node: f for f in report.findings}
    assert set(by) == {"q_bad", "uniq", "myst"}
    assert "zero point" in by["q_bad"].reason
    assert "not supported" in by["uniq"].reason
    assert "without a local function" in by["myst"].reason
    text = report.format()
    assert "NOT importable" in text and "q_bad" in text


def test_dft_supported_from_11_2_and_opset_note():
    m = _graph_model([helper.make_node("DFT", ["x"], ["y"], name="dft")],
                     [helper.make_tensor_value_info("x", F, [1, 8, 1])],
                     [helper.make_tensor_value_info("y", F, None)], opset=22)
    report = check_trt_readiness(m)
    assert report.findings[0].versions == report.versions[:2]
    assert any("opset 22" in n for n in report.notes)
