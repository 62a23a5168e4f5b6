"""Reduced precision (`pddnet.calibration`): FP16 export, FP16 storage emulation, INT8 Q/DQ
graphs and ranges, the sensitivity search, validation candidates and the CLI.

Data: 6 synthetic subjects at the `small` preset (2 train, 2 val, 2 test subjects); model: the
`tiny` preset, randomly initialised with a sharp softmax, exported at 48x40x64 (8 mm) as in
test_validate.

Not tested here: trained weights (the Dice effects of each block are in docs/precision.md and
docs/benchmarks.md, measured on the shipped weights), CPU speed-ups (machine and load
dependent; measured by `pddnet sensitivity` and scripts/bench_precision.py), TensorRT engines
of these graphs (no GPU; only the static readiness check runs here).
"""

import json
import logging
import math

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from helpers.tiny_pipeline import SHAPE

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

logging.getLogger().setLevel(logging.ERROR)  # onnxruntime.quantization logs to the root logger


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from helpers.tiny_pipeline import tiny_pipeline

    return tiny_pipeline(tmp_path_factory.mktemp("calibration"), subjects=6)


@pytest.fixture(scope="module")
def int8(setup):
    from pddnet.calibration.api import calibrate

    out = setup["tmp"] / "int8"
    return calibrate(setup["onnx"], setup["data"], out, progress=False)


def _cli(args):
    from pddnet.cli import main

    return CliRunner().invoke(main, args, catch_exceptions=False)


def _session(model):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    data = model.SerializeToString() if hasattr(model, "SerializeToString") else str(model)
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])


# --------------------------------------------------------------------------------------------
# FP16 graphs
# --------------------------------------------------------------------------------------------
def test_fp32_export_is_unchanged_by_the_precision_machinery(setup):
    from pddnet.export.onnx_export import export_model

    a = export_model(setup["net"], SHAPE, precision=None)
    b = export_model(setup["net"], SHAPE, precision="fp32")
    assert a.graph.SerializeToString() == b.graph.SerializeToString()
    assert not [n for n in a.graph.node if n.op_type == "Cast"]
    assert not [t for t in a.graph.initializer if t.data_type == TensorProto.FLOAT16]
    meta = {p.key: json.loads(p.value) for p in a.metadata_props}
    assert meta["pddnet.precision"] == {"mode": "fp32"}
    # every main-graph node belongs to exactly one block
    owners = [n for nodes in meta["pddnet.blocks"].values() for n in nodes]
    assert sorted(owners) == sorted(n.name for n in a.graph.node)


