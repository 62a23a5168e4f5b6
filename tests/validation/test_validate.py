"""`pddnet validate`: the torch reference backend, the comparator, gates, report and CLI.

Data: 4 synthetic subjects at the `small` preset (2 test pairs); model: the `tiny` preset,
randomly initialised with a sharp softmax (alpha5) so that the field moves labels, exported
at 48x40x64 (8 mm) so that the runtime's pre-processing resamples.

Not tested here: trained weights (Dice values are meaningless), timing values (only their
presence and consistency), the GPU/TensorRT candidates of later issues, report.md/html.
"""

import json
import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from click.testing import CliRunner

from helpers.tiny_pipeline import SHAPE

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import onnx

    from helpers.tiny_pipeline import tiny_pipeline
    from pddnet.export.onnx_export import export_model
    from pddnet.model.network import PDDNet
    from pddnet.spec.config import preset

    base = tiny_pipeline(tmp_path_factory.mktemp("validate"))
    tmp, model = base["tmp"], base["model"]

    def variant(name, edit):
        m = onnx.ModelProto()
        m.CopyFrom(model)
        edit(m)
        path = tmp / name
        onnx.save(m, str(path))
        return path

    def shift_displacements(m):  # every candidate displacement moved by 0.05 normalised units
        init = next(t for t in m.graph.initializer if "displacements" in t.name)
        arr = onnx.numpy_helper.to_array(init) + np.float32(0.05)
        init.CopyFrom(onnx.numpy_helper.from_array(arr.astype(np.float32), init.name))

    def nan_bias(m):
        init = next(t for t in m.graph.initializer if "conv3_b" in t.name)
        arr = np.full_like(onnx.numpy_helper.to_array(init), np.nan)
        init.CopyFrom(onnx.numpy_helper.from_array(arr, init.name))

    other = PDDNet(preset("tiny", channels=5), seed=0).eval()
    wrong = tmp / "wrong_config.onnx"
    onnx.save(export_model(other, SHAPE, spacing_mm=(8.0, 8.0, 8.0)), str(wrong))
    return {**base, "perturbed": variant("perturbed.onnx", shift_displacements),
            "nan": variant("nan.onnx", nan_bias), "wrong": wrong}


@pytest.fixture(scope="module")
def report(setup):
    from pddnet.validation.compare import compare, default_candidates

    ref, cands = default_candidates(setup["ckpt"], setup["onnx"])
    return compare(ref, cands, setup["data"], threads=1, warmup=1, repeats=3, isolate=False,
                   progress=False)


def _cli(args):
    from pddnet.cli import main

    return CliRunner().invoke(main, args, catch_exceptions=False)


def _validate_args(setup, out, *extra, onnx_model=None):
    return ["validate", "--checkpoint", str(setup["ckpt"]), "--onnx", str(onnx_model or setup["onnx"]),
            "--data", str(setup["data"]), "--out", str(out), "--threads", "1", "--warmup", "0",
            "--repeats", "2", "--no-progress", *extra]


# --------------------------------------------------------------------------------------------
# the torch backend
# --------------------------------------------------------------------------------------------
def test_torch_backend_matches_direct_pddnet_calls(setup):
    import onnx

    from pddnet.backends import create_backend
    from pddnet.graph.split import split_model
    from pddnet.spec import contract as C

    net = setup["net"]
    proto = onnx.load(str(setup["onnx"]))
    parts = split_model(proto)
    rng = np.random.default_rng(5)
    f, m = (rng.uniform(-2, 3, (1, 1) + SHAPE).astype(np.float32) for _ in range(2))
    with torch.no_grad():
        reg = net(torch.from_numpy(f), torch.from_numpy(m))
        want_disp = reg.dense(SHAPE).numpy()
        want_grid = reg.grid_disp.numpy()
        want_feat = net.features(torch.from_numpy(f)).numpy()
    n = torch.get_num_threads()  # same thread count: same reduction order, identical results
    with create_backend("torch", proto, checkpoint=setup["ckpt"], threads=n) as full:
        assert [s.name for s in full.input_specs] == ["fixed", "moving"]
        got = full.run({"fixed": f, "moving": m})
        assert full.describe()["part"] == "full" and full.describe()["threads"] == n
    assert set(got) == {C.OUTPUT_DISP, C.OUTPUT_GRID_DISP}
    np.testing.assert_array_equal(got["disp"], want_disp)
    np.testing.assert_array_equal(got["grid_disp"], want_grid)
    assert np.abs(want_disp).max() > 0.01  # not trivially zero
    with create_backend("torch", parts.features, label="features", network=net) as fe, \
            create_backend("torch", parts.head, label="head", network=net) as hd:
        feats = fe.run({"image": f})["features"]
        np.testing.assert_array_equal(feats, want_feat)
        out = hd.run({C.FIXED_FEATURES: feats, C.MOVING_FEATURES: fe.run({"image": m})["features"]})
    np.testing.assert_array_equal(out["disp"], want_disp)


