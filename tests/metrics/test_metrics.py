"""Tests for pddnet.metrics (Learn2Reg metric definitions).

What is tested: hand-computed Dice of boxes, identical/disjoint maps, absent labels -> NaN and
skipped; DSC30 against np.percentile; HD95 of offset boxes (exact) and offset spheres (analytic,
within one voxel of surfel discretisation), symmetry, lost/absent labels, spacing; surfel areas
of hand-derived marching-cubes configurations; the Jacobian determinant of zero, linear
(det(I + A) exactly) and folding fields, its channel/axis order; SDlogJ formula and its zero on
affine fields; pair_metrics bundling and JSON; latency statistics; input validation raising
PddnetError.

Not tested here: agreement with the official Learn2Reg evaluation and DeepMind surface-distance
code themselves (they are not dependencies of this project; the match on all 256 surfel codes,
on random label maps with anisotropic spacing and on random fields was checked once by hand
against the official definitions when this module was written, see its commit message);
real challenge data; the speed on full-size volumes (measured separately, not asserted).
"""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest

from pddnet import metrics as M
from pddnet._files import jsonable
from pddnet.errors import PddnetError


@pytest.fixture
def rng():
    return np.random.default_rng()


def _box(shape, lo, hi, value=1, dtype=np.uint8):
    a = np.zeros(shape, dtype)
    a[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = value
    return a


def _random_labels(rng, shape=(20, 18, 22), n_labels=5):
    return rng.integers(0, n_labels + 1, size=shape).astype(np.uint8)


# ------------------------------------------------------------------------------------- Dice
def test_dice_two_known_boxes(rng):
    shape = (30, 28, 26)
    # random box sizes and a random offset along axis 0; overlap counted by hand
    s = rng.integers(6, 12, size=3)
    lo = rng.integers(2, 6, size=3)
    off = int(rng.integers(1, s[0]))
    fixed = _box(shape, lo, lo + s, 3)
    lo2 = lo.copy()
    lo2[0] += off
    warped = _box(shape, lo2, lo2 + s, 3)
    moving = fixed.copy()
    vol = int(np.prod(s))
    inter = (s[0] - off) * s[1] * s[2]
    expected = 2 * inter / (2 * vol)
    d = M.dice_per_label(fixed, moving, warped)
    assert list(d) == [3]
    assert d[3] == pytest.approx(expected, rel=1e-12)
    assert M.mean_dice(fixed, moving, warped) == pytest.approx(expected, rel=1e-12)


def test_dice_against_bruteforce(rng):
    fixed = _random_labels(rng)
    moving = _random_labels(rng)
    warped = _random_labels(rng)
    d = M.dice_per_label(fixed, moving, warped)
    for l, v in d.items():
        f, w = fixed == l, warped == l
        assert v == pytest.approx(2 * (f & w).sum() / (f.sum() + w.sum()), rel=1e-12)
    assert M.mean_dice(fixed, moving, warped) == pytest.approx(np.mean(list(d.values())))


def test_dice_identical_is_one_and_disjoint_is_zero(rng):
    fixed = _random_labels(rng)
    d = M.dice_per_label(fixed, fixed, fixed.copy())
    assert d and all(v == 1.0 for v in d.values())
    assert M.mean_dice(fixed, fixed, fixed) == 1.0
    # disjoint: warped puts every label where the fixed has another one
    n = int(fixed.max())
    warped = np.where(fixed > 0, fixed % n + 1, 0).astype(np.uint8)
    d = M.dice_per_label(fixed, fixed, warped)
    assert all(v == 0.0 for v in d.values())
    # a label lost by the warp scores 0, not NaN
    d = M.dice_per_label(fixed, fixed, np.zeros_like(fixed))
    assert all(v == 0.0 for v in d.values())


def test_dice_absent_label_is_nan_and_skipped(rng):
    shape = (16, 16, 16)
    fixed = _box(shape, (2, 2, 2), (8, 8, 8), 1)
    fixed[10:14, 10:14, 10:14] = 2
    moving = fixed.copy()
    moving[moving == 2] = 0          # label 2 absent from the moving map -> NaN
    moving[1:3, 1:3, 1:3] = 5        # label 5 absent from the fixed map -> NaN
    warped = fixed.copy()
    warped[2:4] = 0                  # some loss on label 1
    d = M.dice_per_label(fixed, moving, warped)
    assert sorted(d) == [1, 2, 5]
    assert math.isnan(d[2]) and math.isnan(d[5])
    f1, w1 = fixed == 1, warped == 1
    exp1 = 2 * (f1 & w1).sum() / (f1.sum() + w1.sum())
    assert d[1] == pytest.approx(exp1)
    assert M.mean_dice(fixed, moving, warped) == pytest.approx(exp1)
    # explicit labels: a label in neither map is NaN too; all-NaN mean is NaN (no warning)
    d = M.dice_per_label(fixed, moving, warped, labels=[7, 1])
    assert list(d) == [1, 7] and math.isnan(d[7])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert math.isnan(M.mean_dice(fixed, moving, warped, labels=[2, 9]))


def test_dice_large_and_negative_labels_fall_back(rng):
    fixed = rng.choice(np.array([0, 2035, -4, 1_500_000], np.int64), size=(10, 11, 12))
    warped = fixed.copy()
    warped[:3] = 0
    d = M.dice_per_label(fixed, fixed, warped)
    assert sorted(d) == [-4, 2035, 1_500_000]
    for l, v in d.items():
        f, w = fixed == l, warped == l
        assert v == pytest.approx(2 * (f & w).sum() / (f.sum() + w.sum()))


# ------------------------------------------------------------------------------------- DSC30
def test_dsc30_matches_percentile(rng):
    vals = rng.uniform(0.2, 0.9, size=int(rng.integers(5, 40)))
    assert M.dsc30(vals) == pytest.approx(np.percentile(vals, 30))
    assert M.dsc30(list(vals)) == pytest.approx(np.quantile(vals, 0.3))
    with pytest.raises(PddnetError, match="dsc30"):
        M.dsc30([])


# ------------------------------------------------------------------------------------- latency
def test_latency_stats(rng):
    s = rng.uniform(0.01, 0.05, size=50)
    st = M.latency_stats(s, warmup=5)
    used = s[5:] * 1000
    assert st["n"] == 45 and st["warmup"] == 5
    for k, q in (("p50_ms", 50), ("p95_ms", 95), ("p99_ms", 99)):
        assert st[k] == pytest.approx(np.percentile(used, q))
    assert st["mean_ms"] == pytest.approx(used.mean())
    assert st["min_ms"] == pytest.approx(used.min()) and st["max_ms"] == pytest.approx(used.max())
    json.dumps(st)
    with pytest.raises(PddnetError, match="latency_stats"):
        M.latency_stats(s[:3], warmup=3)
    with pytest.raises(PddnetError, match="latency_stats"):
        M.latency_stats([0.1, float("nan")])
    with pytest.raises(PddnetError, match="latency_stats"):
        M.latency_stats(s, warmup=-1)


# ------------------------------------------------------------------------------------- inputs
def test_label_inputs_validated(rng):
    a = _random_labels(rng)
    with pytest.raises(PddnetError, match=r"dice_per_label.*shape"):
        M.dice_per_label(a, a, a[:-1])
    with pytest.raises(PddnetError, match=r"dice_per_label.*dtype.*float"):
        M.dice_per_label(a, a, a.astype(np.float32))
    with pytest.raises(PddnetError, match=r"mean_dice.*3-D"):
        M.mean_dice(a[0], a[0], a[0])
    with pytest.raises(PddnetError, match=r"numpy array"):
        M.dice_per_label(a.tolist(), a, a)
    with pytest.raises(PddnetError, match=r"labels"):
        M.dice_per_label(a, a, a, labels=[1.5, 2.0])


# ------------------------------------------------------------------------------------- HD95
def test_hd95_offset_boxes_exact(rng):
    """Box shifted by k voxels along one axis: every surfel of the face that leads is exactly k
    away and no surfel is farther, so the 95th percentile is k (k * spacing with spacing)."""
    shape = (34, 32, 36)
    for axis in range(3):
        s = rng.integers(7, 12, size=3)
        lo = rng.integers(3, 8, size=3)
        k = int(rng.integers(1, 4))
        a = _box(shape, lo, lo + s, 4)
        lo2 = lo.copy()
        lo2[axis] += k
        b = _box(shape, lo2, lo2 + s, 4)
        assert M.hd95_per_label(a, a, b) == {4: float(k)}
        assert M.mean_hd95(a, a, b) == float(k)
        sp = rng.uniform(0.5, 2.5, size=3)
        assert M.hd95_per_label(a, a, b, spacing=sp)[4] == pytest.approx(k * sp[axis], rel=1e-12)


def _ball(n, centre, r):
    g = np.indices((n, n, n), dtype=np.float64)
    return ((((g - np.asarray(centre)[:, None, None, None]) ** 2).sum(0)) <= r * r).astype(np.uint8)


def test_hd95_offset_spheres_analytic(rng):
    """Two balls of radius r offset by v: the distance from a point of one sphere to the other is
    | |r n - v| - r | with cos(n, v) uniform on [-1, 1] (Archimedes), whose 95th percentile we
    evaluate numerically; voxelisation moves it by less than one voxel."""
    n = 40
    c = np.linspace(-1.0, 1.0, 200001)
    for _ in range(3):
        r = rng.uniform(8, 13)
        v = rng.normal(size=3)
        v *= rng.uniform(1.5, 5) / np.linalg.norm(v)
        c1 = np.full(3, n / 2) + rng.uniform(-1, 1, 3) - v / 2
        a, b = _ball(n, c1, r), _ball(n, c1 + v, r)
        vn = np.linalg.norm(v)
        expected = np.percentile(np.abs(np.sqrt(r * r + vn * vn - 2 * r * vn * c) - r), 95)
        got = M.hd95_per_label(a, a, b)[1]
        assert abs(got - expected) < 1.0, (got, expected)
        assert got <= vn + 1.0  # never above the plain Hausdorff distance (plus discretisation)


def test_hd95_symmetric_and_consistent(rng):
    from scipy import ndimage

    shape = (24, 22, 26)
    f = ndimage.gaussian_filter(rng.normal(size=shape), 2.0)
    g = ndimage.gaussian_filter(rng.normal(size=shape), 2.0)
    q = np.quantile(f, [0.5, 0.75, 0.9])
    a = np.digitize(f, q).astype(np.uint8)
    b = np.digitize(0.6 * f + 0.4 * g * f.std() / g.std(), q).astype(np.uint8)
    sp = tuple(rng.uniform(0.6, 2.0, size=3))
    hab = M.hd95_per_label(a, a, b, spacing=sp)
    hba = M.hd95_per_label(b, b, a, spacing=sp)
    assert hab.keys() == hba.keys() == {1, 2, 3}
    for l in hab:
        assert hab[l] == pytest.approx(hba[l], rel=1e-12)
        assert 0 < hab[l] < np.linalg.norm(np.multiply(shape, sp))
    assert M.hd95_per_label(a, a, a) == {1: 0.0, 2: 0.0, 3: 0.0}
    # bool masks and other integer dtypes give the same answer
    assert M.hd95_per_label(a == 2, a == 2, b == 2, spacing=sp)[1] == pytest.approx(hab[2])
    assert M.hd95_per_label(a.astype(np.int64), a.astype(np.int16), b.astype(np.int32),
                            spacing=sp) == hab


def test_hd95_absent_and_lost_labels(rng):
    shape = (20, 20, 20)
    fixed = _box(shape, (2, 2, 2), (9, 9, 9), 1)
    fixed[12:18, 12:18, 12:18] = 2
    moving = fixed.copy()
    moving[moving == 2] = 0                    # label 2 absent from moving -> NaN, skipped
    warped = np.roll(fixed, int(rng.integers(1, 3)), axis=int(rng.integers(0, 3)))
    h = M.hd95_per_label(fixed, moving, warped)
    assert math.isnan(h[2]) and math.isfinite(h[1])
    assert M.mean_hd95(fixed, moving, warped) == h[1]
    lost = np.where(warped == 1, 0, warped).astype(np.uint8)   # the warp lost label 1
    assert M.hd95_per_label(fixed, fixed, lost)[1] == math.inf
    assert M.mean_hd95(fixed, fixed, lost) == math.inf
    with pytest.raises(PddnetError, match=r"hd95_per_label.*spacing"):
        M.hd95_per_label(fixed, fixed, warped, spacing=(1, 0, 1))
    with pytest.raises(PddnetError, match=r"mean_hd95.*shape"):
        M.mean_hd95(fixed, fixed, warped[:, :-1])


def test_surfel_areas_hand_derived(rng):
    """Marching-cubes areas (edge-midpoint vertices) derived by hand for a unit cube."""
    table = M._surfel_area_table((1.0, 1.0, 1.0))
    bit = {cn: 1 << i for i, cn in enumerate(M._CORNERS)}
    code = lambda *cs: sum(bit[c] for c in cs)  # noqa: E731
    r3 = math.sqrt(3)
    assert table[0] == 0 and table[255] == 0
    assert table[code((0, 0, 0))] == pytest.approx(r3 / 8)                       # corner
    assert table[code((0, 0, 0), (0, 0, 1))] == pytest.approx(math.sqrt(2) / 2)   # edge
    assert table[code((1, 0, 0), (1, 0, 1), (1, 1, 0), (1, 1, 1))] == pytest.approx(1.0)  # face
    # three corners in an L on a face: right triangle 1/2 plus the planar quad folded off it
    assert table[code((1, 0, 0), (1, 0, 1), (1, 1, 0))] == pytest.approx(0.5 + r3 / 4 + r3 / 8)
    # a corner and its three neighbours: regular hexagon of side sqrt(2)/2
    assert table[code((0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1))] == pytest.approx(3 * r3 / 4)
    # two diagonal corners of a face stay separate: two corner triangles
    assert table[code((0, 0, 0), (0, 1, 1))] == pytest.approx(r3 / 4)
    # complement symmetry
    for c in rng.integers(0, 256, size=20):
        assert table[c] == table[255 - c]
    # spacing: a face perpendicular to axis 0 scales with s1 * s2 only
    sp = tuple(rng.uniform(0.5, 2.0, size=3))
    t2 = M._surfel_area_table(sp)
    assert t2[code((1, 0, 0), (1, 0, 1), (1, 1, 0), (1, 1, 1))] == pytest.approx(sp[1] * sp[2])
    # a single voxel: 8 corners, each one corner triangle
    one = np.zeros((3, 3, 3), bool)
    one[1, 1, 1] = True
    codes = M._neighbour_codes(one)
    assert table[codes].sum() == pytest.approx(r3)
    # a large ball's surfel area is close to 4 pi r'^2, r' = r + 1/2: the surface passes half
    # way between the inside and outside voxel centres
    r = 14.0
    ball = _ball(34, (17.0, 17.0, 17.0), r).astype(bool)
    area = table[M._neighbour_codes(ball)].sum()
    assert area == pytest.approx(4 * math.pi * (r + 0.5) ** 2, rel=0.03)


# ------------------------------------------------------------------------------------- Jacobian
def _linear_field(shape, A, t=(0.0, 0.0, 0.0), dtype=np.float64):
    """u_c(x) = sum_a A[c, a] x_a + t_c, channel last."""
    g = np.indices(shape, dtype=np.float64)
    u = np.einsum("ca,a...->...c", A, g) + np.asarray(t)
    return u.astype(dtype)


def test_jacobian_zero_field_is_one(rng):
    shape = tuple(int(v) for v in rng.integers(6, 14, size=3))
    jac = M.jacobian_determinant(np.zeros(shape + (3,), np.float32))
    assert jac.shape == tuple(n - 4 for n in shape)
    assert np.all(jac == 1.0)
    # a constant translation too
    jac = M.jacobian_determinant(np.broadcast_to(rng.normal(size=3) * 5, shape + (3,)).copy())
    assert np.allclose(jac, 1.0, atol=1e-12)


def test_jacobian_linear_field_is_det_I_plus_A(rng):
    shape = (11, 9, 13)
    for _ in range(5):
        A = rng.normal(scale=0.3, size=(3, 3))
        u = _linear_field(shape, A, rng.normal(size=3) * 3)
        expected = np.linalg.det(np.eye(3) + A)
        jac = M.jacobian_determinant(u)
        assert jac.shape == (7, 5, 9)
        np.testing.assert_allclose(jac, expected, rtol=1e-10, atol=1e-12)
        # float32 fields: same up to float32 rounding of the field values
        np.testing.assert_allclose(M.jacobian_determinant(u.astype(np.float32)), expected,
                                   atol=1e-4)
        assert M.sdlogj(u) == pytest.approx(0.0, abs=1e-12)
        assert M.folding_percent(u) == (100.0 if expected <= 0 else 0.0)


def test_jacobian_axis_order(rng):
    """Channel a is the displacement along array axis a: a stretch of axis 0 carried by channel
    0 scales volume by (1 + s); the same values in channel 1 are a shear (det 1); and a
    Learn2Reg channel-first field converts with np.moveaxis(d, 0, -1)."""
    shape = (12, 10, 14)
    s = float(rng.uniform(0.2, 0.8))
    g0 = np.indices(shape, dtype=np.float64)[0]
    u = np.zeros(shape + (3,))
    u[..., 0] = s * g0
    np.testing.assert_allclose(M.jacobian_determinant(u), 1 + s, rtol=1e-12)
    np.testing.assert_allclose(M.jacobian_determinant(u[..., [1, 0, 2]]), 1.0, rtol=1e-12)
    np.testing.assert_allclose(M.jacobian_determinant(u[..., [2, 1, 0]]), 1.0, rtol=1e-12)
    # stretch along axis 2 in channel 2
    w = np.zeros(shape + (3,))
    w[..., 2] = s * np.indices(shape, dtype=np.float64)[2]
    np.testing.assert_allclose(M.jacobian_determinant(w), 1 + s, rtol=1e-12)
    # random non-symmetric A: transposing the matrix is not the same field, but permuting
    # channels and axes together is
    A = rng.normal(scale=0.3, size=(3, 3))
    f = _linear_field(shape, A)
    channel_first = np.moveaxis(f, -1, 0)             # the Learn2Reg (3, i, j, k) layout
    np.testing.assert_allclose(M.jacobian_determinant(np.moveaxis(channel_first, 0, -1)),
                               np.linalg.det(np.eye(3) + A), rtol=1e-10)
    perm = [2, 0, 1]
    permuted = np.transpose(f, perm + [3])[..., perm]  # relabel axes and channels consistently
    np.testing.assert_allclose(M.jacobian_determinant(permuted), np.linalg.det(np.eye(3) + A),
                               rtol=1e-10)
    with pytest.raises(PddnetError, match=r"jacobian_determinant.*\(i, j, k, 3\)"):
        M.jacobian_determinant(np.moveaxis(f, -1, 0)[..., :4])


def test_folding_detected(rng):
    """u_0 = a sin(2 pi x_0 / P): det = 1 + a (2 pi / P) cos(...) goes negative when
    a 2 pi / P > 1 (central differences shrink it by sin(w)/w, accounted for)."""
    shape = (30, 10, 10)
    P = float(rng.uniform(8, 12))
    w = 2 * math.pi / P
    x = np.indices(shape, dtype=np.float64)[0]
    for amp, folds in ((2.5 / w, True), (0.5 / w, False)):
        u = np.zeros(shape + (3,))
        u[..., 0] = amp * np.sin(w * x)
        u[..., 1:] = rng.normal(scale=1e-3, size=shape + (2,))
        jac = M.jacobian_determinant(u)
        expected = 1 + amp * np.sin(w) * np.cos(w * x[2:-2, 2:-2, 2:-2])  # discrete derivative
        np.testing.assert_allclose(jac, expected, atol=0.05)
        pct = M.folding_percent(u)
        assert pct == pytest.approx(100.0 * np.mean(jac <= 0))
        assert (pct > 0) == folds
        assert M.sdlogj(u) == pytest.approx(np.log(np.clip(jac + 3, 1e-9, 1e9)).std())


def test_sdlogj_formula_on_random_field(rng):
    from scipy import ndimage

    shape = (16, 14, 18)
    u = np.stack([ndimage.gaussian_filter(rng.normal(size=shape), 2) * 8 for _ in range(3)], -1)
    jac = M.jacobian_determinant(u.astype(np.float32))
    assert M.sdlogj(u.astype(np.float32)) == pytest.approx(
        float(np.log(np.clip(jac + 3.0, 1e-9, 1e9)).std()), rel=1e-12)
    assert M.sdlogj(u) > 0


def test_disp_inputs_validated(rng):
    good = rng.normal(size=(8, 8, 8, 3)).astype(np.float32)
    bad_nan = good.copy()
    bad_nan[1, 2, 3, 0] = np.nan
    with pytest.raises(PddnetError, match=r"sdlogj.*finite"):
        M.sdlogj(bad_nan)
    with pytest.raises(PddnetError, match=r"folding_percent.*shape"):
        M.folding_percent(good[..., :2])
    with pytest.raises(PddnetError, match=r"jacobian_determinant.*floating"):
        M.jacobian_determinant(good.astype(np.int32))
    with pytest.raises(PddnetError, match=r"jacobian_determinant.*5 voxels"):
        M.jacobian_determinant(good[:4])
    with pytest.raises(PddnetError, match=r"numpy array"):
        M.sdlogj(good.tolist())


# ------------------------------------------------------------------------------------- bundle
def test_pair_metrics_bundle_and_json(rng):
    from scipy import ndimage

    shape = (18, 16, 20)
    f = ndimage.gaussian_filter(rng.normal(size=shape), 1.5)
    fixed = np.digitize(f, np.quantile(f, [0.6, 0.85])).astype(np.uint8)
    moving = fixed.copy()
    moving[moving == 2] = 0          # label 2 absent from moving -> NaN in both per-label dicts
    warped = np.roll(fixed, 1, axis=2)
    disp = rng.normal(scale=0.3, size=shape + (3,)).astype(np.float32)
    pm = M.pair_metrics(fixed, moving, warped, disp)
    assert pm["labels"] == [1, 2]
    assert pm["dice_per_label"][1] == M.dice_per_label(fixed, moving, warped)[1]
    assert math.isnan(pm["dice_per_label"][2]) and math.isnan(pm["hd95_per_label"][2])
    assert pm["dice_mean"] == M.mean_dice(fixed, moving, warped)
    assert pm["hd95_mean"] == M.mean_hd95(fixed, moving, warped)
    assert pm["sdlogj"] == M.sdlogj(disp)
    assert pm["folding_percent"] == M.folding_percent(disp)
    json.dumps(pm)                                    # Python json: NaN written as NaN
    strict = json.loads(json.dumps(jsonable(pm), allow_nan=False))
    assert strict["dice_per_label"]["2"] is None and strict["hd95_per_label"]["2"] is None
    assert strict["dice_per_label"]["1"] == pytest.approx(pm["dice_per_label"][1])
    with pytest.raises(PddnetError, match=r"pair_metrics.*disp shape"):
        M.pair_metrics(fixed, moving, warped, disp[:-1])