def test_fp16_graph_types(setup):
    from pddnet.calibration.blocks import fp16_plan
    from pddnet.export.onnx_export import check_model, export_model
    from pddnet.spec import contract as C

    plan = fp16_plan(["correlation", "meanfield2"])
    m = check_model(export_model(setup["net"], SHAPE, outputs=("probs", "entropy"),
                                 precision=plan))  # full check, strict typed inference
    g = m.graph
    f32, f16 = TensorProto.FLOAT, TensorProto.FLOAT16
    assert [i.type.tensor_type.elem_type for i in g.input] == [f32, f32]
    assert all(o.type.tensor_type.elem_type == f32 for o in g.output)
    types = {vi.name: vi.type.tensor_type.elem_type for vi in g.value_info}
    # the split tensors stay float32, the conv weights of FP16 blocks are float16
    assert types[C.FIXED_FEATURES] == f32 and types[C.MOVING_FEATURES] == f32
    inits = {t.name: t.data_type for t in g.initializer}
    assert inits["weights/conv2_w_fp16_0"] == f16 and "weights/conv2_w_0" not in inits
    assert inits["weights/offsets0_0"] == f32  # sampling coordinates stay float32
    conv2 = next(n for n in g.node if n.name == "fixed/Conv2_0")
    assert types[conv2.output[0]] == f16
    corr = next(n for n in g.node if n.op_type == "Correlation")
    assert types[corr.output[0]] == f32
    fns = {f.name: f for f in m.functions}
    # Correlation kept FP32: no float16 constant in its body. DeformableSample3D in FP16:
    # coordinates and weights computed in float32, cast to float16 for the MatMuls
    def const_types(f):
        return {n.attribute[0].t.data_type for n in f.node if n.op_type == "Constant"}
    assert f16 not in const_types(fns["Correlation"])
    assert f16 not in const_types(fns["DeformableSample3D"])
    casts = [n for n in fns["DeformableSample3D"].node if n.op_type == "Cast"]
    assert len(casts) == 3 and all(n.attribute[0].i == f16 for n in casts)
    # the two mean-field steps differ: one polymorphic body (constants CastLike the input)
    assert any(n.op_type == "CastLike" for n in fns["MeanFieldStep"].node)
    assert any(n.op_type == "CastLike" for n in fns["MinConv"].node)
    mf = [n for n in g.node if n.op_type == "MeanFieldStep"]
    assert [types[n.input[0]] for n in mf] == [f16, f32]
    meta = json.loads({p.key: p.value for p in m.metadata_props}["pddnet.precision"])
    assert meta["mode"] == "fp16" and meta["keep_fp32"] == ["correlation", "meanfield2"]
    assert meta["functions"]["MeanFieldStep"] == "polymorphic"
    assert "head/Correlation_0" in meta["nodes"]["fp32"]
    # it runs, and stays close to FP32 on this untrained network
    rng = np.random.default_rng(0)
    feeds = {"fixed": rng.normal(size=(1, 1) + SHAPE).astype(np.float32),
             "moving": rng.normal(size=(1, 1) + SHAPE).astype(np.float32)}
    out16 = _session(m).run(None, feeds)
    out32 = _session(setup["model"]).run(None, feeds)
    assert out16[0].dtype == np.float32
    assert np.abs(out16[0] - out32[0]).max() < 0.05


def test_fp16_graph_is_trt_ready_and_splits(setup):
    from pddnet.backends.trt.support import check_trt_readiness
    from pddnet.export.onnx_export import export_model
    from pddnet.graph.split import split_model

    m = export_model(setup["net"], SHAPE, precision="fp16")
    rep = check_trt_readiness(m)
    assert all(rep.ok(v) for v in rep.versions)
    split_model(m)  # the branches stay identical: fixed-scan reuse works


def test_keep_fp32_resolves_blocks_nodes_and_op_types(setup):
    from pddnet.calibration.blocks import resolve_keep
    from pddnet.calibration.graphs import block_map
    from pddnet.errors import PddnetError

    m = setup["model"]
    bm = block_map(m)
    ops = {n.name: n.op_type for n in m.graph.node}
    assert resolve_keep(None) == []  # the default: every block FP16 (docs/precision.md)
    assert resolve_keep(["none"]) == []
    assert resolve_keep(["conv2", "head/Correlation_0"], bm, ops) == ["conv2", "correlation"]
    assert resolve_keep(["Softmax"], bm, ops) == ["softmax"]
    assert resolve_keep(["MaxPool"], bm, ops) == ["meanfield1", "meanfield2"]  # inside MinConv
    with pytest.raises(PddnetError, match="not a block"):
        resolve_keep(["Bogus"], bm, ops)


# --------------------------------------------------------------------------------------------
# FP16 storage emulation and the ONNX Runtime audit
# --------------------------------------------------------------------------------------------
def test_round16_emulation_is_exact():
    from pddnet.graph.passes.fp16_storage import emulate_fp16_storage, round16_numpy

    g = helper.make_graph(
        [helper.make_node("Cast", ["x"], ["h"], to=TensorProto.FLOAT16),
         helper.make_node("Abs", ["h"], ["a"]),
         helper.make_node("Cast", ["a"], ["y"], to=TensorProto.FLOAT)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 20)])
    m.ir_version = 9
    rng = np.random.default_rng(1)
    x = (rng.normal(size=20000) * 10.0 ** rng.integers(-9, 6, 20000)).astype(np.float32)
    x = np.concatenate([x, np.float32([65504, 65519, 65520, -7e4, 0, 6e-8, 2.9e-8, 1 + 2 ** -11,
                                       1 + 3 * 2 ** -11])])
    # what ONNX Runtime's CPU provider does with the plain graph: no float16 Abs kernel, so it
    # casts back to float32 around it and drops the rounding altogether
    plain = _session(m).run(None, {"x": x})[0]
    assert np.array_equal(plain, np.abs(x))
    emu = _session(emulate_fp16_storage(m)).run(None, {"x": x})[0]
    with np.errstate(over="ignore"):
        ref = round16_numpy(np.abs(x))
    assert np.array_equal(emu, ref)


