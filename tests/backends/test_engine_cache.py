"""Engine cache keys and the stale / foreign / corrupt decisions (pddnet.backends.trt.cache).

Pure Python: fake engine bytes and environments. Checked: the key changes with every field it
is made of (model hash, GPU name, compute capability, SM count, TensorRT version, precision,
plugin binding, hardware compatibility); a stored engine is found again and verified; another
model / precision / plugin binding is stale, another GPU or TensorRT version foreign, a
missing or unreadable metadata file, a truncated or edited engine file corrupt -- and only a
match is usable; hardware-compatible (Ampere+) engines ignore the GPU model but not the
TensorRT version; an explicit engine file is refused with a message naming the difference;
the precision of an ONNX graph is read from its metadata or its nodes; workspace sizes parse.

Not tested here: that TensorRT itself refuses a foreign engine (needs two GPUs/versions).
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from pddnet.backends.trt.binding import BindingPlan
from pddnet.backends.trt.build import model_precision, parse_size, plugins_label
from pddnet.backends.trt.cache import (
    EngineCache,
    EngineKey,
    Environment,
    check_engine_file,
    compare,
    default_cache_dir,
    meta_path_for,
)
from pddnet.errors import PddnetError

H100 = Environment("NVIDIA H100 80GB HBM3", "9.0", 132, "10.9.0.34")
A100 = Environment("NVIDIA A100-SXM4-80GB", "8.0", 108, "10.9.0.34")
ENGINE = b"\x00fake-serialized-engine" * 100


def key(**over):
    base = dict(model_sha256="a" * 64, precision="fp16", plugins="aot:Correlation,MinConv",
                env=H100, hardware_compat="none")
    base.update(over)
    return EngineKey(**base)


@pytest.mark.parametrize("change", [
    dict(model_sha256="b" * 64), dict(precision="int8"), dict(plugins="native"),
    dict(hardware_compat="ampere_plus"),
    dict(env=dataclasses.replace(H100, gpu_name="NVIDIA H100 PCIe")),
    dict(env=dataclasses.replace(H100, compute_capability="9.1")),
    dict(env=dataclasses.replace(H100, sm_count=114)),
    dict(env=dataclasses.replace(H100, trt_version="10.13.0.35")),
])
def test_every_field_changes_the_key(change):
    assert key().digest() == key().digest()
    assert key(**change).digest() != key().digest()


def test_bad_precision_rejected():
    with pytest.raises(PddnetError, match="precision"):
        key(precision="bf16")


def test_store_and_find_again(tmp_path):
    cache = EngineCache(tmp_path)
    assert cache.lookup(key(), "head").verdict.status == "missing"
    engine, meta = cache.store(key(), "head", ENGINE, extra={"io": []})
    assert engine.read_bytes() == ENGINE and meta == meta_path_for(engine)
    found = cache.lookup(key(), "head")
    assert found.verdict.usable and found.record["label"] == "head"
    rec = json.loads(meta.read_text())
    assert rec["key"]["precision"] == "fp16" and rec["env"]["sm_count"] == 132
    # another label is another entry
    assert cache.lookup(key(), "features").verdict.status == "missing"


def test_stale_and_foreign_entries_are_reported_not_used(tmp_path):
    cache = EngineCache(tmp_path)
    cache.store(key(), "head", ENGINE)
    new_model = key(model_sha256="c" * 64)
    found = cache.lookup(new_model, "head")
    assert found.verdict.status == "missing"
    assert [v.status for _, v in found.others] == ["stale"]
    assert "another model" in found.others[0][1].message()
    other_gpu = key(env=A100)
    found = cache.lookup(other_gpu, "head")
    assert [v.status for _, v in found.others] == ["foreign"]
    assert "A100" in found.explain() or "H100" in found.explain()


@pytest.mark.parametrize("change,status,text", [
    (dict(model_sha256="d" * 64), "stale", "another model"),
    (dict(precision="fp32"), "stale", "precision"),
    (dict(plugins="native"), "stale", "plugin binding"),
    (dict(env=A100), "foreign", "gpu name"),
    (dict(env=dataclasses.replace(H100, trt_version="11.2.0.1")), "foreign", "trt version"),
])
def test_compare_classifies(tmp_path, change, status, text):
    cache = EngineCache(tmp_path)
    engine, meta = cache.store(key(), "head", ENGINE)
    rec = json.loads(meta.read_text())
    v = compare(rec, key(**change), engine_path=engine)
    assert v.status == status and not v.usable and text in v.message()


def test_corrupt_cases(tmp_path):
    cache = EngineCache(tmp_path)
    engine, meta = cache.store(key(), "head", ENGINE)
    rec = json.loads(meta.read_text())
    assert compare(None, key()).status == "corrupt"
    assert compare({**rec, "format": 99}, key()).status == "corrupt"
    engine.write_bytes(ENGINE[:-10])  # truncated copy
    assert cache.lookup(key(), "head").verdict.status == "corrupt"
    engine.unlink()
    assert "missing" in cache.lookup(key(), "head").verdict.message()
    meta.write_text("{not json")
    assert cache.lookup(key(), "head").verdict.status == "corrupt"


def test_hardware_compatible_engine_ignores_gpu_model_not_trt(tmp_path):
    cache = EngineCache(tmp_path)
    k = key(hardware_compat="ampere_plus")
    engine, meta = cache.store(k, "head", ENGINE)
    rec = json.loads(meta.read_text())
    assert compare(rec, key(hardware_compat="ampere_plus", env=A100),
                   engine_path=engine).usable
    turing = Environment("Tesla T4", "7.5", 40, H100.trt_version)
    assert compare(rec, key(hardware_compat="ampere_plus", env=turing)).status == "foreign"
    newer = dataclasses.replace(A100, trt_version="10.13.0.35")
    assert compare(rec, key(hardware_compat="ampere_plus", env=newer)).status == "foreign"


def test_explicit_engine_file_refused_with_reason(tmp_path):
    engine, _ = EngineCache(tmp_path).store(key(), "head", ENGINE)
    assert check_engine_file(engine, key())["digest"] == key().digest()
    with pytest.raises(PddnetError, match="refusing to run.*foreign.*pddnet build"):
        check_engine_file(engine, key(env=A100))
    lone = tmp_path / "lone.engine"
    lone.write_bytes(ENGINE)
    with pytest.raises(PddnetError, match="no metadata"):
        check_engine_file(lone, key())


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("PDDNET_ENGINE_CACHE", str(tmp_path / "e"))
    assert default_cache_dir() == tmp_path / "e"
    monkeypatch.delenv("PDDNET_ENGINE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "pddnet" / "engines"


def _model(nodes, inits=(), meta=None):
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
                          initializer=list(inits))
    m = helper.make_model(g)
    if meta is not None:
        helper.set_model_props(m, {"pddnet.precision": json.dumps(meta)})
    return m


def test_model_precision():
    ident = [helper.make_node("Identity", ["x"], ["y"])]
    assert model_precision(_model(ident)) == "fp32"
    assert model_precision(_model(ident, meta={"mode": "int8"})) == "int8"
    cast = [helper.make_node("Cast", ["x"], ["h"], to=TensorProto.FLOAT16),
            helper.make_node("Cast", ["h"], ["y"], to=TensorProto.FLOAT)]
    assert model_precision(_model(cast)) == "fp16"
    sc = numpy_helper.from_array(np.array(0.1, np.float32), "s")
    qdq = [helper.make_node("QuantizeLinear", ["x", "s"], ["q"]),
           helper.make_node("DequantizeLinear", ["q", "s"], ["y"])]
    assert model_precision(_model(qdq, [sc])) == "int8"


def test_parse_size_and_plugins_label():
    assert parse_size("4G") == 4 << 30 and parse_size("512M") == 512 << 20
    assert parse_size("1024") == 1024 and parse_size(None) is None and parse_size("2GiB") == 2 << 30
    with pytest.raises(PddnetError):
        parse_size("lots")
    with pytest.raises(PddnetError):
        parse_size("0")
    assert plugins_label(BindingPlan("auto", ("MinConv", "Correlation"), True)) == \
        "aot:Correlation,MinConv"
    assert plugins_label(BindingPlan("native", (), False)) == "native"
    assert plugins_label(BindingPlan("none", None, False)) == "none"
