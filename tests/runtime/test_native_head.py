"""The C head (pddnet.backends.native): each kernel against the float64 reference
(pddnet.model.ops) on odd shapes, every kernel set this machine runs, the same numbers from the
portable set, the head read from exported models (approx folded and literal, exact, with the
optional outputs) giving ONNX Runtime's outputs, and the runtime falling back to ONNX Runtime,
and saying so, where the library is absent, switched off, or the head is not the float32 one.

Fresh random inputs on every run. Not tested here: speed (``pddnet bench``, docs/benchmarks.md);
the aarch64 build (no cross compiler on the test machines).
"""

from __future__ import annotations

import numpy as np
import pytest

from helpers.native_lib import pretend_library_absent
from pddnet.backends import native
from pddnet.errors import PddnetError
from pddnet.spec import contract as C

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.skipif(not native.status()["built"],
                                reason="the C kernel library is not built")

ISAS = [i for i in native.ISAS if native.status()["isas"].get(i)]
#: (channels, feature shape, grid, L): G not a multiple of anything (G_k = 2 and 3: the slab
#: pass's g_k ring at its shortest), L = 3, 5, 7, 11, 15
SHAPES = [(3, (9, 11, 13), (5, 7, 6), 7), (2, (6, 7, 8), (3, 4, 5), 3),
          (4, (12, 10, 14), (4, 5, 3), 11), (2, (10, 9, 11), (3, 2, 3), 15),
          (17, (7, 8, 9), (4, 3, 2), 5)]


def _kernels(C_, n, G, L, q, *, isa, mode="approx", **kw):
    plan = native.HeadPlan(channels=C_, feat_shape=n, grid=G, disp_size=L, capture=q, mode=mode,
                           expect=np.stack([np.linspace(-q, q, L)] * 3), **kw)
    return native.HeadKernels(plan, threads=2, isa=isa)


def _t(x):
    return torch.tensor(x, dtype=torch.float64)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"L{s[3]}")
def test_kernels_match_the_float64_reference(isa, shape):
    from pddnet.model import ops

    rng = np.random.default_rng()
    C_, n, G, L = shape
    q = float(rng.uniform(0.15, 0.5))
    f, m = (rng.standard_normal((1, C_, *n)).astype(np.float32) for _ in range(2))
    k = _kernels(C_, n, G, L, q, isa=isa, scale=-float(rng.uniform(1, 4)),
                 shift=float(rng.uniform(-1, 1)))
    try:
        assert k.isa == isa
        ref = ops.correlation(_t(f), _t(m), G, L, q).numpy()
        np.testing.assert_allclose(k.correlation(f, m), ref, rtol=0, atol=1e-5 * ref.max())
        x = rng.standard_normal(k.cost_shape).astype(np.float32)
        np.testing.assert_allclose(k.minconv(x), ops.minconv_approx(_t(x)).numpy(), atol=1e-5)
        np.testing.assert_allclose(k.mean_field_step(x), ops.mean_field_step(_t(x)).numpy(),
                                   atol=1e-5)
        out = k.softmax(x)
        p = ops.displacement_probabilities(-k.plan.shift / k.plan.scale + _t(x), -k.plan.scale)
        np.testing.assert_allclose(out["probs"], p.numpy(), atol=1e-6, rtol=1e-4)
        np.testing.assert_allclose(out["grid_disp"], ops.expected_displacement(p, L, q).numpy(),
                                   atol=1e-6)
        np.testing.assert_allclose(out["entropy"], ops.displacement_entropy(p).numpy(),
                                   atol=1e-5)
    finally:
        k.close()
    pen = float(rng.uniform(0.1, 2.0))
    ke = _kernels(C_, n, G, L, q, isa=isa, mode="exact")
    try:
        want = ops.minconv_exact(_t(x), pen).numpy()
        np.testing.assert_allclose(ke.minconv(x, pen), want, atol=1e-5)
        np.testing.assert_allclose(ke.mean_field_step(x, pen),
                                   ops.mean_field_step(_t(x), "exact", pen).numpy(), atol=1e-5)
    finally:
        ke.close()


def _head_run(k, f, m):
    return k.run(f, m, probs=True, entropy=True)