def test_torch_backend_through_the_registrar_matches_pddnet(setup):
    from pddnet.data.learn2reg import Learn2RegDataset
    from pddnet.runtime.session import Registrar

    ds = Learn2RegDataset(setup["data"])
    fixed, moving, _, _ = ds.load_pair(ds.pairs("test")[0])
    with Registrar(setup["onnx"], backend="torch", backend_options={"checkpoint": setup["ckpt"]}
                   ) as reg:
        res = reg.register(fixed, moving)
        assert res.backend["backend"] == "torch" and res.reuse["fixed_features"] == "computed"
        from pddnet.runtime.preprocess import prepare_fixed, prepare_moving

        pf = prepare_fixed(fixed, reg.info)
        pm = prepare_moving(moving, pf, reg.info)
        outs, ms = reg.run_model(pf.array, pm.array)
        assert ms > 0
    with torch.no_grad():
        want = setup["net"](torch.from_numpy(pf.array), torch.from_numpy(pm.array)).dense(SHAPE)
    np.testing.assert_array_equal(res.disp_model, want.numpy())
    np.testing.assert_array_equal(outs["disp"], want.numpy())


def test_torch_backend_follows_an_export_on_another_grid(setup, tmp_path):
    import onnx

    from pddnet.backends import create_backend
    from pddnet.export.onnx_export import export_model
    from pddnet.model.refine import network_for_config

    net = setup["net"]
    other = network_for_config(net, {**net.config.as_dict(), "grid": [4, 5, 4], "capture": 0.2})
    path = tmp_path / "grid.onnx"
    onnx.save(export_model(other, SHAPE, spacing_mm=(8.0, 8.0, 8.0)), str(path))
    rng = np.random.default_rng(6)
    f, m = (rng.uniform(-2, 3, (1, 1) + SHAPE).astype(np.float32) for _ in range(2))
    with create_backend("torch", path, checkpoint=setup["ckpt"]) as be:
        got = be.run({"fixed": f, "moving": m})
    with torch.no_grad():
        reg = other(torch.from_numpy(f), torch.from_numpy(m))
    assert got["grid_disp"].shape == (4, 5, 4, 3)
    np.testing.assert_array_equal(got["disp"], reg.dense(SHAPE).numpy())


def test_torch_backend_refuses_a_checkpoint_of_another_architecture(setup):
    from pddnet.backends import create_backend
    from pddnet.errors import PddnetError

    be = create_backend("torch", setup["wrong"], checkpoint=setup["ckpt"])
    with pytest.raises(PddnetError, match="another configuration.*channels"):
        be.activate()
    with pytest.raises(PddnetError, match="exactly one of checkpoint"):
        create_backend("torch", setup["onnx"])


def test_torch_backend_without_torch_names_the_extra(setup):
    script = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None
        from pddnet.errors import PddnetError
        from pddnet.backends import create_backend
        be = create_backend("torch", {str(setup['onnx'])!r}, checkpoint={str(setup['ckpt'])!r})
        try:
            be.activate()
        except PddnetError as exc:
            assert "pddnet[train]" in str(exc), exc
            print("REFUSED")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60)
    assert "REFUSED" in proc.stdout, proc.stdout + proc.stderr


