"""The feature network's 3x3x3 convolution in C by Winograd F(2x2x2, 3x3x3)
(pddnet.backends.native.conv): every kernel set built here against PyTorch's float64 conv3d
on odd shapes (channels not a multiple of the 16/32-wide steps, axes of one voxel, tiles cut
at the border), bias and relu on and off; the thread count changing no number; the plan read
from exported features (and refused, with the reason, for an INT8 graph); the features with
the C convolution equal to ONNX Runtime's; the runner saying where the convolution ran.

Fresh random inputs on every run. Not tested here: speed (docs/benchmarks.md).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from helpers import features_models as FM
from pddnet.backends import native
from pddnet.backends.native import conv as natc
from pddnet.errors import PddnetError
from pddnet.spec import contract as C

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.skipif(not native.status()["built"],
                                reason="the C kernel library is not built")

#: (Cin, Cout, (I, J, K)): Cout 33 leaves one column after a 32-wide step, 7 after none
CASES = [(5, 7, (7, 4, 9)), (13, 20, (1, 3, 37)), (17, 33, (6, 1, 5)), (64, 64, (9, 10, 11)),
         (3, 16, (2, 2, 2)), (1, 1, (1, 1, 1))]


def _isas():
    st = native.status()
    return [k for k, ok in st["isas"].items() if ok]


def _reference(x, w, b, relu):
    t = lambda a: None if a is None else torch.tensor(a, dtype=torch.float64)  # noqa: E731
    y = torch.nn.functional.conv3d(t(x), t(w), t(b), padding=1)
    return (torch.relu(y) if relu else y).numpy()


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}to{c[1]}")
def test_every_kernel_set_matches_the_float64_convolution(case):
    rng = np.random.default_rng()
    cin, cout, n = case
    x = rng.standard_normal((1, cin, *n)).astype(np.float32)
    w = (rng.standard_normal((cout, cin, 3, 3, 3)) / np.sqrt(27 * cin)).astype(np.float32)
    b = rng.standard_normal(cout).astype(np.float32)
    u = natc.winograd_weights(w)
    assert u.shape == (64, cin, cout) and u.dtype == np.float32
    for relu, bias in ((True, b), (False, None)):
        want = _reference(x, w, bias, relu)
        scale = float(np.abs(want).max()) + 1e-12
        for isa in _isas():
            got = natc.conv3x3x3(x, u, bias, relu=relu, threads=3, isa=isa)
            assert got.shape == (1, cout, *n) and got.dtype == np.float32
            # float32 rounding of the transforms: a few ulp of the largest term
            np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * scale * max(1, cin) ** 0.5,
                                       err_msg=f"{isa} relu={relu}")
            if relu:
                assert (got >= 0).all()


@pytest.mark.parametrize("cpre,cin,cout,n", [(7, 5, 9, (5, 3, 7)), (128, 64, 64, (6, 7, 9)),
                                            (33, 40, 17, (1, 1, 50)), (2, 1, 3, (4, 4, 3))],
                         ids=["odd", "paper-channels", "tails", "tiny"])
def test_the_fused_pointwise_convolution_before_matches_float64(cpre, cin, cout, n):
    """conv3x3x3(pre=...) is relu(conv3(relu(conv1x1(x) + b1)) + b2): voxel counts that are not
    a multiple of the 6-voxel step or the 48-voxel block, outputs not a multiple of 16/32."""
    rng = np.random.default_rng()
    x = rng.standard_normal((1, cpre, *n)).astype(np.float32)
    w1 = (rng.standard_normal((cin, cpre)) / np.sqrt(cpre)).astype(np.float32)
    b1 = rng.standard_normal(cin).astype(np.float32)
    w2 = (rng.standard_normal((cout, cin, 3, 3, 3)) / np.sqrt(27 * cin)).astype(np.float32)
    b2 = rng.standard_normal(cout).astype(np.float32)
    t = lambda a: torch.tensor(a, dtype=torch.float64)  # noqa: E731
    mid = torch.relu(torch.nn.functional.conv3d(t(x), t(w1)[..., None, None, None], t(b1)))
    for relu_pre in (True, False):
        m = mid if relu_pre else torch.nn.functional.conv3d(t(x), t(w1)[..., None, None, None],
                                                             t(b1))
        want = torch.relu(torch.nn.functional.conv3d(m, t(w2), t(b2), padding=1)).numpy()
        scale = float(np.abs(want).max())
        for isa in _isas():
            got = natc.conv3x3x3(x, natc.winograd_weights(w2), b2, relu=True, threads=2, isa=isa,
                                 pre=(np.ascontiguousarray(w1.T), b1, relu_pre))
            np.testing.assert_allclose(got, want, rtol=0, atol=3e-6 * scale * np.sqrt(cpre + cin),
                                       err_msg=f"{isa} relu_pre={relu_pre}")


def test_threads_and_reused_buffers_change_no_number():
    rng = np.random.default_rng()
    x = rng.standard_normal((1, 8, 11, 6, 41)).astype(np.float32)
    u = natc.winograd_weights(rng.standard_normal((24, 8, 3, 3, 3)).astype(np.float32))
    b = rng.standard_normal(24).astype(np.float32)
    one = natc.conv3x3x3(x, u, b, threads=1)
    out = np.full_like(one, np.nan)
    work = np.full(natc.work_floats(8, 24, x.shape[2:], 4), np.nan, np.float32)
    for _ in range(2):
        assert natc.conv3x3x3(x, u, b, threads=4, out=out, work=work) is out
        np.testing.assert_array_equal(out, one)


def test_the_weight_transform_is_g_w_gt_on_each_axis():
    """A known answer: a weight that is 1 at the centre tap transforms to the outer product of
    G's middle column, and the convolution is then the identity."""
    w = np.zeros((1, 1, 3, 3, 3), np.float32)
    w[0, 0, 1, 1, 1] = 1.0
    g1 = np.array([0.0, 0.5, -0.5, 0.0])
    np.testing.assert_array_equal(natc.winograd_weights(w)[:, 0, 0],
                                  np.einsum("a,b,c->abc", g1, g1, g1).reshape(64))
    x = np.random.default_rng().standard_normal((1, 1, 5, 3, 7)).astype(np.float32)
    np.testing.assert_allclose(natc.conv3x3x3(x, natc.winograd_weights(w), None), x,
                               rtol=0, atol=1e-6)


