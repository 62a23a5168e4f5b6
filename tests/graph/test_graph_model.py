"""Model loading (file checks, external data, pddnet metadata) and graph splitting.

Not tested here: models written by the real exporter (`pddnet export`; these tests build
contract-conforming fakes with onnx.helper, see tests/helpers/fake_models.py), pre/post-processing and the
session (tests/runtime/test_runtime_session.py).
"""

import json

import numpy as np
import onnx
import pytest

from helpers.fake_models import make_model, save_model
from pddnet.backends import create_backend
from pddnet.errors import PddnetError
from pddnet.graph.model import load_model, parse_model_bytes
from pddnet.graph.split import split_model
from pddnet.spec import contract as C
from pddnet.spec.contract import FEATURES_INPUT, FEATURES_OUTPUT, META_PART

SHAPE = (24, 21, 30)


def test_load_parses_metadata(tmp_path):
    p = save_model(make_model(SHAPE, spacing_mm=(4.0, 4.5, 5.0), num_labels=13), tmp_path / "m.onnx")
    lm = load_model(p)
    info = lm.info
    assert info.image_shape == SHAPE and info.spacing_mm == (4.0, 4.5, 5.0)
    # the fake metadata has no "mode" (written before modes existed): it reads as ct
    assert info.intensity == {"mode": "ct", "lower": -1000.0, "upper": 1500.0, "scale": 500.0}
    assert info.outputs == ("disp", "grid_disp", "probs", "entropy")
    assert info.precision == {"mode": "fp32"} and info.num_labels == 13
    assert info.config["channels"] == 4 and len(info.sha256) == 64
    assert info.as_dict()["image_shape"] == list(SHAPE)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(PddnetError, match="no such model file"):
        load_model(tmp_path / "nope.onnx")
    with pytest.raises(PddnetError, match="is a folder"):
        load_model(tmp_path)


def test_not_onnx(tmp_path):
    p = tmp_path / "notes.onnx"
    p.write_text("this is a text file, not a model\n" * 10)
    with pytest.raises(PddnetError, match=r"notes\.onnx: not (a readable |an )ONNX model"):
        load_model(p)
    q = tmp_path / "random.onnx"
    q.write_bytes(np.random.default_rng(5).bytes(4096))
    with pytest.raises(PddnetError, match="ONNX model"):
        load_model(q)


@pytest.mark.parametrize("fraction", [0.3, 0.6, 0.9, 0.99])
def test_truncated(tmp_path, fraction):
    data = make_model(SHAPE).SerializeToString()
    p = tmp_path / "cut.onnx"
    p.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(PddnetError, match="truncated|not written by `pddnet export`"):
        load_model(p)


def test_missing_metadata(tmp_path):
    p = save_model(make_model(SHAPE, metadata=False), tmp_path / "plain.onnx")
    with pytest.raises(PddnetError, match="not written by `pddnet export`"):
        load_model(p)


def test_missing_local_function_is_refused():
    m = make_model(SHAPE)
    del m.functions[:]
    with pytest.raises(PddnetError, match="defines no local function"):
        parse_model_bytes(m.SerializeToString())


def test_metadata_contradicting_graph(tmp_path):
    m = make_model(SHAPE, extra_input_meta={"image_shape": [24, 21, 33]})
    with pytest.raises(PddnetError, match="metadata says image_shape"):
        load_model(save_model(m, tmp_path / "m.onnx"))


def _save_external(tmp_path):
    folder = tmp_path / "bundle"
    folder.mkdir()
    p = folder / "m.onnx"
    onnx.save_model(make_model(SHAPE, gain=0.2), str(p), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="m.data", size_threshold=0)
    return p


def test_external_data_inside_folder_loads_and_runs(tmp_path):
    p = _save_external(tmp_path)
    lm = load_model(p)
    rng = np.random.default_rng(21)
    x = {n: rng.normal(size=(1, 1) + SHAPE).astype(np.float32) for n in ("fixed", "moving")}
    with create_backend("onnxruntime", lm.proto) as be:
        assert np.isfinite(be.run(x)["disp"]).all()


@pytest.mark.parametrize("location", ["../secret.bin", "ABS", "sub/../../secret.bin"])
def test_external_data_escaping_the_folder_is_refused(tmp_path, location):
    p = _save_external(tmp_path)
    secret = tmp_path / "secret.bin"
    secret.write_bytes((p.parent / "m.data").read_bytes())
    loc = str(secret) if location == "ABS" else location
    proto = onnx.load(str(p), load_external_data=False)
    for t in proto.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = loc
    p.write_bytes(proto.SerializeToString())
    with pytest.raises(PddnetError, match="outside the model's folder"):
        load_model(p)


