"""The OBELISK sampling in C (pddnet.backends.native.features): the kernel against the float64
reference (pddnet.model.ops.deformable_sample) on odd shapes with offsets that reach outside
the volume, the features part with the library giving ONNX Runtime's features on exported
models (INT8 graphs too: their Q/DQ nodes stay in ONNX Runtime), the plan read from
initializers or Constant nodes and refused (with the reason) for anything but the pattern in
float32, and the runtime saying which implementation ran, falling
back to ONNX Runtime where the library is off or absent.

Fresh random inputs on every run. Not tested here: speed (docs/benchmarks.md); the aarch64
build (no cross compiler on the test machines).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from helpers import features_models as FM
from helpers.native_lib import pretend_library_absent
from pddnet.backends import native
from pddnet.backends.native import features as natf
from pddnet.errors import PddnetError
from pddnet.spec import contract as C

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.skipif(not native.status()["built"],
                                reason="the C kernel library is not built")

#: (C, input (I, J, K), output (I', J', K'), S): no size a multiple of anything, axes of one
#: voxel, output coarser and finer than the input
CASES = [(1, (7, 9, 5), (11, 4, 13), 1), (3, (6, 11, 8), (5, 9, 7), 5),
         (4, (9, 7, 10), (12, 5, 11), 32), (3, (1, 6, 5), (1, 3, 7), 5),
         (4, (5, 1, 3), (2, 1, 9), 1), (1, (13, 6, 9), (4, 11, 3), 32)]


def _t(x):
    return torch.tensor(x, dtype=torch.float64)


def _reference(x, o0, o1, out_shape):
    from pddnet.model import ops

    return (ops.deformable_sample(_t(x), _t(o0), out_shape)
            - ops.deformable_sample(_t(x), _t(o1), out_shape)).numpy()


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"C{c[0]}S{c[3]}")
def test_sampling_matches_the_float64_reference(case):
    rng = np.random.default_rng()
    C_, n, m, S = case
    x = rng.standard_normal((1, C_, *n)).astype(np.float32)
    # up to 1.5 normalised units: most voxel coordinates land outside [0, n - 1] on some axis
    o0, o1 = (rng.uniform(-1.5, 1.5, (S, 3)).astype(np.float32) for _ in range(2))
    o0[0] = [1.4, -1.4, 0.0]  # one offset clamped at both ends for sure
    want = _reference(x, o0, o1, m)
    got = natf.obelisk_sample(x, o0, o1, m, threads=3)
    assert got.shape == (1, C_ * S, *m) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    # the thread count does not change a number; a given output array is written
    out = np.full_like(got, np.nan)
    assert natf.obelisk_sample(x, o0, o1, m, threads=1, out=out) is out
    np.testing.assert_array_equal(out, got)
    # the difference of one set with itself is zero; the channel order is (c, s)
    np.testing.assert_array_equal(natf.obelisk_sample(x, o0, o0, m), 0.0)
    # an offset set far outside samples the last voxel everywhere (clamp), so the difference
    # plus that voxel is the first set alone, channel c*S + s
    far = natf.obelisk_sample(x, o0, np.full_like(o1, 100.0), m).reshape(C_, S, *m)
    from pddnet.model import ops

    alone = ops.deformable_sample(_t(x), _t(o0), m).numpy().reshape(C_, S, *m)
    np.testing.assert_allclose(far + x[0, :, -1, -1, -1, None, None, None, None], alone,
                               atol=1e-5)


def test_sampling_rejects_bad_arguments():
    x = np.zeros((1, 2, 4, 5, 6), np.float32)
    o = np.zeros((3, 3), np.float32)
    with pytest.raises(PddnetError, match="offsets"):
        natf.obelisk_sample(x, o, o[:2], (3, 3, 3))
    with pytest.raises(PddnetError, match=r"\(1, C, I, J, K\)"):
        natf.obelisk_sample(x[0], o, o, (3, 3, 3))
    with pytest.raises(PddnetError, match="output_shape"):
        natf.obelisk_sample(x, o, o, (3, 0, 3))
    with pytest.raises(PddnetError, match="out must be"):
        natf.obelisk_sample(x, o, o, (3, 3, 3), out=np.zeros((1, 6, 3, 3, 4), np.float32))


# ---- exported models ----------------------------------------------------------------------

def test_features_with_and_without_the_library_agree():
    model = FM.export()
    plan = natf.plan_features(FM.features_part(model))
    assert plan.offsets == 8 and plan.channels == 4 and plan.nodes[2].endswith("ObeliskDiff_0")
    assert (np.abs(np.concatenate([plan.offsets0, plan.offsets1])) > 1.0).any()
    with FM.both(FM.features_part(model)) as (nb, ob):
        for _ in range(2):  # the difference buffer is reused
            img = FM.image()
            a, b = nb.run({C.FEATURES_INPUT: img}), ob.run({C.FEATURES_INPUT: img})
            assert list(a) == [C.FEATURES_OUTPUT]
            FM.assert_same_features(a[C.FEATURES_OUTPUT], b[C.FEATURES_OUTPUT])
        assert set(nb.last_parts_ms) >= {"pre", "sampling", "post"}
        d = nb.describe()
        assert d["backend"] == "onnxruntime" and d["native_sampling"]["plan"]["offsets"] == 8


def test_offsets_from_constant_nodes():
    """Offsets held by Constant nodes instead of initializers are read the same way."""
    f = FM.features_part(FM.export())
    g = f.graph
    names = {n.input[1] for n in g.node if n.op_type == "DeformableSample3D"}
    inits = [t for t in g.initializer if t.name in names]
    consts = [helper.make_node("Constant", [], [t.name], value=t, name=f"const_{t.name}")
              for t in inits]
    keep = [t for t in g.initializer if t.name not in names]
    del g.initializer[:]
    g.initializer.extend(keep)
    nodes = consts + list(g.node)
    del g.node[:]
    g.node.extend(nodes)
    plan = natf.plan_features(f)
    want = {t.name: numpy_helper.to_array(t) for t in inits}
    got = {n.input[1] for n in g.node if n.op_type == "DeformableSample3D"}
    assert got == set(want)
    assert any(np.array_equal(plan.offsets0, v) for v in want.values())
    with FM.both(f) as (nb, ob):
        FM.assert_same_features(*FM.features_of_both(nb, ob))


def _edited(edit):
    f = FM.features_part(FM.export())
    edit(f.graph)
    return f


def _swap_sub_for_add(g):
    for n in g.node:
        if n.op_type == "Sub":
            n.op_type = "Add"


def _qdq_before_sampling(g):
    ds = [n for n in g.node if n.op_type == "DeformableSample3D"]
    x = ds[0].input[0]
    g.initializer.extend([numpy_helper.from_array(np.array(0.05, np.float32), "qdq_scale"),
                          numpy_helper.from_array(np.array(0, np.uint8), "qdq_zero")])
    q = helper.make_node("QuantizeLinear", [x, "qdq_scale", "qdq_zero"], ["x_q"], name="q")
    dq = helper.make_node("DequantizeLinear", ["x_q", "qdq_scale", "qdq_zero"], ["x_dq"],
                          name="dq")
    for n in ds:
        n.input[0] = "x_dq"
    at = min(i for i, n in enumerate(g.node) if n.op_type == "DeformableSample3D")
    nodes = list(g.node)
    nodes[at:at] = [q, dq]
    del g.node[:]
    g.node.extend(nodes)


def _third_reader(g):
    ds = next(n for n in g.node if n.op_type == "DeformableSample3D")
    g.node.append(helper.make_node("Identity", [ds.output[0]], ["extra"], name="extra"))


@pytest.mark.parametrize("edit,reason", [
    (_swap_sub_for_add, "one Sub"),
    (_third_reader, "one Sub"),
], ids=["add", "reader"])
def test_other_patterns_are_refused_with_the_reason(edit, reason):
    with pytest.raises(natf.NotStandardFeatures, match=reason):
        natf.plan_features(_edited(edit))


def test_a_qdq_pair_before_the_sampling_stays_in_onnx_runtime():
    """A float32 map that comes out of a Q/DQ pair is sampled in C; the pair runs in the
    ONNX Runtime part before it, so the features are ONNX Runtime's."""
    f = _edited(_qdq_before_sampling)
    plan = natf.plan_features(f)
    assert plan.x_name == "x_dq"
    assert {n.op_type for n in plan.pre.graph.node} >= {"QuantizeLinear", "DequantizeLinear"}
    with FM.both(f) as (nb, ob):
        FM.assert_same_features(*FM.features_of_both(nb, ob))