def test_bad_arguments_are_refused_with_the_reason():
    x = np.zeros((1, 4, 3, 3, 3), np.float32)
    u = np.zeros((64, 4, 6), np.float32)
    with pytest.raises(PddnetError, match="Cout, Cin, 3, 3, 3"):
        natc.winograd_weights(np.zeros((6, 4, 5, 5, 5)))
    with pytest.raises(PddnetError, match=r"\(64, 4, Cout\)"):
        natc.conv3x3x3(x, u[:, :3], None)
    with pytest.raises(PddnetError, match="bias"):
        natc.conv3x3x3(x, u, np.zeros(5, np.float32))
    with pytest.raises(PddnetError, match="out must be"):
        natc.conv3x3x3(x, u, None, out=np.zeros((1, 6, 3, 3, 4), np.float32))
    with pytest.raises(PddnetError, match="work must be"):
        natc.conv3x3x3(x, u, None, work=np.zeros(10, np.float32))
    with pytest.raises(PddnetError, match="unknown kernel set"):
        natc.conv3x3x3(x, u, None, isa="neon9")
    with pytest.raises(PddnetError, match="1x1x1 weight"):
        natc.conv3x3x3(x, u, None, pre=(np.zeros((3, 4), np.float32), None, True))
    with pytest.raises(PddnetError, match="1x1x1 bias"):
        natc.conv3x3x3(x, u, None, pre=(np.zeros((4, 4), np.float32), np.zeros(3), True))


# ---- in the features -------------------------------------------------------------------------

def test_features_with_the_c_convolution_equal_onnx_runtime():
    from pddnet.backends.native import features as natf

    f = FM.features_part(FM.export())
    with_conv = natf.NativeFeaturesBackend(f, threads=2).activate()
    without = natf.NativeFeaturesBackend(f, threads=2, conv=False).activate()
    ort = FM.onnx_features(f)
    try:
        st = with_conv.conv_status()
        assert st["implementation"] == "winograd" and st["node"].endswith("Conv2_0")
        assert st["relu"] and st["in_channels"] == 16 and st["out_channels"] == 16
        # Conv1 (+ ReLU) fused into the pass: no ONNX Runtime session between sampling and it
        assert st["fused_before"]["node"].endswith("Conv1_0") and st["fused_before"]["relu"]
        assert st["fused_before"]["in_channels"] == 32 and with_conv._post is None
        assert without.conv_status() == {"implementation": "onnxruntime",
                                         "reason": "not asked for"}
        assert with_conv.describe()["native_conv"]["implementation"] == "winograd"
        for _ in range(2):  # the buffers are reused
            img = FM.image()
            a = with_conv.run({C.FEATURES_INPUT: img})[C.FEATURES_OUTPUT]
            b = ort.run({C.FEATURES_INPUT: img})[C.FEATURES_OUTPUT]
            FM.assert_same_features(a, b)
            FM.assert_same_features(without.run({C.FEATURES_INPUT: img})[C.FEATURES_OUTPUT], b)
        assert "conv" in with_conv.last_parts_ms and "conv" not in without.last_parts_ms
    finally:
        for be in (with_conv, without, ort):
            be.deactivate()