def test_emulated_graph_rounds_the_declared_fp16_tensors(setup):
    from pddnet.calibration.api import audit_fp16
    from pddnet.export.onnx_export import export_model
    from pddnet.graph.passes.fp16_storage import emulate_fp16_storage

    m16 = export_model(setup["net"], SHAPE, precision={"conv2": "fp16"})
    emu = emulate_fp16_storage(m16)
    assert not [t for t in emu.graph.initializer if t.data_type == TensorProto.FLOAT16]
    # expose the conv2 output: in the emulation it is float16-representable
    out = "fixed/Relu_2"
    emu.graph.output.append(helper.make_tensor_value_info(out, TensorProto.FLOAT, None))
    rng = np.random.default_rng(0)
    feeds = {"fixed": rng.normal(size=(1, 1) + SHAPE).astype(np.float32),
             "moving": rng.normal(size=(1, 1) + SHAPE).astype(np.float32)}
    got = _session(emu).run([out], feeds)[0]
    assert np.array_equal(got, got.astype(np.float16).astype(np.float32))
    audit = audit_fp16(m16)
    assert audit["declared_fp16_tensors"] > 0
    assert audit["fp16_tensors_in_ort"] < audit["declared_fp16_tensors"]


# --------------------------------------------------------------------------------------------
# INT8: ranges and Q/DQ graphs
# --------------------------------------------------------------------------------------------
def _toy_model():
    """x -> Relu -> r; r * 2 -> y; x - 1 -> z (three float tensors of known content)."""
    two = numpy_helper.from_array(np.float32(2.0), "two")
    one = numpy_helper.from_array(np.float32(1.0), "one")
    g = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["r"], name="relu"),
         helper.make_node("Mul", ["r", "two"], ["y"], name="mul"),
         helper.make_node("Sub", ["x", "one"], ["z"], name="sub")], "toy",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3]),
         helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 3])], initializer=[two, one])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 20)])
    m.ir_version = 9
    return m


def test_range_collection_matches_numpy_min_max():
    from pddnet.calibration.data import ArrayReader
    from pddnet.calibration.int8 import collect_ranges

    rng = np.random.default_rng(3)
    xs = [rng.normal(size=(2, 3)).astype(np.float32) * s for s in (1.0, 4.0, 0.5)]
    expect = {"x": xs, "r": [np.maximum(x, 0) for x in xs],
              "y": [2 * np.maximum(x, 0) for x in xs], "z": [x - 1 for x in xs]}
    ranges = collect_ranges(_toy_model(), ArrayReader([{"x": x} for x in xs]), symmetric=False)
    for name, arrays in expect.items():
        lo, hi = (float(np.asarray(v).reshape(-1)[0]) for v in ranges[name].range_value)
        assert lo == pytest.approx(min(a.min() for a in arrays), abs=1e-6), name
        assert hi == pytest.approx(max(a.max() for a in arrays), abs=1e-6), name
    sym = collect_ranges(_toy_model(), ArrayReader([{"x": x} for x in xs]), symmetric=True,
                         tensors={"z"})
    assert set(sym.keys()) == {"z"}
    m = max(abs(a).max() for a in expect["z"])
    lo, hi = (float(np.asarray(v).reshape(-1)[0]) for v in sym["z"].range_value)
    assert (lo, hi) == (pytest.approx(-m, abs=1e-6), pytest.approx(m, abs=1e-6))


