"""Deployment bundles: the round trip (package -> verify -> select -> register gives exactly the
plain model's result, folder and .tar.gz, torch-free), the manifest, selection of backend and
precision with its reasons, engines matched to their graph, and packaging refusals.

The refusals of the issue's reliability list (tampered/truncated files, paths outside the
bundle, foreign engines, bad inputs, existing outputs, Ctrl-C) are in tests/cli/test_refusals.py.

Not tested here: real TensorRT engines (no GPU here: engines are random bytes with real
metadata records, and TensorRT's own identity check is exercised with an injected GPU
environment); real FP16/INT8 graphs (the fake ones are float32 graphs whose metadata names
the precision -- packaging and selection read the metadata).
"""

import json
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from helpers.deploy_helpers import (
    SHAPE,
    build_bundle,
    candidate,
    environment,
    fake_engines,
    precision_model,
    sha256,
    write_report,
)
from helpers.fake_models import ct_like, grid_affine, save_volume
from pddnet.errors import PddnetError
from pddnet.runtime.bundle import open_bundle
from pddnet.runtime.session import Registrar

AFF = grid_affine(4.0)


@pytest.fixture(scope="module")
def scans(tmp_path_factory):
    d = tmp_path_factory.mktemp("scans")
    rng = np.random.default_rng(3)
    lab = rng.integers(0, 4, SHAPE).astype(np.uint8)
    return {"fixed": save_volume(d / "f.nii.gz", ct_like(rng, SHAPE), AFF),
            "moving": save_volume(d / "m.nii.gz", ct_like(rng, SHAPE), AFF),
            "fl": save_volume(d / "fl.nii.gz", lab, AFF),
            "ml": save_volume(d / "ml.nii.gz", np.roll(lab, 2, 0), AFF)}


def _cli(*args):
    from pddnet.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


# --------------------------------------------------------------------------------------------
# round trip
# --------------------------------------------------------------------------------------------
def test_round_trip_folder_and_tar_equal_the_plain_model(tmp_path, scans):
    res, models = build_bundle(tmp_path, tar=True)
    bundle, tar = res.bundle, res.tar
    names = sorted(p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file())
    assert names == ["manifest.json", "models/fp32/model.fp32.onnx", "preprocessing.json",
                     "validation/report.json"]
    m = json.loads((bundle / "manifest.json").read_text())
    assert m["schema"] == "pddnet.bundle/1" and set(m["files"]) == set(names) - {"manifest.json"}
    assert m["files"]["models/fp32/model.fp32.onnx"]["sha256"] == sha256(models["fp32"])
    assert m["versions"]["pddnet"] and m["versions"]["onnxruntime"]
    entry = m["models"][0]
    assert entry["validation"]["passed"] and entry["validation"]["candidates"][0]["latency"]["p50_ms"] == 100.0
    assert m["preprocessing"]["image_shape"] == list(SHAPE)
    assert json.loads((bundle / "preprocessing.json").read_text()) == m["preprocessing"]
    with tarfile.open(tar) as tf:
        assert sorted(tf.getnames()) == sorted(f"bundle/{n}" for n in names)

    def run(model):
        with Registrar(model, threads=1) as reg:
            return reg, reg.register(scans["fixed"], scans["moving"], scans["ml"], scans["fl"])

    _, plain = run(models["fp32"])
    for src in (bundle, tar):
        reg, got = run(src)
        np.testing.assert_array_equal(got.disp, plain.disp)
        assert got.metrics["dice_mean"] == plain.metrics["dice_mean"]
        assert reg.selection.backend == "onnxruntime" and reg.selection.precision == "fp32"
        assert got.notes[0].startswith(f"bundle {src}: onnxruntime fp32")
        assert got.backend["bundle"]["model_id"] == "fp32"
    # the unpacked copy of the archive is gone once the Registrar is closed
    assert not reg.bundle.root.exists()


def test_register_cli_with_a_bundle(tmp_path, scans):
    res, _ = build_bundle(tmp_path)
    r = _cli("register", "--model", res.bundle, "--fixed", scans["fixed"], "--moving",
             scans["moving"], "--out", tmp_path / "out", "--threads", 1)
    assert r.exit_code == 0, r.output
    assert "every file verified" in r.output and "selected: onnxruntime fp32" in r.output
    s = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert s["backend"]["bundle"]["precision"] == "fp32"
    r = _cli("verify", res.bundle)
    assert r.exit_code == 0 and "3 files verified" in r.output and "validation PASSED" in r.output
    r = _cli("verify", res.bundle, "--json")
    assert json.loads(r.output)["selection"]["model_id"] == "fp32"


