"""The reference ops of pddnet.model.ops against independent references.

Independent references: numpy brute-force formulas (min-convolution, lower envelope of
parabolas, trilinear interpolation written out by hand), PyTorch's own pooling and
``grid_sample`` used per displacement, and gradcheck in float64.

Not tested here: the ONNX bodies and Triton kernels of these ops (tests/graph/test_op_functions.py,
tests/backends/test_kernels.py) and the network end to end (tests/model/test_model.py).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pddnet.model import ops


@pytest.fixture
def rng():
    return np.random.default_rng()


# ------------------------------------------------------------------ sampling

def trilinear_numpy(vol: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Hand-written trilinear interpolation of ``vol (C,I,J,K)`` at normalised points ``(P,3)``."""
    shape = np.array(vol.shape[1:])
    v = ((p + 1.0) * shape - 1.0) / 2.0
    v = np.clip(v, 0, shape - 1)
    out = np.zeros((vol.shape[0], len(p)))
    for n, (x, y, z) in enumerate(v):
        x0, y0, z0 = int(np.floor(x)), int(np.floor(y)), int(np.floor(z))
        acc = 0.0
        for dx, dy, dz in itertools.product((0, 1), repeat=3):
            xi, yi, zi = min(x0 + dx, shape[0] - 1), min(y0 + dy, shape[1] - 1), min(z0 + dz, shape[2] - 1)
            w = ((x - x0) if dx else (1 - (x - x0))) * ((y - y0) if dy else (1 - (y - y0))) \
                * ((z - z0) if dz else (1 - (z - z0)))
            acc = acc + w * vol[:, xi, yi, zi]
        out[:, n] = acc
    return out


@pytest.mark.parametrize("shape", [(5, 7, 6), (9, 4, 11)])
def test_grid_sample3d_matches_hand_trilinear(rng, shape):
    vol = rng.normal(size=(3, *shape))
    pts = rng.uniform(-1.3, 1.3, size=(40, 3))  # includes points outside: border padding
    got = ops.grid_sample3d(torch.from_numpy(vol)[None], torch.from_numpy(pts)[None])[0].numpy()
    np.testing.assert_allclose(got, trilinear_numpy(vol, pts), atol=1e-10)


def test_grid_sample3d_axis_order(rng):
    """A point moved along array axis 0 samples along axis 0 (coordinates are (i, j, k))."""
    vol = np.zeros((1, 8, 8, 8))
    vol[0, :, 3, 5] = np.arange(8)  # a ramp along axis 0 only
    centre = np.array([(2 * v + 1) / 8 - 1 for v in (2, 3, 5)])
    step = np.array([2 / 8, 0, 0])
    pts = np.stack([centre, centre + step, centre + 2.5 * step])
    got = ops.grid_sample3d(torch.from_numpy(vol)[None], torch.from_numpy(pts)[None])[0, 0].numpy()
    np.testing.assert_allclose(got, [2.0, 3.0, 4.5], atol=1e-12)


def test_interp_weights_rows_are_linear_interpolation(rng):
    n = 7
    pos = torch.from_numpy(rng.uniform(-1.2, 1.2, size=30))
    w = ops.interp_weights(pos, n).numpy()
    np.testing.assert_allclose(w.sum(1), 1.0, atol=1e-12)
    assert (np.count_nonzero(w > 0, axis=1) <= 2).all()
    sig = rng.normal(size=n)
    expect = trilinear_numpy(np.broadcast_to(sig[None, :, None, None], (1, n, 1, 1)).copy(),
                             np.stack([pos.numpy(), np.zeros(30), np.zeros(30)], 1))[0]
    np.testing.assert_allclose(w @ sig, expect, atol=1e-12)


def test_lattice_sample_equals_pointwise_sampling(rng):
    x = torch.from_numpy(rng.normal(size=(1, 2, 6, 5, 7)))
    pos = [torch.from_numpy(rng.uniform(-1.1, 1.1, size=(3, n))) for n in (4, 3, 5)]
    got = ops.lattice_sample(x, *pos)  # (1, 2, 3, 4, 3, 5)
    for s in range(3):
        grid = torch.stack(torch.meshgrid(pos[0][s], pos[1][s], pos[2][s], indexing="ij"), -1)
        ref = ops.grid_sample3d(x, grid[None])
        torch.testing.assert_close(got[:, :, s], ref, atol=1e-12, rtol=0)