def test_the_int8_graph_samples_in_c_with_its_convolutions_in_int8():
    """The INT8 graph (conv1, conv2 quantised: a QuantizeLinear reads the difference) keeps
    the C sampling; its Q/DQ nodes run in the ONNX Runtime part after it. The features equal
    ONNX Runtime's up to a rounding step where the C and ONNX Runtime float32 differences
    fall on either side of a quantisation boundary (rare: most runs are bit-equal)."""
    from pddnet.calibration import int8 as Q
    from pddnet.calibration.data import ArrayReader

    model = FM.export()
    rng = np.random.default_rng()
    feeds = [{n: rng.uniform(-1, 1, (1, 1, *FM.SHAPE)).astype(np.float32) for n in C.INPUTS}]
    q, _, info = Q.build_int8(model, ("conv1", "conv2"), ArrayReader(feeds), table=False)
    f = FM.features_part(q)
    plan = natf.plan_features(f)
    post_ops = [n.op_type for n in plan.post.graph.node]
    assert [n.op_type for n in plan.post.graph.node if plan.y_name in n.input] == \
        ["QuantizeLinear"]
    assert post_ops.count("Conv") == 3 and post_ops.count("DequantizeLinear") >= 4
    assert all(n.domain != C.DOMAIN for n in plan.post.graph.node)
    with FM.both(f) as (nb, ob):
        img = FM.image()
        a, b = FM.features_of_both(nb, ob, img)
        scale = float(np.abs(b).max())
        close = np.isclose(a, b, rtol=1e-4, atol=1e-5 * scale)
        # a flipped rounding spreads through Conv2 (27 voxels, every channel): most stay equal
        assert close.mean() > 0.9, close.mean()
        np.testing.assert_allclose(a, b, rtol=0, atol=0.05 * scale)
        # and the INT8 convolutions did run: the FP32 graph's features differ by more
        fb = FM.onnx_features(FM.features_part(model))
        try:
            assert np.abs(fb.run({C.FEATURES_INPUT: img})[C.FEATURES_OUTPUT] - b).max() > \
                np.abs(a - b).max()
        finally:
            fb.deactivate()


