"""`pddnet check-trt`, `pddnet build`, `pddnet doctor`, `--backend trt` without TensorRT, and the
doctor's reasoning on fake machines.

Checked: every command's --help; the readiness report of a model (text, JSON, --strict exit
status); build and register --backend trt stop with exit status 2 and one line naming the pip
extra and the TensorRT requirement, writing nothing; the doctor on this machine (runs, JSON
parses, names the extra) and on fake machines: a full H100 box, TensorRT 10.8 (no AOT plugins),
no torch CUDA (no JIT plugins), both onnxruntime wheels installed.

Not tested here: the doctor on a real GPU machine.
"""

from __future__ import annotations

import json
import sys
import types

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

from helpers.fake_models import ct_like, grid_affine, make_model, save_model, save_volume
from pddnet.backends.doctor import Probe, as_json, collect, format_report
from pddnet.cli import main


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.mark.parametrize("cmd", ["check-trt", "build", "doctor"])
def test_help(cmd):
    r = _run(cmd, "--help")
    assert r.exit_code == 0 and "Usage" in r.output


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    return save_model(make_model((24, 21, 30)), tmp_path_factory.mktemp("m") / "model.onnx")


def test_check_trt_on_a_model(model_file):
    r = _run("check-trt", model_file, "--strict")
    assert r.exit_code == 0, r.output
    assert "FakeObelisk" in r.output and "importable" in r.output
    r = _run("check-trt", model_file, "--json")
    rep = json.loads(r.output)
    assert rep["findings"] == [] and "FakeObelisk" in rep["custom_ops"]


def test_check_trt_strict_fails_for_5d_gridsample(tmp_path):
    F = TensorProto.FLOAT
    g = helper.make_graph([helper.make_node("GridSample", ["i", "g"], ["o"], name="warp")], "g",
                          [helper.make_tensor_value_info("i", F, [1, 1, 4, 4, 4]),
                           helper.make_tensor_value_info("g", F, [1, 4, 4, 4, 3])],
                          [helper.make_tensor_value_info("o", F, [1, 1, 4, 4, 4])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 20)])
    path = tmp_path / "warp.onnx"
    onnx.save(m, path)
    r = _run("check-trt", path, "--strict")
    assert r.exit_code == 1 and "warp" in r.output and "11.2" in r.output
    assert _run("check-trt", path).exit_code == 0
    bad = tmp_path / "bad.onnx"
    bad.write_text("not onnx")
    r = _run("check-trt", bad)
    assert r.exit_code == 2 and "not a readable ONNX model" in r.output