def test_fused_head_matches_the_reference_and_the_portable_set():
    """The fused run (both steps, affine inputs, softmax) against the float64 network head,
    and every kernel set against the portable one."""
    from pddnet.model import ops

    rng = np.random.default_rng()
    C_, n, G, L, q = 3, (11, 9, 13), (5, 4, 6), 7, 0.35
    a = rng.uniform(0.5, 2.0, 6)
    f, m = (rng.standard_normal((1, C_, *n)).astype(np.float32) for _ in range(2))
    kw = dict(a1=a[0], b1=a[1], a2=a[2] * a[0], b2=a[2] * a[1] + a[4], c2=a[3], scale=-a[5])
    ssd = ops.correlation(_t(f), _t(m), G, L, q)
    cost = a[1] + a[0] * ssd
    first = ops.mean_field_step(cost)
    second = ops.mean_field_step(a[4] + a[2] * cost + a[3] * first)
    p = ops.displacement_probabilities(second, a[5])
    results = {}
    for isa in ISAS:
        k = _kernels(C_, n, G, L, q, isa=isa, **kw)
        try:
            results[isa] = _head_run(k, f, m)
        finally:
            k.close()
        out = results[isa]
        np.testing.assert_allclose(out["probs"], p.numpy(), atol=2e-5, rtol=1e-3)
        np.testing.assert_allclose(out["grid_disp"], ops.expected_displacement(p, L, q).numpy(),
                                   atol=2e-5)
        np.testing.assert_allclose(out["entropy"], ops.displacement_entropy(p).numpy(),
                                   atol=1e-4)
    for isa, out in results.items():  # the same numbers as the portable path
        for key in out:
            np.testing.assert_allclose(out[key], results["portable"][key], rtol=1e-5, atol=1e-6,
                                       err_msg=f"{isa} vs portable: {key}")


# ---- exported models ----------------------------------------------------------------------

SHAPE = (30, 27, 33)


def _export(**kw):
    from pddnet.export.onnx_export import export_model
    from pddnet.model.network import PDDNet
    from pddnet.spec.config import PDDConfig

    mode = kw.pop("minconv", "approx")
    cfg = PDDConfig(channels=4, grid=(5, 6, 4), disp_size=kw.pop("L", 7), capture=0.3,
                    minconv=mode)
    net = PDDNet(cfg, seed=int(np.random.default_rng().integers(1000))).eval()
    with torch.no_grad():
        net.alpha[5] = 20.0
    return net, export_model(net, SHAPE, **kw)


def _images():
    rng = np.random.default_rng()
    return tuple(rng.uniform(-1, 1, (1, 1, *SHAPE)).astype(np.float32) for _ in range(2))


@pytest.mark.parametrize("case", ["approx", "literal", "exact", "outputs"])
def test_runner_with_and_without_the_library_agree(case):
    from pddnet.runtime.runner import PairRunner

    kw = {"approx": {}, "literal": {"fold_alphas": False}, "exact": {"minconv": "exact"},
          "outputs": {"outputs": (C.OUTPUT_PROBS, C.OUTPUT_ENTROPY), "L": 5}}[case]
    net, model = _export(**kw)
    fixed, moving = _images()
    with_lib = PairRunner(model, "onnxruntime", {"threads": 2})
    without = PairRunner(model, "onnxruntime", {"threads": 2}, native=False)
    try:
        assert with_lib.head_implementation.startswith("native-"), with_lib.head_impl
        assert without.head_implementation == "onnxruntime"
        assert with_lib.describe()["head"]["implementation"] == with_lib.head_implementation
        a, b = with_lib.run_pair(fixed, moving), without.run_pair(fixed, moving)
        assert set(a.outputs) == set(b.outputs)
        assert a.kernel_ms is not None and b.kernel_ms is None
        for k in a.outputs:
            tol = 2e-3 if k == C.OUTPUT_DISP else 1e-4
            np.testing.assert_allclose(a.outputs[k], b.outputs[k], atol=tol, rtol=1e-3,
                                       err_msg=k)
        # and the PyTorch reference (float64 head on the same features)
        with torch.no_grad():
            ref = net.double().register_features(torch.tensor(a.fixed_features).double(),
                                                 torch.tensor(a.moving_features).double())
        np.testing.assert_allclose(a.outputs[C.OUTPUT_GRID_DISP], ref.grid_disp.numpy(),
                                   atol=1e-4)
    finally:
        with_lib.close()
        without.close()


def test_upsampling_in_c_matches_the_reference_and_onnx_runtime():
    """The head's last linear map (grid displacements -> voxels on the image grid) in C,
    against PyTorch's trilinear upsampling in float64 and the same graph in ONNX Runtime."""
    from pddnet.backends.onnxrt import OnnxRuntimeBackend
    from pddnet.graph.split import _make_part, _value_types, split_model
    from pddnet.model import ops

    _, model = _export()
    head = split_model(model).head
    plan = native.plan_head(head)
    assert plan.upsample is not None and plan.tail is None
    assert plan.describe()["upsampling"] == "native"
    rng = np.random.default_rng()
    grid = rng.uniform(-0.3, 0.3, (*plan.grid, 3)).astype(np.float32)
    k = native.HeadKernels(plan, threads=2)
    try:
        got = k.upsample(plan.upsample, grid)
    finally:
        k.close()
    up = ops.dense_displacement(_t(grid), SHAPE).numpy()
    # float32 rounding of a few products and sums at the field's magnitude (a few voxels)
    tol = 8 * np.finfo(np.float32).eps * float(np.abs(up).max())
    np.testing.assert_allclose(got, up, rtol=0, atol=tol)
    # the same nodes in ONNX Runtime: everything downstream of the expectation
    expect, rest = plan.produces["grid_disp"], []
    reach = {expect}
    for n in head.graph.node:
        if any(x in reach for x in n.input):
            rest.append(n)
            reach |= set(n.output)
    tail = _make_part(head, rest, "t", inputs=[(expect, expect)],
                      outputs=[(C.OUTPUT_DISP, C.OUTPUT_DISP)], types=_value_types(head))
    be = OnnxRuntimeBackend(tail, label="t", threads=1).activate()
    try:
        np.testing.assert_allclose(got, be.run({expect: grid})[C.OUTPUT_DISP], rtol=0,
                                   atol=tol)
    finally:
        be.deactivate()