def test_branch_ranges_are_merged():
    from onnxruntime.quantization.calibrate import TensorData

    from pddnet.calibration.int8 import merge_branches

    ranges = {"fixed/a": TensorData(lowest=np.float32(-1), highest=np.float32(2)),
              "moving/a": TensorData(lowest=np.float32(-3), highest=np.float32(1))}
    merge_branches(ranges, {"fixed/a": "moving/a"})
    assert ranges["fixed/a"].range_value == ranges["moving/a"].range_value == (-3, 2)


def test_feature_network_calibration_equals_the_merged_full_model_ranges(setup):
    from pddnet.calibration.data import ArrayReader
    from pddnet.calibration.int8 import (
        branch_pairs,
        collect_feature_ranges,
        collect_ranges,
        merge_branches,
        node_tensors,
        prepare,
    )

    work, names = prepare(setup["model"], ["conv1", "conv2"])
    tensors = node_tensors(work, names)
    rng = np.random.default_rng(2)
    feeds = [{"fixed": rng.normal(size=(1, 1) + SHAPE).astype(np.float32),
              "moving": 2 * rng.normal(size=(1, 1) + SHAPE).astype(np.float32)}
             for _ in range(2)]
    full = merge_branches(collect_ranges(work, ArrayReader(feeds), tensors=tensors),
                          branch_pairs(work))
    feat = collect_feature_ranges(work, ArrayReader(feeds), tensors=tensors)
    assert set(feat.keys()) == tensors
    for t in tensors:
        assert np.allclose(feat[t].range_value, full[t].range_value, rtol=1e-6), t