def test_fp16_sampling_runs_in_onnx_runtime_and_says_why():
    from pddnet.runtime.runner import PairRunner

    model = FM.export(precision={"obelisk": "fp16"})
    with pytest.raises(natf.NotStandardFeatures, match="Cast"):
        natf.plan_features(FM.features_part(model))
    r = PairRunner(model, "onnxruntime", {"threads": 1})
    try:
        assert r.sampling_implementation == "onnxruntime"
        assert "does not run this model" in r.sampling_impl["reason"]
        assert "Cast" in r.sampling_impl["reason"]
        f, _ = r.features(FM.image())
        assert np.isfinite(f).all()
    finally:
        r.close()


def test_runner_says_which_sampling_ran_and_shares_it():
    from pddnet.runtime.runner import PairRunner

    model = FM.export()
    img, img2 = FM.image(), FM.image()
    a = PairRunner(model, "onnxruntime", {"threads": 2})
    b = PairRunner(model, "onnxruntime", {"threads": 2}, native=False)
    c = PairRunner(model, "onnxruntime", {"threads": 2}, share=a, suffix="2")
    try:
        assert a.sampling_implementation == "native" and a.sampling_impl["reason"] is None
        assert b.sampling_implementation == "onnxruntime"
        assert b.sampling_impl["reason"] == "the C sampling was not asked for"
        assert c.shares_features and c.sampling_impl == a.sampling_impl
        d = a.describe()
        assert d["sampling"]["implementation"] == "native" and d["backend"] == "onnxruntime"
        assert d["head"]["implementation"] == a.head_implementation
        FM.assert_same_features(a.features(img)[0], b.features(img)[0])
        ra, rb = a.run_pair(img, img2), b.run_pair(img, img2)
        np.testing.assert_allclose(ra.outputs[C.OUTPUT_DISP], rb.outputs[C.OUTPUT_DISP],
                                   atol=2e-3, rtol=1e-3)
    finally:
        for r in (c, a, b):
            r.close()