# --------------------------------------------------------------------------------------------
# the comparator and its report
# --------------------------------------------------------------------------------------------
def test_report_fields_are_present_and_consistent(report, setup):
    from pddnet._files import jsonable

    assert report["schema"] == "pddnet.validation.report/1"
    assert report["status"] == "passed" and report["failed_gates"] == []
    assert report["reference"] == "pytorch"
    assert list(report["candidates"]) == ["pytorch", "onnxruntime-fp32"]
    st = report["settings"]
    assert st["pairs"] == 2 and st["split"] == "test" and st["repeats"] == 3
    assert st["isolated"] is False
    m = report["machine"]
    for key in ("cpu_model", "logical_cores", "threads", "onnxruntime", "torch", "load_average"):
        assert m[key] is not None, key
    assert len(report["pairs"]) == 2
    ref, ort = report["candidates"]["pytorch"], report["candidates"]["onnxruntime-fp32"]
    assert ref["reference"] and not ort["reference"] and ref["gates"] == []
    assert ref["describe"]["backend"] == "torch" and ort["describe"]["backend"] == "onnxruntime"
    for cand in (ref, ort):
        assert len(cand["pairs"]) == 2
        for rec in cand["pairs"]:
            for key in ("dice_mean", "hd95_mean", "sdlogj", "folding_percent", "model_ms"):
                assert rec[key] is not None and math.isfinite(rec[key]), key
            assert rec["dice_per_label"] and rec["hd95_per_label"]
        s = cand["summary"]
        assert s["dice_mean"] == pytest.approx(np.mean([r["dice_mean"] for r in cand["pairs"]]))
        assert set(s["dice_per_label"]) == {k for r in cand["pairs"] for k in r["dice_per_label"]}
        lat = cand["latency"]
        assert lat["n"] == 3 and len(lat["samples_ms"]) == 3 and lat["warmup"] == 1
        assert 0 < lat["min_ms"] <= lat["p50_ms"] <= lat["p95_ms"] <= lat["p99_ms"] <= lat["max_ms"]
        mem = cand["memory"]
        assert mem["peak_rss_mb"] > 0 and mem["peak_rss_mb"] >= mem["baseline_rss_mb"] > 0
        assert cand["model_sha256"] and len(cand["model_sha256"]) == 64
    assert ref["speedup_vs_reference"] == pytest.approx(1.0)
    assert ort["speedup_vs_reference"] == pytest.approx(
        ref["latency"]["p50_ms"] / ort["latency"]["p50_ms"])
    # the reference has no differences to itself; ORT FP32 is close to it
    assert all(r["disp_diff_max_vox"] is None for r in ref["pairs"])
    for r in ort["pairs"]:
        assert 0 <= r["disp_diff_mean_vox"] <= r["disp_diff_max_vox"] < 1e-3
        assert r["disp_diff_max_abs_component_vox"] <= r["disp_diff_max_vox"] + 1e-12
        assert abs(r["delta_dice_points"]) < 0.1
    assert ort["summary"]["disp_diff_max_vox"] == max(r["disp_diff_max_vox"] for r in ort["pairs"])
    gates = {g["metric"]: g for g in ort["gates"]}
    assert set(gates) == {"disp_diff_max_vox", "delta_dice_points"}
    assert gates["disp_diff_max_vox"]["threshold"] == 0.05
    assert gates["disp_diff_max_vox"]["measured"] == ort["summary"]["disp_diff_max_vox"]
    assert gates["delta_dice_points"]["threshold"] == 0.1
    assert all(g["passed"] for g in gates.values()) and ort["passed"]
    # the registration actually moved labels, so Dice differences are measurable
    assert any(r["dice_mean"] != r["dice_mean_before"] for r in ref["pairs"])
    assert not report["notes"]  # the ONNX model records this checkpoint as its source
    json.dumps(jsonable(report), allow_nan=False)


def test_gate_evaluation_rules():
    from pddnet.errors import PddnetError
    from pddnet.validation.compare import Gate

    g = Gate("disp_diff_max_vox", 0.05)
    ok = g.evaluate([{"pair": "a", "disp_diff_max_vox": 0.01},
                     {"pair": "b", "disp_diff_max_vox": 0.04}])
    assert ok["passed"] and ok["measured"] == 0.04 and ok["worst_pair"] == "b"
    bad = g.evaluate([{"pair": "a", "disp_diff_max_vox": 0.01},
                      {"pair": "b", "disp_diff_max_vox": 0.06}])
    assert not bad["passed"] and "worst pair b" in bad["reason"] and "1 of 2" in bad["reason"]
    d = Gate("delta_dice_points", 0.1)
    assert d.evaluate([{"pair": "a", "delta_dice_points": -0.2}])["measured"] == 0.2
    nan = d.evaluate([{"pair": "a", "delta_dice_points": float("nan")},
                      {"pair": "b", "delta_dice_points": 0.05}])
    assert nan["passed"] and nan["per_pair"] == [None, 0.05]
    assert not d.evaluate([{"pair": "a", "delta_dice_points": float("nan")}])["passed"]
    err = g.evaluate([{"pair": "a", "error": "boom"}, {"pair": "b", "disp_diff_max_vox": 0.0}])
    assert not err["passed"] and "failed on 1 pair" in err["reason"]
    with pytest.raises(PddnetError, match="unknown gate metric"):
        Gate("speed", 1.0)
    with pytest.raises(PddnetError, match="threshold"):
        Gate("disp_diff_max_vox", -1.0)


def test_a_candidate_that_breaks_is_recorded_and_fails_its_gates(setup):
    from pddnet.validation.compare import Candidate, Gate, compare, default_candidates

    ref, _ = default_candidates(setup["ckpt"], setup["onnx"])
    broken = Candidate("onnxruntime-nan", "onnxruntime", setup["nan"], "fp32", {},
                       (Gate("disp_diff_max_vox", 0.05),))
    rep = compare(ref, [broken], setup["data"], max_pairs=1, threads=1, warmup=0, repeats=1,
                  isolate=False, progress=False)
    cand = rep["candidates"]["onnxruntime-nan"]
    assert rep["status"] == "failed" and not cand["passed"]
    assert "finite" in cand["pairs"][0]["error"]
    assert cand["summary"]["failed_pairs"] == 1
    assert rep["failed_gates"][0]["candidate"] == "onnxruntime-nan"