def test_bundle_runs_without_torch(tmp_path, scans):
    res, _ = build_bundle(tmp_path, tar=True)
    script = textwrap.dedent("""
        import sys
        sys.modules["torch"] = None
        from pddnet.runtime.session import Registrar
        from pddnet.cli import main
        bundle, fixed, moving, out = sys.argv[1:5]
        with Registrar(bundle, threads=1) as reg:
            reg.register(fixed, moving)
        try:
            main(["verify", bundle], standalone_mode=False)
            main(["register", "--model", bundle, "--fixed", fixed, "--moving", moving,
                  "--out", out], standalone_mode=False)
        except SystemExit as exc:
            assert not exc.code, exc.code
        leaked = [m for m in sys.modules if m.startswith("torch.") or m.startswith("pddnet.model")]
        assert not leaked, leaked
        print("TORCH-FREE BUNDLE OK")
    """)
    src = Path(__file__).resolve().parents[2] / "src"
    proc = subprocess.run([sys.executable, "-c", script, str(res.tar), str(scans["fixed"]),
                           str(scans["moving"]), str(tmp_path / "out")], capture_output=True,
                          text=True, timeout=120, env={"PYTHONPATH": str(src), "PATH": ""})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "TORCH-FREE BUNDLE OK" in proc.stdout


# --------------------------------------------------------------------------------------------
# selection
# --------------------------------------------------------------------------------------------
def test_cpu_picks_the_fastest_validated_model(tmp_path):
    res, _ = build_bundle(tmp_path, ("fp32", "fp16", "int8"),
                          p50={"fp32": 900.0, "fp16": 1200.0, "int8": 500.0})
    with open_bundle(res.bundle) as b:
        sel = b.select()
        assert (sel.backend, sel.precision) == ("onnxruntime", "int8")
        assert "fastest validated" in sel.reason and "p50 500 ms" in sel.reason
        assert "fp32 900 ms" in sel.reason and "fp16 1200 ms" in sel.reason
        assert sel.model.name == "model.int8.onnx" and sel.model.is_file()
        asked = b.select(precision="fp16")
        assert asked.precision == "fp16" and not asked.notes
        assert asked.reason.startswith("fp16 as asked for; ONNX Runtime") and "validated" in asked.reason
        with pytest.raises(PddnetError, match="holds no tensorrt"):
            b.select("tensorrt")
        with pytest.raises(PddnetError, match="no PyTorch checkpoint"):
            b.select("torch")


def test_unvalidated_and_failed_models_run_only_when_asked(tmp_path):
    with pytest.raises(PddnetError, match="int8.*not validated.*gates failed.*--allow-unvalidated"):
        build_bundle(tmp_path / "a", ("fp32", "int8"), passed={"int8": False})
    res, _ = build_bundle(tmp_path / "b", ("fp32", "int8"), passed={"int8": False},
                          p50={"int8": 10.0}, allow_unvalidated=True)
    assert any("bundled unvalidated" in n for n in res.notes)
    with open_bundle(res.bundle) as b:
        assert b.select().precision == "fp32"   # int8 is faster but failed its gates
        sel = b.select(precision="int8")
        assert sel.precision == "int8" and "did not pass validation" in sel.notes[0]
        assert "validation FAILED" in b.summary()


def test_tensorrt_engines_for_this_gpu_are_preferred(tmp_path):
    env = environment()
    res, models = build_bundle(tmp_path, ("fp32", "fp16"), engines_env=env)
    m = res.manifest
    trt = [e for e in m["models"] if e["kind"] == "tensorrt"]
    assert sorted(e["precision"] for e in trt) == ["fp16", "fp32"]
    for e in trt:
        assert set(e["engines"]) == {"features", "head"} and e["full"].endswith(".engine")
        assert e["env"]["gpu_name"] == env.gpu_name and e["validation"]["passed"]
        for rel in list(e["engines"].values()) + [e["full"]]:
            assert rel in m["files"] and rel[:-len(".engine")] + ".json" in m["files"]
    with open_bundle(res.bundle) as b:
        sel = b.select(env=env)
        assert (sel.backend, sel.precision) == ("tensorrt", "fp16")
        assert "match this machine" in sel.reason and "lowest validated precision" in sel.reason
        assert sel.backend_options["build"] == "never"
        assert Path(sel.backend_options["engine_cache"]) == b.root / "engines"
        assert sel.model.name == "model.fp16.onnx"
        # no TensorRT here: ONNX Runtime, and the engines say why they were not used
        cpu = b.select(env=None)
        assert cpu.backend == "onnxruntime"
        assert "TensorRT is not usable here" in cpu.describe()