def test_deformable_sample_matches_authors_grid_sample(rng):
    """OBELISK sampling equals grid_sample on the shifted grid, channel order (c, s)."""
    x = torch.from_numpy(rng.normal(size=(1, 4, 8, 6, 10)))
    offsets = torch.from_numpy(rng.normal(scale=0.1, size=(5, 3)))
    out_shape = (5, 4, 7)
    got = ops.deformable_sample(x, offsets, out_shape)
    base = ops.identity_grid(out_shape, dtype=torch.float64).reshape(1, 1, -1, 1, 3)
    grid = (base + offsets.view(1, -1, 1, 1, 3)).flip(-1)  # the authors' layout, (k, j, i)
    ref = F.grid_sample(x, grid, padding_mode="border", align_corners=False).reshape(1, -1, *out_shape)
    torch.testing.assert_close(got, ref, atol=1e-12, rtol=0)


# ------------------------------------------------------------------ correlation

def test_correlation_matches_direct_loop(rng):
    """Against a loop over displacements, each sampled with grid_sample at x_k + d."""
    shape, grid, L, q = (7, 6, 8), (3, 4, 2), 3, 0.35
    ff = torch.from_numpy(rng.normal(size=(1, 5, *shape)))
    fm = torch.from_numpy(rng.normal(size=(1, 5, *shape)))
    got = ops.correlation(ff, fm, grid, L, q, max_elems=200)  # forces several slabs
    ctrl = ops.identity_grid(grid, dtype=torch.float64)
    f = ops.grid_sample3d(ff, ctrl[None])[0]
    steps = np.linspace(-q, q, L)
    for a, b, c in itertools.product(range(L), repeat=3):
        d = torch.tensor([steps[a], steps[b], steps[c]], dtype=torch.float64)
        m = ops.grid_sample3d(fm, (ctrl + d)[None])[0]
        ref = (f - m).square().sum(0)
        torch.testing.assert_close(got[..., a, b, c], ref, atol=1e-10, rtol=1e-10)


def test_correlation_gradcheck(rng):
    ff = torch.from_numpy(rng.normal(size=(1, 2, 4, 5, 3))).requires_grad_()
    fm = torch.from_numpy(rng.normal(size=(1, 2, 4, 5, 3))).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: ops.correlation(a, b, (2, 2, 2), 3, 0.3), (ff, fm))


# ------------------------------------------------------------------ min-convolution

def minconv_exact_bruteforce_3d(x: np.ndarray, p: float) -> np.ndarray:
    """Direct (non-separable) definition: min over all d' of x(d') + p ||d - d'||^2."""
    L = x.shape[-1]
    d = np.stack(np.meshgrid(*[np.arange(L)] * 3, indexing="ij"), -1).reshape(-1, 3)
    dist = ((d[:, None, :] - d[None, :, :]) ** 2).sum(-1)  # (out, in)
    flat = x.reshape(-1, L ** 3)
    return (flat[:, None, :] + p * dist[None]).min(-1).reshape(x.shape)


def lower_envelope_1d(f: np.ndarray, p: float) -> np.ndarray:
    """Felzenszwalb & Huttenlocher's O(n) distance transform of ``f`` with cost p (q - x)^2."""
    n = len(f)
    v = np.zeros(n, dtype=int)
    z = np.full(n + 1, np.inf)
    z[0] = -np.inf
    k = 0
    for q in range(1, n):
        while True:
            s = ((f[q] + p * q * q) - (f[v[k]] + p * v[k] * v[k])) / (2 * p * (q - v[k]))
            if s <= z[k]:
                k -= 1
                continue
            break
        k += 1
        v[k], z[k], z[k + 1] = q, s, np.inf
    out = np.empty(n)
    k = 0
    for q in range(n):
        while z[k + 1] < q:
            k += 1
        out[q] = p * (q - v[k]) ** 2 + f[v[k]]
    return out


@pytest.mark.parametrize("L", [3, 5, 7])
def test_minconv_exact_matches_bruteforce_3d(rng, L):
    x = rng.normal(size=(2, 3, L, L, L)) * 3
    p = float(rng.uniform(0.2, 2.0))
    got = ops.minconv_exact(torch.from_numpy(x), p).numpy()
    np.testing.assert_allclose(got, minconv_exact_bruteforce_3d(x, p), atol=1e-12)


def test_minconv_exact_matches_lower_envelope(rng):
    L, p = 9, float(rng.uniform(0.1, 1.5))
    x = rng.normal(size=(L, L, L)) * 4
    ref = x.copy()
    for axis in range(3):
        ref = np.apply_along_axis(lower_envelope_1d, axis, ref, p)
    got = ops.minconv_exact(torch.from_numpy(x), p).numpy()
    np.testing.assert_allclose(got, ref, atol=1e-10)


def test_minconv_approx_matches_pooling_definition(rng):
    """min-pool (k3, s1, replicate pad) then two avg-pools (k3, s1) after replicate pad 2."""
    x = torch.from_numpy(rng.normal(size=(4, 3, 7, 7, 7)))
    v = x.reshape(-1, 1, 7, 7, 7)
    m = -F.max_pool3d(F.pad(-v, (1,) * 6, mode="replicate"), 3, stride=1)
    ref = F.avg_pool3d(F.avg_pool3d(F.pad(m, (2,) * 6, mode="replicate"), 3, 1), 3, 1)
    torch.testing.assert_close(ops.minconv_approx(x), ref.reshape(x.shape), atol=1e-12, rtol=0)


