"""The `features` refinement loop in C (``pddnet.backends.native.feature_refine``, issue 13)
against the numpy float64 loop (:func:`pddnet.runtime.refine.feature_loop_numpy`) on fresh
random inputs of odd sizes (an axis of 2, k = 1..4, fields that sample past the border); the
thread count not changing the numbers; ``feature_optimise`` choosing C where the library is built
and numpy under ``PDDNET_NATIVE=off``, and recording which ran; clear errors.

Not tested here: speed (docs/benchmarks.md, "Refinement on image evidence (issue 13)"); the
numpy loop against PyTorch (tests/model/test_refine_features.py, which now runs the C loop by
default too).
"""

from __future__ import annotations

import numpy as np
import pytest

from pddnet.backends import native
from pddnet.errors import PddnetError
from pddnet.runtime import refine as R
from pddnet.spec.refine import RefineOptions

built = pytest.mark.skipif(not native.status()["built"],
                           reason="the C kernel library is not built")

#: feature grid and k: odd sizes, an axis of 2, k = 1..4, and one k above the specialised ones
CASES = [((5, 2, 7), 1), ((9, 6, 11), 3), ((7, 11, 3), 2), ((2, 5, 4), 4), ((6, 7, 5), 6)]


def _case(rng, shape, k, scale=0.3):
    c = k + int(rng.integers(0, 3))
    f = rng.standard_normal((c, *shape)) * rng.uniform(0.5, 2.0, (c, 1, 1, 1))
    m = 0.6 * f + 0.8 * rng.standard_normal(f.shape)
    sampler = R.FeatureSampler(*R.feature_inputs(f, m, k))
    # large enough that many samples leave the grid (clamping, zero slope at the border)
    theta = rng.normal(0.0, scale, (*shape, 3))
    return f, m, sampler, theta


def _opts(rng, k, steps=25):
    return RefineOptions(steps=steps, lr=float(rng.uniform(0.005, 0.05)),
                         weight=float(rng.uniform(0.1, 5.0)), components=k)


def _c(sampler, theta, opts, threads=1):
    return native.feature_refine(sampler.fixed, sampler.moving, theta, steps=opts.steps,
                                 lr=opts.lr, betas=opts.betas, eps=opts.eps, weight=opts.weight,
                                 threads=threads)


@built
@pytest.mark.parametrize("shape,k", CASES, ids=lambda x: str(x))
def test_c_loop_equals_the_numpy_loop(shape, k):
    rng = np.random.default_rng()
    _, _, sampler, theta = _case(rng, shape, k)
    opts = _opts(rng, k)
    u_np, e_np, d_np = R.feature_loop_numpy(sampler, theta, opts)
    u_c, e_c, d_c = _c(sampler, theta, opts)
    assert u_c.shape == u_np.shape == (*shape, 3) and u_c.dtype == np.float64
    np.testing.assert_allclose(u_c, u_np, rtol=0, atol=1e-9 * np.abs(u_np).max())
    np.testing.assert_allclose(e_c, e_np, rtol=1e-9)
    np.testing.assert_allclose(d_c, d_np, rtol=1e-9)
    assert e_c[1] < e_c[0]  # the loop did optimise
    assert np.abs(u_c - R.smooth(theta)).max() > 1e-3


@built
def test_threads_do_not_change_the_numbers_and_theta_is_not_modified():
    rng = np.random.default_rng()
    _, _, sampler, theta = _case(rng, (9, 8, 10), 4)
    opts = _opts(rng, 4, steps=10)
    keep = theta.copy()
    one = _c(sampler, theta, opts, threads=1)
    three = _c(sampler, theta, opts, threads=3)
    np.testing.assert_array_equal(one[0], three[0])
    assert one[1] == three[1] and one[2] == three[2]
    np.testing.assert_array_equal(theta, keep)