def test_engine_packaging_checks(tmp_path):
    env = environment()
    fp32 = precision_model(tmp_path / "m.onnx")
    other = precision_model(tmp_path / "other.onnx", seed=5, gain=0.1)
    report = write_report(tmp_path / "rep", [candidate("onnxruntime-fp32", fp32, "fp32")])
    from pddnet.deploy.package import package

    def pack(engines, out):
        return package(fp32, report_dir=report, engines=engines, out=tmp_path / out,
                       allow_unvalidated=True, echo=lambda s: None)

    fake_engines(other, tmp_path / "e_other", env)
    with pytest.raises(PddnetError, match="built from a model that is none of the bundled"):
        pack([tmp_path / "e_other"], "b1")
    fake_engines(fp32, tmp_path / "e_half", env, labels=("features",))
    with pytest.raises(PddnetError, match=r"lack the part\(s\) \['head'\]"):
        pack([tmp_path / "e_half"], "b2")
    eng = fake_engines(fp32, tmp_path / "e_bad", env)
    eng[0].write_bytes(eng[0].read_bytes()[:10])
    with pytest.raises(PddnetError, match="does not match the SHA-256 recorded"):
        pack([tmp_path / "e_bad"], "b3")
    eng = fake_engines(fp32, tmp_path / "e_nometa", env)
    eng[0].with_suffix(".json").unlink()
    with pytest.raises(PddnetError, match="no readable metadata"):
        pack([eng[0]], "b4")
    for out in ("b1", "b2", "b3", "b4"):
        assert not (tmp_path / out).exists()
    # without TensorRT validation the engines are bundled only as unvalidated
    fake_engines(fp32, tmp_path / "e_ok", env)
    with pytest.raises(PddnetError, match="TensorRT engines.*not validated"):
        package(fp32, report_dir=report, engines=[tmp_path / "e_ok"], out=tmp_path / "b5",
                echo=lambda s: None)
    res = pack([tmp_path / "e_ok"], "b6")
    assert [e["kind"] for e in res.manifest["models"]] == ["onnx", "tensorrt"]


# --------------------------------------------------------------------------------------------
# packaging refusals (other than the reliability list)
# --------------------------------------------------------------------------------------------
def test_package_refusals(tmp_path):
    from pddnet.deploy.package import package

    fp32 = precision_model(tmp_path / "m.onnx")
    fp16 = precision_model(tmp_path / "m16.onnx", "fp16", seed=2)
    small = precision_model(tmp_path / "m8.onnx", "int8", seed=3, spacing_mm=(3.0, 3.0, 3.0))
    report = write_report(tmp_path / "rep", [candidate("onnxruntime-fp32", fp32, "fp32")])
    cases = [
        (dict(onnx_model=fp16), "--onnx .*this is a fp16 graph"),
        (dict(onnx_model=fp32, fp16=fp32), "--fp16 .*this is a fp32 graph"),
        (dict(onnx_model=fp32, int8=small), r"input contract differs .*spacing_mm"),
        (dict(onnx_model=fp32, report_dir=tmp_path / "nowhere"), "no report.json there"),
        (dict(onnx_model=fp32, fp16=fp16), r"m16.onnx \(fp16\): not validated \(no candidate"),
        (dict(onnx_model=fp32, out=None), "nothing to write"),
    ]
    for kw, needle in cases:
        args = {"report_dir": report, "out": tmp_path / "b", **kw}
        with pytest.raises(PddnetError, match=needle):
            package(args.pop("onnx_model"), echo=lambda s: None, **args)
        assert not (tmp_path / "b").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_package_cli(tmp_path):
    fp32 = precision_model(tmp_path / "m.onnx")
    report = write_report(tmp_path / "rep", [candidate("onnxruntime-fp32", fp32, "fp32")])
    r = _cli("package", "--onnx", fp32, "--report", report, "--out", tmp_path / "b.tar.gz",
             "--triton", tmp_path / "tri")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "b.tar.gz").is_file() and not (tmp_path / "b").exists()
    assert (tmp_path / "tri" / "pddnet_fp32" / "config.pbtxt").is_file()
    with open_bundle(tmp_path / "b.tar.gz") as b:
        assert b.manifest["name"] == "b"


def test_emulated_fp16_candidate_is_evidence_for_the_fp16_graph(tmp_path):
    """`pddnet validate --fp16` also runs `onnxruntime-fp16-emulated` (a temporary graph with
    float16 storage emulated): it counts for the FP16 graph, and its latency does not."""
    from pddnet.deploy.package import package

    fp32 = precision_model(tmp_path / "m.onnx")
    fp16 = precision_model(tmp_path / "m16.onnx", "fp16", seed=2)

    def report(emulated_passed, name):
        emu = candidate("onnxruntime-fp16-emulated", None, "fp16", passed=emulated_passed,
                        p50=5000.0)
        return write_report(tmp_path / name, [candidate("onnxruntime-fp32", fp32, "fp32", p50=900.0),
                                              candidate("onnxruntime-fp16", fp16, "fp16", p50=700.0),
                                              emu])

    with pytest.raises(PddnetError, match=r"m16.onnx \(fp16\): not validated .*"
                                          r"onnxruntime-fp16-emulated: \|ΔDice\| 3 > 0.5 points"):
        package(fp32, fp16=fp16, report_dir=report(False, "r1"), out=tmp_path / "b1",
                echo=lambda s: None)
    res = package(fp32, fp16=fp16, report_dir=report(True, "r2"), out=tmp_path / "b2",
                  echo=lambda s: None)
    entry = next(m for m in res.manifest["models"] if m["id"] == "fp16")
    assert [c["name"] for c in entry["validation"]["candidates"]] == [
        "onnxruntime-fp16", "onnxruntime-fp16-emulated"]
    assert entry["validation"]["candidates"][1]["emulated"]
    with open_bundle(res.bundle) as b:
        sel = b.select()
        assert sel.precision == "fp16" and "p50 700 ms" in sel.reason