def test_minpool_equals_maxpool_with_implicit_padding(rng):
    x = torch.from_numpy(rng.normal(size=(5, 6, 4, 9)))
    ref = -F.max_pool3d(-x.reshape(-1, 1, 6, 4, 9), 3, stride=1, padding=1).reshape(x.shape)
    torch.testing.assert_close(ops.minpool3(x), ref, atol=0, rtol=0)


def test_smoothing_matrix_interior_weights():
    m = ops.smoothing_matrix(9, dtype=torch.float64).numpy()
    np.testing.assert_allclose(m[4, 2:7], np.array([1, 2, 3, 2, 1]) / 9, atol=1e-15)
    np.testing.assert_allclose(m.sum(1), 1.0, atol=1e-14)
    # replicate padding by 2: the first output averages x0 with weight (1+2+3)/9 + ...
    np.testing.assert_allclose(m[0, :3], [6 / 9, 2 / 9, 1 / 9], atol=1e-15)


def test_smooth_grid_acts_on_grid_axes_only(rng):
    cost = torch.from_numpy(rng.normal(size=(5, 4, 6, 3, 3, 3)))
    got = ops.smooth_grid(cost)
    v = cost.permute(3, 4, 5, 0, 1, 2).reshape(27, 1, 5, 4, 6)
    ref = F.avg_pool3d(F.avg_pool3d(F.pad(v, (2,) * 6, mode="replicate"), 3, 1), 3, 1)
    torch.testing.assert_close(got, ref.reshape(3, 3, 3, 5, 4, 6).permute(3, 4, 5, 0, 1, 2),
                               atol=1e-12, rtol=0)


@pytest.mark.parametrize("mode", ["approx", "exact"])
def test_mean_field_step_gradcheck(rng, mode):
    cost = torch.from_numpy(rng.normal(size=(3, 2, 3, 3, 3, 3))).requires_grad_()
    pen = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda c, p: ops.mean_field_step(c, mode, p), (cost, pen))


def test_lattice_sample_gradcheck_in_positions(rng):
    x = torch.from_numpy(rng.normal(size=(1, 2, 5, 4, 6))).requires_grad_()
    pos = [torch.from_numpy(rng.uniform(-0.8, 0.8, size=(2, n))).requires_grad_() for n in (3, 2, 3)]
    assert torch.autograd.gradcheck(ops.lattice_sample, (x, *pos))


# ------------------------------------------------------------------ probabilities and warping

def test_expected_displacement_of_peaked_distribution(rng):
    L, q = 5, 0.4
    cost = torch.from_numpy(rng.uniform(1, 2, size=(2, 2, 2, L, L, L)))
    cost[1, 0, 1, 3, 1, 4] = -50.0  # a sharp minimum at lattice index (3, 1, 4)
    probs = ops.displacement_probabilities(cost, 1.0)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 2, 2, dtype=torch.float64))
    disp = ops.expected_displacement(probs, L, q)
    steps = np.linspace(-q, q, L)
    np.testing.assert_allclose(disp[1, 0, 1].numpy(), [steps[3], steps[1], steps[4]], atol=1e-12)


def test_zero_field_warp_is_identity(rng):
    img = torch.from_numpy(rng.normal(size=(1, 1, 6, 7, 5)))
    out = ops.warp(img, torch.zeros(6, 7, 5, 3, dtype=torch.float64))
    torch.testing.assert_close(out, img, atol=1e-12, rtol=0)


def test_known_translation_moves_blob(rng):
    shape = (20, 18, 22)
    img = torch.zeros(1, 1, *shape, dtype=torch.float64)
    img[0, 0, 8:11, 6:9, 12:15] = 1.0
    shift = np.array([3, -2, 4])
    disp = torch.from_numpy(np.broadcast_to(shift, (*shape, 3)).astype(np.float64).copy())
    out = ops.warp(img, disp)  # warped(x) = moving(x + u): the blob moves by -u
    expect = torch.zeros_like(img)
    expect[0, 0, 5:8, 8:11, 8:11] = 1.0
    torch.testing.assert_close(out, expect, atol=1e-12, rtol=0)


def test_upsampled_constant_field_in_voxels(rng):
    grid_field = torch.zeros(4, 4, 4, 3, dtype=torch.float64)
    grid_field[...] = torch.tensor([0.1, -0.2, 0.05], dtype=torch.float64)
    dense = ops.dense_displacement(grid_field, (20, 10, 40))
    np.testing.assert_allclose(dense[3, 4, 5].numpy(), [0.1 * 10, -0.2 * 5, 0.05 * 20], atol=1e-12)
