"""`pddnet bench`: the analytic FLOP counter, the ORT profile grouping, the benchmark run.

The FLOP counter is checked against counts worked out by hand for tiny configurations, and its
convolution part against PyTorch's own FLOP counter on the real network; the profile grouping
against a synthetic trace and a real inlined model; the benchmark on the `tiny` preset for
the presence and consistency of every field.

Not tested here: speed (no timing is asserted), the paper-size run (docs/benchmarks.md), the
memory figures' values (only that they are measured per child process).
"""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from pddnet.spec.config import PDDConfig
from pddnet.validation.flops import count_flops

# channels 1, grid 2^3, L = 3 on a 12^3 image: features 4^3 (64), pooled 6^3, stem 3^3,
# K = 8 control points, D = 27 displacements, K * D = 216
HAND = {
    # separable stride-2 box: 2 adds per output of each pass + 1 multiply; x2 scans
    "features.avgpool": 2 * (2 * (6 * 12 * 12 + 6 * 6 * 12 + 6 * 6 * 6) + 216),     # 6480
    # 27 outputs x 4 channels x (2 * 125 MAC + bias + ReLU), x2 scans
    "features.conv0": 2 * 27 * 4 * 252,                                           # 54432
    # 4 offsets x (3 FLOPs x 4 channels x (4*3*3 + 4*4*3 + 4*4*4)) + 8 x 64 differences
    "features.obelisk_sampling": 2 * (4 * 3 * 4 * (36 + 48 + 64) + 8 * 64),        # 15232
    "features.conv1": 2 * 64 * 4 * (2 * 8 + 2),                                    # 9216
    "features.conv2": 2 * 64 * 4 * (2 * 4 * 27 + 2),                               # 111616
    "features.conv3": 2 * 64 * 1 * (2 * 4 + 1),                                    # 1152
    # moving on the displaced lattice 6^3, fixed on the control points 2^3
    "correlation.sampling": 3 * (6 * 16 + 6 * 6 * 4 + 216) + 3 * (2 * 16 + 4 * 4 + 8),  # 1536
    "correlation.ssd": 3 * 1 * 8 * 27,                                             # C K L^3 3
    "data_cost": 2 * 216,
    "minconv": 2 * 20 * 216,                 # two iterations x (min-pool 6 + 2 avg-pools 14)
    "grid_smoothing": 2 * 14 * 216,
    "second_input": 4 * 216,
    "softmax": 6 * 216,
    "expectation": 6 * 216,
    # 3 components x separable lattice 2^3 -> 12^3, then x voxels per unit
    "upsampling": 3 * 3 * (12 * 2 * 2 + 12 * 12 * 2 + 1728) + 3 * 1728,            # 23760
}
HAND_CFG = PDDConfig(channels=1, grid=(2, 2, 2), disp_size=3, capture=0.3)


def test_flops_match_hand_counts():
    fc = count_flops(HAND_CFG, (12, 12, 12))
    assert fc.blocks == HAND
    assert fc.total == sum(HAND.values())
    assert fc.features == sum(v for k, v in HAND.items() if k.startswith("features."))
    d = fc.as_dict()
    assert d["total"] == fc.total and abs(sum(d["share"].values()) - 1.0) < 1e-12


def test_flops_variants_by_hand():
    exact = count_flops(PDDConfig(channels=1, grid=(2, 2, 2), disp_size=3, capture=0.3,
                                  minconv="exact"), (12, 12, 12), outputs=("entropy",))
    assert exact.blocks["minconv"] == 2 * 3 * 14 * 216   # 3 axes x 14 per element, 2 iterations
    assert exact.blocks["entropy"] == 3 * 216
    # anisotropic: the correlation formula C*K*L^3*3 with K = 2*3*4, L = 5, C = 2
    fc = count_flops(PDDConfig(channels=2, grid=(2, 3, 4), disp_size=5, capture=0.3),
                     (12, 15, 18))
    assert fc.blocks["correlation.ssd"] == 2 * 24 * 125 * 3
    # features 4x5x6 = 120 voxels, conv3 (4c -> c, 1x1, bias, no ReLU)
    assert fc.blocks["features.conv3"] == 2 * 120 * 2 * (2 * 8 + 1)
    with pytest.raises(Exception, match="image_shape"):
        count_flops(HAND_CFG, (12, 12))