def test_build_without_tensorrt_names_the_extra(model_file, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    r = _run("build", "--onnx", model_file, "--out", tmp_path / "eng")
    assert r.exit_code == 2
    assert "pip install 'pddnet[gpu]'" in r.output and "TensorRT >= 10.9" in r.output
    assert "Traceback" not in r.output and not (tmp_path / "eng").exists()


def test_register_backend_trt_without_tensorrt(model_file, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    rng = np.random.default_rng(0)
    aff = grid_affine(4.0)
    fixed = save_volume(tmp_path / "f.nii.gz", ct_like(rng, (24, 21, 30)), aff)
    moving = save_volume(tmp_path / "m.nii.gz", ct_like(rng, (24, 21, 30)), aff)
    out = tmp_path / "out"
    r = _run("register", "--model", model_file, "--fixed", fixed, "--moving", moving, "--out",
             out, "--backend", "trt")
    assert r.exit_code == 2, r.output
    assert "pddnet[gpu]" in r.output and "Traceback" not in r.output
    assert not out.exists() or not any(out.iterdir())


def test_doctor_here():
    r = _run("doctor")
    assert r.exit_code == 0, r.output
    assert "backends:" in r.output and "onnxruntime (cpu)" in r.output
    r = _run("doctor", "--json")
    rep = json.loads(r.output)
    names = [b["name"] for b in rep["backends"]]
    assert "tensorrt (--backend trt)" in names
    trt = next(b for b in rep["backends"] if b["name"].startswith("tensorrt"))
    if not trt["ok"]:
        assert "pddnet[gpu]" in trt["detail"] or "GPU" in trt["detail"]


class FakeProbe(Probe):
    def __init__(self, mods, *, gpu=True, torch_cuda=True, wheels=None):
        self.mods = mods
        self.has_gpu = gpu
        self.cuda = torch_cuda
        self.wheels = wheels or {"onnxruntime-gpu": "1.22.0"}

    def module(self, name):
        if name in self.mods:
            return self.mods[name]
        if name in ("numpy", "onnx", "nibabel", "scipy"):
            return __import__(name)
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)

    def dist_version(self, dist):
        return self.wheels.get(dist)

    def gpu(self):
        if not self.has_gpu:
            raise RuntimeError("no CUDA device")
        return {"gpu_name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0",
                "sm_count": 132, "total_memory_mb": 81559}

    def torch_cuda(self, torch):
        return self.cuda


def _mods(trt_version="10.9.0.34", aot=True, torch=True, triton=True):
    ort = types.SimpleNamespace(__version__="1.22.0", get_available_providers=lambda: [
        "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    mods = {"onnxruntime": ort, "cuda.bindings.runtime": types.SimpleNamespace()}
    if trt_version:
        mods["tensorrt"] = types.SimpleNamespace(__version__=trt_version)
        plugin = types.SimpleNamespace(register=1, impl=1)
        if aot:
            plugin.aot_impl = 1
        mods["tensorrt.plugin"] = plugin
    if torch:
        mods["torch"] = types.SimpleNamespace(__version__="2.13.0+cu128")
    if triton:
        mods["triton"] = types.SimpleNamespace(__version__="3.9.0")
    return mods


def _items(rep, key):
    return {i.name.split(" ")[0]: i for i in rep[key]}


def test_doctor_full_gpu_machine():
    rep = collect(FakeProbe(_mods()))
    b = {i.name: i for i in rep["backends"]}
    assert b["tensorrt (--backend trt)"].ok
    assert b["tensorrt (--backend trt)"].extra["precisions"] == ["fp32", "fp16", "int8"]
    assert b["onnxruntime (cuda)"].ok and b["onnxruntime (tensorrt)"].ok
    paths = _items(rep, "plugin_paths")
    assert all(p.ok for p in paths.values())
    text = format_report(rep)
    assert "H100" in text and "[ok] aot" in text
    json.dumps(as_json(rep))


def test_doctor_trt_10_8_has_no_aot_and_no_torch_cuda_no_jit():
    rep = collect(FakeProbe(_mods(trt_version="10.8.0.43", aot=False), torch_cuda=False))
    paths = _items(rep, "plugin_paths")
    assert paths["native"].ok
    assert not paths["aot"].ok and "10.9" in paths["aot"].detail
    assert not paths["jit"].ok and "torch with CUDA" in paths["jit"].detail


def test_doctor_without_gpu_or_tensorrt_and_two_ort_wheels():
    rep = collect(FakeProbe(_mods(trt_version=None, torch=False, triton=False), gpu=False,
                            wheels={"onnxruntime": "1.22.0", "onnxruntime-gpu": "1.22.0"}))
    b = {i.name: i for i in rep["backends"]}
    trt = b["tensorrt (--backend trt)"]
    assert not trt.ok and "pddnet[gpu]" in trt.detail and "GPU" in trt.detail
    assert not b["onnxruntime (cuda)"].ok and "no GPU" in b["onnxruntime (cuda)"].detail
    assert not b["torch (reference)"].ok and "pddnet[train]" in b["torch (reference)"].detail
    assert any("both onnxruntime and onnxruntime-gpu" in p for p in rep["problems"])
    assert not _items(rep, "plugin_paths")["interpreter"].ok