@built
def test_zero_steps_is_the_smoothed_start():
    rng = np.random.default_rng()
    _, _, sampler, theta = _case(rng, (5, 2, 7), 2)
    opts = _opts(rng, 2, steps=0)
    u, e, d = _c(sampler, theta, opts)
    np.testing.assert_allclose(u, R.smooth(theta), rtol=0, atol=1e-14)
    want = R.feature_energy(theta, sampler, opts.weight)
    assert e[0] == e[1] and e[0] == pytest.approx(want[0], rel=1e-12)
    assert d[0] == d[1] and d[0] == pytest.approx(want[1], rel=1e-12)


@built
def test_feature_optimise_runs_c_where_built_and_numpy_when_off(monkeypatch):
    rng = np.random.default_rng()
    shape, grid = (7, 2, 9), (3, 2, 4)
    f, m, _, _ = _case(rng, shape, 3)
    g = rng.normal(0.0, 0.1, (*grid, 3))
    opts = RefineOptions(steps=15, components=3)
    monkeypatch.delenv(native.ENV, raising=False)
    c = R.feature_optimise(f[None].astype(np.float32), m[None].astype(np.float32), g, opts)
    assert c.impl == "c" and c.describe()["impl"] == "c" and "impl_reason" not in c.describe()
    monkeypatch.setenv(native.ENV, "avx2")  # a kernel-set choice still runs the (ISA-free) loop
    assert R.feature_optimise(f, m, g, opts).impl == "c"
    monkeypatch.setenv(native.ENV, "off")
    n = R.feature_optimise(f[None].astype(np.float32), m[None].astype(np.float32), g, opts)
    assert n.impl == "numpy" and n.describe()["impl"] == "numpy"
    assert "PDDNET_NATIVE=off" in n.describe()["impl_reason"]
    np.testing.assert_allclose(c.grid_disp, n.grid_disp, rtol=0, atol=1e-6)
    np.testing.assert_allclose(c.energy, n.energy, rtol=1e-9)
    np.testing.assert_allclose(c.data, n.data, rtol=1e-9)
    with pytest.raises(PddnetError, match="C refinement cannot run.*off"):
        R.feature_optimise(f, m, g, opts, impl="c")
    monkeypatch.delenv(native.ENV)
    assert R.feature_optimise(f, m, g, opts, impl="numpy").impl == "numpy"
    with pytest.raises(PddnetError, match="impl must be"):
        R.feature_optimise(f, m, g, opts, impl="fortran")


def test_probs_method_reports_numpy():
    rng = np.random.default_rng()
    L, grid = 5, (3, 2, 3)
    p = rng.uniform(size=(*grid, L ** 3))
    res = R.instance_optimise(p / p.sum(-1, keepdims=True), rng.normal(0, 0.05, (*grid, 3)), L,
                              0.3, RefineOptions(method="probs", steps=2))
    assert res.describe()["impl"] == "numpy" and "impl_reason" not in res.describe()


@built
def test_feature_refine_rejects_bad_arguments():
    rng = np.random.default_rng()
    _, _, s, theta = _case(rng, (4, 3, 5), 2)
    kw = {"steps": 2, "lr": 0.01, "weight": 1.0}
    with pytest.raises(PddnetError, match="theta must be"):
        native.feature_refine(s.fixed, s.moving, theta[..., :2], **kw)
    with pytest.raises(PddnetError, match="features must both be"):
        native.feature_refine(s.fixed[:-1], s.moving[:-1], theta, **kw)
    with pytest.raises(PddnetError, match="features must both be"):
        native.feature_refine(s.fixed, s.moving[:, :1], theta, **kw)
    with pytest.raises(PddnetError, match="needs >= 2 points"):
        native.feature_refine(s.fixed[:15], s.moving[:15], theta[:1], **kw)
    with pytest.raises(PddnetError, match="steps must be"):
        native.feature_refine(s.fixed, s.moving, theta, **{**kw, "steps": -1})