def test_flops_convolutions_match_pytorch_flop_counter():
    torch = pytest.importorskip("torch")
    from torch.utils.flop_counter import FlopCounterMode

    from pddnet.model.network import PDDNet
    from pddnet.spec.config import preset

    cfg, shape = preset("tiny"), (24, 21, 30)
    net = PDDNet(cfg, seed=0).eval()
    x = torch.zeros(1, 1, *shape)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net.features(x)
        net.features(x)
    conv = sum(v for op, v in counter.get_flop_counts()["Global"].items()
               if "convolution" in str(op))
    fc = count_flops(cfg, shape)
    # ours adds bias and ReLU per output value: conv0/1/2 have both, conv3 only a bias
    from pddnet.validation.flops import stem_shape
    n_stem, n_feat, c = int(np.prod(stem_shape(shape))), int(np.prod([n // 3 for n in shape])), 4
    extra = 2 * (n_stem * 4 * 2 + n_feat * 4 * c * 2 + n_feat * 4 * c * 2 + n_feat * c * 1)
    ours = sum(fc.blocks[f"features.conv{i}"] for i in range(4))
    assert ours - extra == conv


def test_profile_grouping_on_a_synthetic_trace():
    from pddnet.validation.profile import summarise_profile

    def node(name, op, ts, dur):
        return {"cat": "Node", "name": f"{name}_kernel_time", "ts": ts, "dur": dur,
                "args": {"op_name": op}}

    events = [
        {"cat": "Session", "name": "model_run", "ts": 0, "dur": 100},      # warm-up, skipped
        node("fixed/Conv0_0", "Conv", 10, 50_000),
        {"cat": "Session", "name": "model_run", "ts": 1000, "dur": 9000},
        node("fixed/Conv0_0", "FusedConv", 1100, 1000),
        node("fixed/DeformableSample3D_0/DeformableSample3D/MatMul_0", "MatMul", 1200, 2000),
        node("head/MeanFieldStep_0/MeanFieldStep/MinConv_0/MinConv/MaxPool_0", "MaxPool", 1300,
             3000),
        node("head/MeanFieldStep_0/MeanFieldStep/MatMul_0", "MatMul", 1400, 500),
        node("moving/Conv0_1", "FusedConv", 1500, 1500),
        {"cat": "Node", "name": "fixed/Conv0_0_fence_before", "ts": 1600, "dur": 0},
        node("MemcpyToHost", "Memcpy", 1700, 100),
    ]
    callers = {"fixed/DeformableSample3D_0": ["DeformableSample3D"],
               "head/MeanFieldStep_0": ["MeanFieldStep"],
               "head/MeanFieldStep_0/MeanFieldStep/MinConv_0": ["MeanFieldStep", "MinConv"]}
    s = summarise_profile(events, callers, skip_runs=1)
    assert s["runs"] == 1 and s["model_run_ms"] == 9.0 and s["kernel_ms"] == pytest.approx(8.1)
    assert s["by_prefix"] == {"head": 3.5, "fixed": 3.0, "moving": 1.5, "other": 0.1}
    assert s["by_function"] == {"MeanFieldStep": 3.5, "(graph)": 2.6, "DeformableSample3D": 2.0}
    assert s["by_function_nested"]["MeanFieldStep/MinConv"] == 3.0
    assert s["by_function_nested"]["MeanFieldStep"] == 0.5
    assert s["by_prefix_function"]["fixed/(graph)"] == 1.0
    assert s["by_op_type"]["FusedConv"] == 2.5 and "Conv" not in s["by_op_type"]
    assert s["top_nodes"][0]["node"].endswith("MaxPool_0")


def test_inline_named_keeps_outputs_and_names_callers():
    torch = pytest.importorskip("torch")
    import onnxruntime as ort

    from pddnet.export.onnx_export import export_model
    from pddnet.graph.passes.inline import inline_named
    from pddnet.model.network import PDDNet
    from pddnet.spec.config import preset

    model = export_model(PDDNet(preset("tiny"), seed=0).eval(), (24, 24, 24))
    inlined, callers = inline_named(model)
    assert not inlined.functions and model.functions
    assert {tuple(v) for v in callers.values()} == {
        ("DeformableSample3D",), ("Correlation",), ("MeanFieldStep",), ("MeanFieldStep", "MinConv")}
    assert all(n.name.split("/")[0] in ("fixed", "moving", "head") for n in inlined.graph.node)
    assert all(n.domain != "ai.pddnet" for n in inlined.graph.node)
    rng = np.random.default_rng(1)
    feeds = {k: rng.uniform(-2, 3, (1, 1, 24, 24, 24)).astype(np.float32)
             for k in ("fixed", "moving")}
    run = lambda m: ort.InferenceSession(m.SerializeToString(),
                                         providers=["CPUExecutionProvider"]).run(None, feeds)
    for a, b in zip(run(model), run(inlined)):
        np.testing.assert_array_equal(a, b)
    del torch


def test_bench_tiny_reports_every_field(tmp_path):
    pytest.importorskip("torch")
    from pddnet.cli import main
    from pddnet.spec.config import preset

    out = tmp_path / "bench.json"
    res = CliRunner().invoke(main, ["bench", "--preset", "tiny", "--threads", "1", "--repeats",
                                    "2", "--warmup", "1", "--gemm-size", "128",
                                    "--profile-runs", "1", "--out", str(out)],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    for text in ("pytorch", "onnxruntime-no-mem-pattern", "GFLOP per pair", "floor", "by_prefix",
                 "FLOPs per block", "speed-up"):
        assert text in res.output, text
    r = json.loads(out.read_text())
    assert r["schema"] == "pddnet.bench/1"
    assert r["settings"]["image_shape"] == [24, 24, 24] and r["settings"]["threads"] == 1
    assert set(r["runs"]) == {"pytorch", "onnxruntime", "onnxruntime-no-mem-pattern",
                              "runtime", "runtime-no-mem-pattern", "runtime-arena",
                              "runtime-ort-head", "runtime-int8"}
    # the INT8 row runs the Q/DQ graph, with the C sampling where the library is built
    assert r["settings"]["int8"]["blocks"] == ["conv1", "conv2"]
    assert len(r["settings"]["int8"]["nodes"]) == 4  # two convolutions in each branch
    assert r["runs"]["runtime-int8"]["precision"] == "int8"
    assert r["runs"]["runtime"]["precision"] == "fp32"
    # the runtime as a user gets it: the C head where the library is built, else ORT (said)
    from pddnet.backends import native

    impl = r["runs"]["runtime"]["head_impl"]["implementation"]
    assert impl == (f"native-{native.status()['isa']}" if native.status()["isa"]
                    else "onnxruntime")
    assert r["runs"]["runtime-ort-head"]["head_impl"]["implementation"] == "onnxruntime"
    smp = r["runs"]["runtime"]["sampling_impl"]["implementation"]
    assert smp == ("native" if native.status()["built"] else "onnxruntime")
    assert r["runs"]["runtime-ort-head"]["sampling_impl"]["implementation"] == "onnxruntime"
    assert r["runtime_sampling"]["implementation"] == smp
    assert "runtime: features' OBELISK sampling in " in res.output
    assert r["runs"]["runtime-int8"]["sampling_impl"]["implementation"] == smp
    for name in ("runtime", "runtime-ort-head", "runtime-int8"):
        parts = r["runs"][name]["parts"]
        assert all(parts[k]["p50_ms"] > 0 for k in ("features", "head", "extra"))
    assert "runtime (pair runner)" in res.output
    for name, run in r["runs"].items():
        lat = run["latency"]
        assert lat["n"] == 2 and len(lat["samples_ms"]) == 2 and lat["p50_ms"] > 0
        assert run["memory"]["isolated"] and run["memory"]["peak_rss_mb"] > 0
        assert run["torch_loaded"] == (name == "pytorch")   # one process per backend
    assert r["runs"]["onnxruntime"]["describe"]["mem_pattern"] is True  # the default
    assert r["runs"]["onnxruntime-no-mem-pattern"]["describe"]["mem_pattern"] is False
    assert r["runs"]["pytorch"]["describe"]["threads"] == 1
    t50 = r["runs"]["pytorch"]["latency"]["p50_ms"]
    for name, sp in r["speedup_vs_pytorch"].items():
        assert sp == pytest.approx(t50 / r["runs"][name]["latency"]["p50_ms"])
    assert r["flops"]["total"] == count_flops(preset("tiny"), (24, 24, 24)).total
    g = r["gemm"]["onnxruntime"]
    assert g["gflops"] >= g["gflops_median"] > 0 and r["gemm"]["torch"]["gflops"] > 0
    assert r["floor"]["floor_ms"] == pytest.approx(
        r["flops"]["total"] / (r["gemm"]["onnxruntime"]["gflops"] * 1e9) * 1e3)
    diffs = dict(r["check"]["disp_max_abs_diff_vs_pytorch_vox"])
    assert np.isfinite(diffs.pop("runtime-int8"))  # INT8 moves the field: a speed row
    assert max(diffs.values()) < 1e-4
    p = r["profile"]
    assert p["runs"] == 1 and set(p["by_prefix"]) >= {"fixed", "moving", "head"}
    assert set(p["by_function"]) >= {"DeformableSample3D", "Correlation", "MeanFieldStep"}
    assert r["machine"]["cpu_model"] and r["machine"]["load_average"]


def test_bench_help():
    from pddnet.cli import main

    res = CliRunner().invoke(main, ["bench", "--help"])
    assert res.exit_code == 0 and "--preset" in res.output and "--gemm-size" in res.output