def test_qdq_structure(setup, int8):
    from pddnet.backends.trt.support import check_trt_readiness
    from pddnet.calibration.int8 import branch_pairs, qdq_summary
    from pddnet.graph.split import split_model

    q = onnx.load(str(int8["int8"]))
    s = qdq_summary(q)
    assert s["nonzero_zero_points"] == [] and s["zero_point_types"] == ["INT8"]
    # exactly the default blocks' convolutions (conv1, conv2) of both branches, nothing else
    assert s["quantised_nodes"] == sorted(
        ["fixed/Conv1_0", "fixed/Conv2_0", "moving/Conv1_1", "moving/Conv2_1"])
    assert not [n for n in q.graph.node if n.name.startswith("head/")
                and n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    # per-channel weight scales: one per output channel (tiny: c = 4, 4c = 16)
    chans = {k.split("/")[1].split("_w")[0]: v for k, v in s["per_channel_weights"].items()}
    assert chans == {"conv1": 16, "conv2": 16}
    # activation scales of the fixed and moving branches are the same tensors' values
    inits = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    scale = {n.input[0]: float(inits[n.input[1]]) for n in q.graph.node
             if n.op_type == "QuantizeLinear"}
    twins = branch_pairs(setup["model"])
    fixed_q = [t for t in scale if t.startswith("fixed/")]
    assert fixed_q and all(scale[twins[t]] == scale[t] for t in fixed_q)
    split_model(q)  # identical branches: the runtime can reuse the fixed features
    rep = check_trt_readiness(q)
    assert all(rep.ok(v) for v in rep.versions), rep.format()
    meta = json.loads({p.key: p.value for p in q.metadata_props}["pddnet.precision"])
    assert meta["mode"] == "int8" and meta["blocks"]["conv2"] == "int8"
    assert meta["blocks"]["correlation"] == "fp32"
    assert meta["calibration"]["split"] == "train" and meta["calibration"]["pairs"] == 2
    ranges = json.loads((int8["ranges"]["ranges.json"]).read_text())
    assert ranges["tensors"]["fixed/Relu_1"]["quantised"]
    assert all(int8["ranges"][k].exists() for k in ("calibration.flatbuffers",
                                                   "calibration.cache", "calibration.json"))
    cache = int8["ranges"]["calibration.cache"].read_text().split("\n")
    assert any(line.startswith("fixed/Relu_1 ") for line in cache)


def test_int8_for_a_pair_and_no_preprocessing_advice(setup, caplog):
    """``int8_for_pair`` (pddnet bench's INT8 row) quantises the default blocks on one pair,
    and the quantiser's advice to pre-process (not for our users) is not logged; its other
    warnings still are."""
    import logging

    from pddnet.calibration.blocks import DEFAULT_INT8_BLOCKS
    from pddnet.calibration.int8 import int8_for_pair, qdq_summary

    rng = np.random.default_rng()
    feeds = {k: rng.normal(size=(1, 1) + SHAPE).astype(np.float32) for k in ("fixed", "moving")}
    with caplog.at_level(logging.WARNING):
        q, desc = int8_for_pair(setup["model"], feeds)
        logging.getLogger().warning("still logged before quantization")  # the filter is gone
    assert desc["blocks"] == list(DEFAULT_INT8_BLOCKS)
    assert sorted(desc["nodes"]) == sorted(qdq_summary(q)["quantised_nodes"])
    assert [r.getMessage() for r in caplog.records
            if "before quantization" in r.getMessage()] == ["still logged before quantization"]


def test_int8_inside_custom_ops_inlines_those_calls_only(setup):
    from pddnet.calibration.data import ArrayReader
    from pddnet.calibration.int8 import build_int8, qdq_summary

    rng = np.random.default_rng(0)
    feeds = [{"fixed": rng.normal(size=(1, 1) + SHAPE).astype(np.float32),
              "moving": rng.normal(size=(1, 1) + SHAPE).astype(np.float32)}]
    q, _, info = build_int8(setup["model"], ["meanfield2"], ArrayReader(feeds), table=False)
    assert info["inlined"] == ["head/MeanFieldStep_1"]
    ops = {n.op_type for n in q.graph.node}
    assert "MeanFieldStep" in ops and "Correlation" in ops  # the other calls stay functions
    s = qdq_summary(q)
    assert s["quantised_nodes"] and all(n.startswith("head/MeanFieldStep_1/")
                                        for n in s["quantised_nodes"])
    assert {f.name for f in q.functions} == {"DeformableSample3D", "Correlation",
                                             "MeanFieldStep", "MinConv"}


def test_bad_inputs(setup, int8, tmp_path):
    from pddnet.calibration.api import calibrate
    from pddnet.errors import PddnetError

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(PddnetError, match="no \\*_dataset.json"):
        calibrate(setup["onnx"], empty, tmp_path / "o1", progress=False)
    with pytest.raises(PddnetError, match="asked for 50 calibration pairs but the train split "
                                          "has only 2"):
        calibrate(setup["onnx"], setup["data"], tmp_path / "o2", pairs=50, progress=False)
    with pytest.raises(PddnetError, match="already quantised"):
        calibrate(int8["int8"], setup["data"], tmp_path / "o3", progress=False)
    with pytest.raises(PddnetError, match="already exists"):
        calibrate(setup["onnx"], setup["data"], int8["int8"].parent, progress=False)
    # the same through the CLI: one line, exit status 2
    r = _cli(["calibrate", "--onnx", str(int8["int8"]), "--data", str(setup["data"]), "--out",
              str(tmp_path / "o4"), "--no-progress"])
    assert r.exit_code == 2 and "already quantised" in r.output


# --------------------------------------------------------------------------------------------
# the sensitivity search
# --------------------------------------------------------------------------------------------
def _synthetic(effects, savings, gate, **kw):
    """A search where block effects add up (|ΔDice| in points) and savings are given."""
    from pddnet.calibration.search import Measure, choose

    calls = []

    def measure(blocks):
        calls.append(list(blocks))
        d = sum(effects[b] for b in blocks)
        return Measure(abs(d), d, 0.1 * abs(d), 0.01 * abs(d), 0.5, 2)

    alone = {b: measure([b]) for b in effects}
    calls.clear()
    return choose(list(effects), alone, savings, measure, gate=gate, **kw), calls


def test_search_excludes_the_known_sensitive_block():
    effects = {"conv2": 0.1, "correlation": 2.0, "softmax": 0.3, "meanfield1": 0.4}
    savings = {"conv2": 10.0, "correlation": 50.0, "softmax": 5.0, "meanfield1": 8.0}
    dec, calls = _synthetic(effects, savings, gate=0.5)
    assert dec.chosen == ["conv2", "meanfield1"]  # 0.1 + 0.4 <= 0.5; + softmax would be 0.8
    assert "correlation" in dec.excluded and "alone" in dec.excluded["correlation"]
    assert "softmax" in dec.excluded and "with ['conv2', 'meanfield1']" in dec.excluded["softmax"]
    assert dec.measure.delta_dice_max == pytest.approx(0.5)
    # all three together first (0.8: fails), then greedily; each combination measured once
    assert calls == [["conv2", "meanfield1", "softmax"], ["conv2", "meanfield1"]]
    assert [s["kept"] for s in dec.steps] == [False, True, True, False]


def test_search_skips_blocks_without_saving_and_failures():
    from pddnet.calibration.search import Measure, choose

    effects = {"pool": 0.0, "conv2": 0.2, "obelisk": 0.1}
    savings = {"pool": -30.0, "conv2": 100.0, "obelisk": 3.0}
    dec, _ = _synthetic(effects, savings, gate=1.0, min_saving=5.0)
    assert dec.chosen == ["conv2"]
    assert "no saving" in dec.excluded["pool"] and "no saving" in dec.excluded["obelisk"]
    broken = {"conv2": Measure(math.inf, math.nan, math.inf, math.nan, error="non-finite")}
    dec = choose(["conv2"], broken, {"conv2": 1.0}, lambda b: None, gate=1.0)
    assert dec.chosen == [] and "failed alone" in dec.excluded["conv2"]


def test_search_gate_fails_when_it_should():
    from pddnet.calibration.search import Measure

    m = Measure(0.51, -0.51, 0.2, 0.01)
    assert not m.passes(0.5) and m.passes(0.51)
    dec, _ = _synthetic({"conv2": 0.6}, {"conv2": 1.0}, gate=0.5)
    assert dec.chosen == [] and dec.measure is None


def test_run_search_end_to_end_on_tiny(setup, tmp_path):
    from pddnet.calibration.api import run_search

    doc = run_search(setup["ckpt"], setup["data"], tmp_path / "s", split="val",
                     blocks=["conv2", "softmax"], threads=1, repeats=1, progress=False)
    assert set(doc["results"]["fp16"]) == {"conv2", "softmax"}
    assert set(doc["results"]["int8"]) == {"conv2", "softmax"}
    assert (tmp_path / "s" / "sensitivity.md").exists()
    assert (tmp_path / "s" / "ranges.json").exists()
    if doc["decisions"]["fp16"]["chosen"]:
        m = onnx.load(str(tmp_path / "s" / "model.fp16.onnx"))
        meta = json.loads({p.key: p.value for p in m.metadata_props}["pddnet.precision"])
        assert meta["decision"]["chosen"] == doc["decisions"]["fp16"]["chosen"]


# --------------------------------------------------------------------------------------------
# validation and CLI
# --------------------------------------------------------------------------------------------
def test_validate_reports_fp16_and_int8_beside_fp32(setup, int8, tmp_path):
    fp16 = tmp_path / "tiny.fp16.onnx"
    r = _cli(["export", str(setup["ckpt"]), "--out", str(fp16), "--precision", "fp16",
              "--keep-fp32", "Correlation"])
    assert r.exit_code == 0, r.output
    assert "kept in FP32: correlation" in r.output
    out = tmp_path / "val"
    r = _cli(["validate", "--checkpoint", str(setup["ckpt"]), "--onnx", str(setup["onnx"]),
              "--data", str(setup["data"]), "--out", str(out), "--threads", "1", "--warmup",
              "0", "--repeats", "1", "--in-process", "--figure-pairs", "0", "--no-progress",
              "--fp16", str(fp16), "--int8", str(int8["int8"])])
    assert r.exit_code == 0, r.output
    rep = json.loads((out / "report.json").read_text())
    cands = rep["candidates"]
    assert {"onnxruntime-fp32", "onnxruntime-fp16", "onnxruntime-fp16-emulated",
            "onnxruntime-int8"} <= set(cands)
    fields = set(cands["onnxruntime-fp32"])
    for name in ("onnxruntime-fp16", "onnxruntime-fp16-emulated", "onnxruntime-int8"):
        assert fields <= set(cands[name])
        assert cands[name]["summary"]["disp_diff_max_vox"] is not None
    assert cands["onnxruntime-int8"]["precision"] == "int8"
    assert rep["settings"]["precision_gates"]["onnxruntime-int8"] == {
        "delta_dice_points": 1.0, "disp_diff_p99_mm": 1.0, "disp_diff_max_mm": 2.0}
    gates = {g["metric"]: g for g in cands["onnxruntime-int8"]["gates"]}
    assert list(gates) == ["delta_dice_points", "disp_diff_p99_mm", "disp_diff_max_mm"]
    assert [gates[k]["threshold"] for k in gates] == [1.0, 1.0, 2.0]
    for name in ("onnxruntime-fp16", "onnxruntime-fp16-emulated", "onnxruntime-int8"):
        c = cands[name]
        for key in ("disp_diff_p99_mm", "disp_diff_max_mm"):  # the gate sees the worst pair
            per_pair = [p[key] for p in c["pairs"]]
            assert c["summary"][key] == max(per_pair)
            assert {g["metric"]: g for g in c["gates"]}[key]["measured"] == max(per_pair)
        for p in c["pairs"]:  # mm >= voxels times the finest spacing, <= times the coarsest
            sp = p["spacing_mm"]
            assert p["disp_diff_max_mm"] >= p["disp_diff_max_vox"] * min(sp) * (1 - 1e-6)
            assert p["disp_diff_max_mm"] <= p["disp_diff_max_vox"] * max(sp) * (1 + 1e-6)
            assert p["disp_diff_p99_mm"] <= p["disp_diff_max_mm"]
    audit = cands["onnxruntime-fp16"]["precision_info"]["audit"]
    assert audit["declared_fp16_tensors"] > audit["fp16_tensors_in_ort"]
    assert any("CPU provider" in n for n in rep["notes"])


def test_validate_int8_gate_fails_when_it_should(setup, int8, tmp_path):
    """An INT8 graph whose activation scale is wrecked fails its Dice gate (exit 1)."""
    q = onnx.load(str(int8["int8"]))
    for t in q.graph.initializer:  # quantise the conv2 output with a 1000x too coarse step
        if "Conv2" in t.name and t.name.endswith("_scale") and t.data_type == TensorProto.FLOAT \
                and numpy_helper.to_array(t).size == 1:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * 1000, t.name))
    bad = tmp_path / "bad.int8.onnx"
    onnx.save(q, str(bad))
    r = _cli(["validate", "--checkpoint", str(setup["ckpt"]), "--onnx", str(setup["onnx"]),
              "--data", str(setup["data"]), "--out", str(tmp_path / "v"), "--threads", "1",
              "--warmup", "0", "--repeats", "1", "--in-process", "--figure-pairs", "0",
              "--no-progress", "--int8", str(bad), "--gate-dice-int8", "0.01"])
    assert r.exit_code == 1, r.output
    rep = json.loads((tmp_path / "v" / "report.json").read_text())
    assert {g["candidate"] for g in rep["failed_gates"]} == {"onnxruntime-int8"}
    assert "delta_dice_points" in {g["metric"] for g in rep["failed_gates"]}


def test_cli_help():
    for cmd in (["calibrate", "--help"], ["sensitivity", "--help"], ["export", "--help"]):
        r = _cli(cmd)
        assert r.exit_code == 0, r.output
    assert "--precision" in _cli(["export", "--help"]).output
    assert "--int8" in _cli(["validate", "--help"]).output