def test_external_data_missing_file(tmp_path):
    p = _save_external(tmp_path)
    (p.parent / "m.data").unlink()
    with pytest.raises(PddnetError, match="missing"):
        load_model(p)


# --------------------------------------------------------------------------------------------
# splitting
# --------------------------------------------------------------------------------------------
def _run(model, feeds):
    with create_backend("onnxruntime", model) as be:
        return be.run(feeds)


@pytest.mark.parametrize("seed", [0, 1])
def test_split_equals_full_exactly(seed):
    m = make_model(SHAPE, gain=0.4, translation=(1.0, -2.0, 0.5), seed=seed)
    parts = split_model(m)
    rng = np.random.default_rng(100 + seed)
    f = rng.normal(size=(1, 1) + SHAPE).astype(np.float32)
    mv = rng.normal(size=(1, 1) + SHAPE).astype(np.float32)
    full = _run(m, {"fixed": f, "moving": mv})
    ff = _run(parts.features, {FEATURES_INPUT: f})[FEATURES_OUTPUT]
    mf = _run(parts.features, {FEATURES_INPUT: mv})[FEATURES_OUTPUT]
    head = _run(parts.head, {C.FIXED_FEATURES: ff, C.MOVING_FEATURES: mf})
    assert set(head) == set(full)
    for k in full:
        assert np.array_equal(full[k], head[k]), k
    assert np.abs(full["disp"]).max() > 0.1  # the field depends on the images


def test_split_preserves_functions_opsets_metadata():
    m = make_model(SHAPE)
    parts = split_model(m)
    assert [f.name for f in parts.features.functions] == ["FakeObelisk"]
    assert [f.name for f in parts.head.functions] == ["NormToVoxels"]
    meta = {p.key for p in m.metadata_props}
    for part, name in ((parts.features, "features"), (parts.head, "head")):
        onnx.checker.check_model(part, full_check=True)
        assert {(o.domain, o.version) for o in part.opset_import} == \
            {(o.domain, o.version) for o in m.opset_import}
        pm = {p.key: p.value for p in part.metadata_props}
        assert meta <= set(pm) and json.loads(pm[META_PART]) == name
        assert part.ir_version == m.ir_version
    assert {i.name for i in parts.features.graph.input} == {FEATURES_INPUT}
    assert {i.name for i in parts.head.graph.input} == {C.FIXED_FEATURES, C.MOVING_FEATURES}
    assert "feat_w" in {t.name for t in parts.features.graph.initializer}
    assert "feat_w" not in {t.name for t in parts.head.graph.initializer}


def test_split_refuses_branches_with_different_weights():
    m = make_model(SHAPE)
    w = next(t for t in m.graph.initializer if t.name == "feat_w")
    other = onnx.TensorProto()
    other.CopyFrom(w)
    other.name = "feat_w_moving"
    arr = onnx.numpy_helper.to_array(w) + 1.0
    other.CopyFrom(onnx.numpy_helper.from_array(arr.astype(np.float32), "feat_w_moving"))
    m.graph.initializer.append(other)
    node = next(n for n in m.graph.node if n.name == "moving/obelisk")
    node.input[1] = "feat_w_moving"
    with pytest.raises(PddnetError, match="not the same computation"):
        split_model(m)


def test_split_accepts_duplicated_but_equal_weights():
    m = make_model(SHAPE)
    w = next(t for t in m.graph.initializer if t.name == "feat_w")
    dup = onnx.TensorProto()
    dup.CopyFrom(w)
    dup.name = "moving/feat_w_copy"
    m.graph.initializer.append(dup)
    next(n for n in m.graph.node if n.name == "moving/obelisk").input[1] = dup.name
    split_model(m)


def test_split_refuses_head_reading_an_image():
    m = make_model(SHAPE, with_optional=False)
    add = next(n for n in m.graph.node if n.name == "head/sub")
    m.graph.node.insert(0, onnx.helper.make_node("ReduceMean", ["fixed"], ["head/img_mean"],
                                                 keepdims=1, name="head/img_mean"))
    add.input[1] = "head/d_pre"
    m.graph.node.insert(1, onnx.helper.make_node("Add", [C.MOVING_FEATURES, "head/img_mean"],
                                                 ["head/d_pre"], name="head/mix"))
    with pytest.raises(PddnetError, match="reads the input 'fixed' directly"):
        split_model(m)