def test_an_fp16_upsampling_stays_in_onnx_runtime():
    """A head whose upsampling is another computation (here float16) keeps the C head for the
    cost volume and runs its rest in ONNX Runtime, with the same result as without the library."""
    from pddnet.export.onnx_export import export_model
    from pddnet.graph.split import split_model
    from pddnet.runtime.runner import PairRunner

    net, _ = _export()
    model = export_model(net, SHAPE, precision={"upsample": "fp16"})
    plan = native.plan_head(split_model(model).head)
    assert plan.upsample is None and plan.tail is not None
    assert plan.describe()["upsampling"] == "onnxruntime"
    fixed, moving = _images()
    a = PairRunner(model, "onnxruntime", {"threads": 2})
    b = PairRunner(model, "onnxruntime", {"threads": 2}, native=False)
    try:
        assert a.head_implementation.startswith("native-")
        np.testing.assert_allclose(a.run_pair(fixed, moving).outputs[C.OUTPUT_DISP],
                                   b.run_pair(fixed, moving).outputs[C.OUTPUT_DISP], atol=2e-3)
    finally:
        a.close()
        b.close()


def test_fp16_head_runs_in_onnx_runtime_and_says_why():
    from pddnet.export.onnx_export import export_model
    from pddnet.runtime.runner import PairRunner

    net, _ = _export()
    model = export_model(net, SHAPE, precision={"meanfield1": "fp16"})
    r = PairRunner(model, "onnxruntime", {"threads": 1})
    try:
        assert r.head_implementation == "onnxruntime"
        assert "does not run this model" in r.head_impl["reason"]
        out = r.run_pair(*_images()).outputs
        assert np.isfinite(out[C.OUTPUT_DISP]).all()
    finally:
        r.close()


def test_library_absent_or_off_falls_back_and_says_so(monkeypatch):
    from pddnet.runtime.runner import PairRunner

    _, model = _export()
    fixed, moving = _images()
    monkeypatch.setenv(native.ENV, "off")
    r = PairRunner(model, "onnxruntime", {"threads": 1})
    try:
        assert r.head_implementation == "onnxruntime"
        assert r.head_impl["reason"] == "PDDNET_NATIVE=off"
        base = r.run_pair(fixed, moving).outputs
    finally:
        r.close()
    pretend_library_absent(monkeypatch)
    r = PairRunner(model, "onnxruntime", {"threads": 1})
    try:
        assert r.head_implementation == "onnxruntime"
        assert "not built" in r.head_impl["reason"]
        assert native.status()["built"] is False
        out = r.run_pair(fixed, moving).outputs
        np.testing.assert_array_equal(out[C.OUTPUT_DISP], base[C.OUTPUT_DISP])
    finally:
        r.close()


def test_forced_kernel_set_and_bad_values(monkeypatch):
    monkeypatch.delenv(native.ENV, raising=False)
    st = native.status()
    assert st["isa"] == next(i for i in native.AUTO_ORDER if st["isas"][i])
    assert st["isa"] != "avx512"          # only on request (slower where measured)
    if st["isas"].get("avx512"):
        monkeypatch.setenv(native.ENV, "avx512")
        assert native.status()["isa"] == "avx512"
    monkeypatch.setenv(native.ENV, "portable")
    assert native.status()["isa"] == "portable"
    monkeypatch.setenv(native.ENV, "avx1024")
    with pytest.raises(PddnetError, match="PDDNET_NATIVE"):
        native.status()


def test_doctor_says_which_head_implementation_runs(monkeypatch):
    from pddnet.backends import doctor

    rep = doctor.collect()
    assert rep["native"]["isa"] == native.status()["isa"]
    assert "[ok] C head kernels: " + rep["native"]["isa"] in doctor.format_report(rep)
    monkeypatch.setenv(native.ENV, "off")
    rep = doctor.collect()
    assert rep["native"]["isa"] is None
    assert "C head kernels: not used (PDDNET_NATIVE=off)" in doctor.format_report(rep)