def test_library_off_or_absent_falls_back_and_says_so(monkeypatch):
    from pddnet.runtime.runner import PairRunner

    model = FM.export()
    img = FM.image()
    with_lib = PairRunner(model, "onnxruntime", {"threads": 1})
    try:
        base = with_lib.features(img)[0]
    finally:
        with_lib.close()
    monkeypatch.setenv(native.ENV, "off")
    r = PairRunner(model, "onnxruntime", {"threads": 1})
    try:
        assert r.sampling_implementation == "onnxruntime"
        assert r.sampling_impl["reason"] == "PDDNET_NATIVE=off"
        assert r.describe()["sampling"]["reason"] == "PDDNET_NATIVE=off"
        FM.assert_same_features(base, r.features(img)[0])
    finally:
        r.close()
    monkeypatch.setenv(native.ENV, "portable")  # no ISA-specific code: any set runs it
    r = PairRunner(model, "onnxruntime", {"threads": 1})
    try:
        assert r.sampling_implementation == "native"
    finally:
        r.close()
    pretend_library_absent(monkeypatch)
    r = PairRunner(model, "onnxruntime", {"threads": 1})
    try:
        assert r.sampling_implementation == "onnxruntime"
        assert "not built" in r.sampling_impl["reason"]
        FM.assert_same_features(base, r.features(img)[0])
    finally:
        r.close()


def test_profiling_and_other_providers_keep_onnx_runtime(tmp_path):
    from pddnet.runtime.runner import PairRunner

    r = PairRunner(FM.export(), "onnxruntime", {"threads": 1, "profile": str(tmp_path / "p")})
    try:
        assert r.sampling_impl == {"implementation": "onnxruntime",
                                   "reason": "profiling ONNX Runtime's nodes"}
    finally:
        r.close()


def test_doctor_says_whether_the_sampling_runs_in_c(monkeypatch):
    from pddnet.backends import doctor

    rep = doctor.collect()
    assert rep["native"]["sampling"] == {"runs": True, "reason": None}
    assert "[ok] C OBELISK sampling" in doctor.format_report(rep)
    monkeypatch.setenv(native.ENV, "off")
    rep = doctor.collect()
    assert rep["native"]["sampling"]["runs"] is False
    assert "C OBELISK sampling: not used (PDDNET_NATIVE=off)" in doctor.format_report(rep)


def test_the_model_file_is_unchanged():
    """Planning works on the split part only: the model keeps its DeformableSample3D nodes."""
    model = FM.export()
    before = model.SerializeToString(deterministic=True)
    natf.plan_features(FM.features_part(model))
    assert model.SerializeToString(deterministic=True) == before
    assert isinstance(model, onnx.ModelProto)