def _edited_features(edit):
    f = FM.features_part(FM.export())
    edit(f.graph)
    onnx.checker.check_model(f)
    return f


def _identity_before_conv2(g):
    """Conv2 reads Identity(Relu(Conv1)): not the fusable pattern."""
    from onnx import helper

    conv2 = next(n for n in g.node if n.name.endswith("Conv2_0"))
    at = list(g.node).index(conv2)
    g.node.insert(at, helper.make_node("Identity", [conv2.input[0]], ["conv2_in"], name="id"))
    conv2.input[0] = "conv2_in"


def _conv1_read_after_conv2(g):
    """The features plus 0 * mean(Conv1's output): the part after Conv2 reads from before."""
    from onnx import helper

    conv1 = next(n for n in g.node if n.name.endswith("Conv1_0"))
    out = g.output[0].name
    last = next(n for n in g.node if out in n.output)
    last.output[:] = ["feat_raw"]
    g.initializer.append(onnx.numpy_helper.from_array(np.zeros((), np.float32), "zero_c"))
    g.node.extend([
        helper.make_node("ReduceMean", [conv1.output[0]], ["c1_mean"], keepdims=1, name="m"),
        helper.make_node("Mul", ["c1_mean", "zero_c"], ["c1_zero"], name="z"),
        helper.make_node("Add", ["feat_raw", "c1_zero"], [out], name="a")])


def test_conv1_behind_another_node_runs_in_onnx_runtime_before_the_c_convolution():
    f = _edited_features(_identity_before_conv2)
    with FM.both(f) as (be, ort):
        st = be.conv_status()
        assert st["implementation"] == "winograd" and "fused_before" not in st
        assert be._post is not None  # Conv1, Relu, Identity in ONNX Runtime
        FM.assert_same_features(*FM.features_of_both(be, ort))


def test_a_graph_that_does_not_cut_at_conv2_keeps_it_in_onnx_runtime_and_says_why():
    f = _edited_features(_conv1_read_after_conv2)
    with FM.both(f) as (be, ort):
        st = be.conv_status()
        assert st["implementation"] == "onnxruntime"
        assert "does not cut at Conv" in st["reason"]
        FM.assert_same_features(*FM.features_of_both(be, ort))


def test_the_int8_graph_keeps_its_convolution_in_onnx_runtime_and_says_why():
    from pddnet.backends.native import features as natf
    from pddnet.calibration import int8 as Q
    from pddnet.calibration.data import ArrayReader

    rng = np.random.default_rng()
    feeds = [{n: rng.uniform(-1, 1, (1, 1, *FM.SHAPE)).astype(np.float32) for n in C.INPUTS}]
    q, _, _ = Q.build_int8(FM.export(), ("conv2",), ArrayReader(feeds), table=False)
    be = natf.NativeFeaturesBackend(FM.features_part(q), threads=2).activate()
    try:
        st = be.conv_status()
        assert st["implementation"] == "onnxruntime"
        assert "DequantizeLinear" in st["reason"] and "INT8" in st["reason"]
        assert np.isfinite(be.run({C.FEATURES_INPUT: FM.image()})[C.FEATURES_OUTPUT]).all()
    finally:
        be.deactivate()


def test_the_runner_says_where_the_convolution_ran():
    from pddnet.runtime.runner import PairRunner

    r = PairRunner(FM.export(), "onnxruntime", {"threads": 2})
    try:
        conv = r.sampling_impl["conv"]
        assert conv["implementation"] == "winograd" and conv["isa"] in native.ISAS
        assert r.describe()["sampling"]["conv"] == conv
    finally:
        r.close()