# --------------------------------------------------------------------------------------------
# the command
# --------------------------------------------------------------------------------------------
def test_cli_validate_passes_writes_report_and_isolates_backends(setup, tmp_path):
    out = tmp_path / "report"
    res = _cli(_validate_args(setup, out))
    assert res.exit_code == 0, res.output
    assert "status: PASSED" in res.output and "onnxruntime-fp32" in res.output
    assert "PASS onnxruntime-fp32: max |delta disp|" in res.output
    rep = json.loads((out / "report.json").read_text())
    assert rep["status"] == "passed" and rep["settings"]["isolated"] is True
    ref, ort = rep["candidates"]["pytorch"], rep["candidates"]["onnxruntime-fp32"]
    assert ref["memory"]["isolated"] and ref["memory"]["torch_loaded"]
    assert not ort["memory"]["torch_loaded"]  # the ORT child never imported torch
    # the text says which implementation ran each part of the candidate
    assert "head of pytorch: torch (the C head serves the onnxruntime backend only)" in res.output
    d = ort["describe"]
    assert f"head of onnxruntime-fp32: {d['head']['implementation']}" in res.output
    if d["sampling"]["implementation"] == "native":
        conv = d["sampling"]["conv"]
        line = f"features' 3x3x3 convolution of onnxruntime-fp32: {conv['implementation']}"
        assert line in res.output, res.output
        if conv["implementation"] == "winograd":
            assert f"winograd ({conv['isa']}" in res.output
    assert sorted(p.name for p in out.iterdir()) == ["figures", "report.html", "report.json",
                                                     "report.md"]  # renderings: test_report_render
    # an existing report is refused before any work, and left untouched
    before = (out / "report.json").read_bytes()
    res = _cli(_validate_args(setup, out))
    assert res.exit_code == 2 and "already exists" in res.output
    assert (out / "report.json").read_bytes() == before


def test_cli_validate_fails_on_a_perturbed_model(setup, tmp_path):
    out = tmp_path / "report"
    res = _cli(_validate_args(setup, out, "--in-process", onnx_model=setup["perturbed"]))
    assert res.exit_code == 1, res.output
    assert "validation failed" in res.output and "onnxruntime-fp32" in res.output
    assert "max |delta disp| at full resolution" in res.output
    rep = json.loads((out / "report.json").read_text())
    assert rep["status"] == "failed"
    failed = {g["metric"] for g in rep["failed_gates"]}
    assert "disp_diff_max_vox" in failed
    assert rep["candidates"]["onnxruntime-fp32"]["summary"]["disp_diff_max_vox"] > 1.0


def test_cli_validate_tiny_threshold_fails_only_that_gate(setup, tmp_path):
    out = tmp_path / "report"
    res = _cli(_validate_args(setup, out, "--in-process", "--max-pairs", "1",
                              "--gate-disp", "1e-12", "--overwrite"))
    assert res.exit_code == 1, res.output
    rep = json.loads((out / "report.json").read_text())
    assert [g["metric"] for g in rep["failed_gates"]] == ["disp_diff_max_vox"]
    assert rep["failed_gates"][0]["threshold"] == 1e-12
    assert rep["settings"]["pairs"] == 1
    assert "FAIL onnxruntime-fp32: max |delta disp|" in res.output
    assert "PASS onnxruntime-fp32: |delta mean Dice|" in res.output


def test_cli_validate_errors_leave_no_output(setup, tmp_path):
    # a model of another architecture: refused (exit 2), nothing written
    out = tmp_path / "wrong"
    res = _cli(_validate_args(setup, out, "--in-process", onnx_model=setup["wrong"]))
    assert res.exit_code == 2 and "another configuration" in res.output
    assert not out.exists()
    # a dataset without label maps: refused before any work
    data = tmp_path / "nolabels"
    import shutil

    shutil.copytree(setup["data"], data)
    for p in (data / "labelsTr").iterdir():
        p.unlink()
    (data / "labelsTr").rmdir()
    doc = json.loads(next(data.glob("*_dataset.json")).read_text())
    for e in doc["training"]:
        e.pop("label", None)
    next(data.glob("*_dataset.json")).write_text(json.dumps(doc))
    out = tmp_path / "nolab"
    args = _validate_args(setup, out, "--in-process")
    args[args.index("--data") + 1] = str(data)
    res = _cli(args)
    assert res.exit_code == 2 and "no label maps" in res.output
    assert not out.exists()


def test_cli_validate_help():
    res = _cli(["validate", "--help"])
    assert res.exit_code == 0 and "--gate-disp" in res.output and "--onnx" in res.output
