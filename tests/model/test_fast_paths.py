"""The fast training paths of pddnet.model against the straightforward definitions.

Each fast path (separable correlation, separable label expectation, pooled min-pooling, the
custom autograd Functions behind them, the fast training forward) is compared with the
definition it replaces on fresh random inputs in float64: values and gradients. The custom
Functions are also checked by finite differences (gradcheck).

Not tested here: the speed (scripts/bench_train.py, docs/benchmarks.md), and the definitions
themselves (tests/model/test_ops.py).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pddnet.model import losses, ops
from pddnet.model.network import PDDNet
from pddnet.model.train import Trainer, TrainOptions, forward_fast
from pddnet.spec.config import PDDConfig, preset

F64 = torch.float64


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(int(np.random.default_rng().integers(2**31)))


def _grads(out, inputs, grad):
    return torch.autograd.grad(out, inputs, grad)


# (feature shape I J K, grid, L, capture): odd shapes, control points whose displacements leave
# the volume (border clamping), a single-voxel axis, L = 3, and each axis order by size (the
# separable forms take the axes largest first)
CORR_CASES = [((9, 8, 10), (4, 3, 5), 5, 0.4), ((7, 6, 5), (3, 4, 2), 3, 0.9),
              ((12, 10, 14), (5, 5, 5), 7, 0.3), ((6, 1, 7), (3, 2, 3), 5, 0.5),
              ((5, 9, 7), (2, 4, 3), 5, 0.6)]


@pytest.mark.parametrize("shape,grid,L,q", CORR_CASES)
@pytest.mark.parametrize("max_elems", [1 << 26, 1])  # one slab; one control slice per slab
def test_correlation_separable_equals_definition(gen, shape, grid, L, q, max_elems):
    ff = torch.randn(1, 3, *shape, dtype=F64, generator=gen, requires_grad=True)
    fm = torch.randn(1, 3, *shape, dtype=F64, generator=gen, requires_grad=True)
    want = ops.correlation(ff, fm, grid, L, q)
    got = ops.correlation_separable(ff, fm, grid, L, q, max_elems=max_elems)
    assert got.shape == want.shape == (*grid, L, L, L)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    g = torch.randn(want.shape, dtype=F64, generator=gen)
    for a, b in zip(_grads(got, (ff, fm), g), _grads(want, (ff, fm), g)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-11)


def test_correlation_separable_float32_tolerance(gen):
    ff, fm = (torch.randn(1, 8, 10, 9, 12, generator=gen) for _ in range(2))
    want = ops.correlation(ff.double(), fm.double(), (5, 4, 6), 5, 0.3)
    got = ops.correlation_separable(ff, fm, (5, 4, 6), 5, 0.3)
    assert got.dtype == torch.float32
    assert ((got.double() - want).abs().max() / want.abs().max()).item() < 1e-5  # docs/ops.md


def test_correlation_separable_refuses_mismatched_features():
    with pytest.raises(Exception, match="correlation_separable"):
        ops.correlation_separable(torch.zeros(1, 2, 4, 4, 4), torch.zeros(1, 2, 4, 4, 5),
                                  (2, 2, 2), 3, 0.3)


def test_minpool_fast_path_equals_definition(gen):
    x = torch.randn(3, 4, 2, 6, 5, 7, dtype=F64, generator=gen, requires_grad=True)
    g = torch.randn(x.shape, dtype=F64, generator=gen)
    want = ops.minpool3_direct(x)
    want_grad = _grads(want, x, g)[0]
    for fn in (ops.minpool3, ops.minpool3_pooled):
        got = fn(x)
        assert torch.equal(got, want)
        torch.testing.assert_close(_grads(got, x, g)[0], want_grad, rtol=0, atol=1e-12)
    with ops.fast_gradients(False):  # the switch restores the definition's graph
        assert ops.minpool3(x).grad_fn.name() == ops.minpool3_direct(x).grad_fn.name()
    assert ops.fast_gradients_enabled()


def test_displacement_major_paths_equal_the_definitions(gen):
    grid, L = (4, 3, 5), 5
    ff, fm = (torch.randn(1, 3, 9, 8, 10, dtype=F64, generator=gen) for _ in range(2))
    want = ops.correlation(ff, fm, grid, L, 0.4)
    for max_elems in (1 << 26, 1):
        got = ops.correlation_separable(ff, fm, grid, L, 0.4, layout="disp", max_elems=max_elems)
        torch.testing.assert_close(got.permute(3, 4, 5, 0, 1, 2), want, rtol=0, atol=1e-12)
    x = torch.randn(*grid, L, L, L, dtype=F64, generator=gen, requires_grad=True)
    g = torch.randn(x.shape, dtype=F64, generator=gen)
    xd = x.permute(3, 4, 5, 0, 1, 2)
    for mode, pen in (("approx", None), ("exact", 0.7)):
        ref = ops.mean_field_step(x, mode, pen)
        got = -ops.mean_field_step_dmajor_neg(-xd, mode, pen).permute(3, 4, 5, 0, 1, 2)
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)
        torch.testing.assert_close(_grads(got, x, g)[0], _grads(ref, x, g)[0], rtol=0, atol=1e-12)
    y = torch.randn(4, 3, 5, 2, 3, dtype=F64, generator=gen, requires_grad=True)
    want = -ops.minpool3_direct(-y.permute(3, 4, 0, 1, 2)).permute(2, 3, 4, 0, 1)
    assert torch.equal(ops.maxpool3_dmajor(y), want)
    assert torch.autograd.gradcheck(ops.maxpool3_dmajor, (y,))


@pytest.mark.parametrize("shape,dim", [((7, 1, 5), 0), ((3,), 0), ((2, 9, 4, 3), 1)])
def test_softmax_scaled_equals_autograd(gen, shape, dim):
    x = torch.randn(shape, dtype=F64, generator=gen, requires_grad=True)
    a = torch.randn((), dtype=F64, generator=gen, requires_grad=True)
    g = torch.randn(shape, dtype=F64, generator=gen).transpose(0, -1).contiguous().transpose(0, -1)
    got, want = ops.softmax_scaled(x, a, dim), torch.softmax(a * x, dim)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-15)
    for u, v in zip(_grads(got, (x, a), g), _grads(want, (x, a), g)):
        torch.testing.assert_close(u, v, rtol=0, atol=1e-13)
    assert torch.autograd.gradcheck(lambda v, s: ops.softmax_scaled(v, s, dim), (x, a))


@pytest.mark.parametrize("shape", [(7, 1, 5), (3,), (2, 9, 4, 3)])
def test_affine_equals_autograd(gen, shape):
    """ops.affine (fused passes, hand-written backward) against the plain expression."""
    coeffs = [torch.randn((), dtype=F64, generator=gen, requires_grad=True) for _ in range(3)]
    xs = [torch.randn(shape, dtype=F64, generator=gen, requires_grad=True) for _ in range(2)]
    g = torch.randn(shape, dtype=F64, generator=gen)
    inputs = (*coeffs, *xs)
    for terms in ((coeffs[1], xs[0]), (coeffs[1], xs[0], coeffs[2], xs[1])):
        got = ops.affine(coeffs[0], *terms)
        want = coeffs[0] + sum(a * x for a, x in zip(terms[0::2], terms[1::2]))
        torch.testing.assert_close(got, want, rtol=0, atol=1e-14)
        got_g = torch.autograd.grad(got, inputs, g, allow_unused=True)
        want_g = torch.autograd.grad(want, inputs, g, allow_unused=True)
        for a, b in zip(got_g, want_g):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
        assert torch.autograd.gradcheck(lambda *t: ops.affine(coeffs[0], *t), terms)


def test_minpool_pooled_gradcheck(gen):
    x = torch.randn(2, 3, 4, 5, dtype=F64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(ops.minpool3_pooled, (x,))


def test_neighbour_gram_values_and_gradcheck(gen):
    t = torch.randn(2, 4, 3, 5, 3, dtype=F64, generator=gen, requires_grad=True)
    a00, a01, a10, a11 = ops._NeighbourGram.apply(t)
    x = t.detach()
    torch.testing.assert_close(a00, (x * x).sum(-1))
    torch.testing.assert_close(a01, torch.einsum("sjakc,sjakc->sjak", x[..., :-1, :], x[..., 1:, :]))
    torch.testing.assert_close(a10, torch.einsum("sjakc,sjakc->sjak", x[:, :-1], x[:, 1:]))
    assert torch.autograd.gradcheck(ops._NeighbourGram.apply, (t,))


def test_two_taps_reproduce_the_weights(gen):
    pos = torch.rand(4, 6, dtype=F64, generator=gen) * 2.6 - 1.3  # inside and outside
    for n in (1, 2, 7):
        w = ops.interp_weights(pos, n)
        e0, e1, w0, w1 = ops.two_taps(w)
        rebuilt = torch.zeros_like(w)
        rebuilt.scatter_add_(-1, e0[..., None], w0[..., None])
        rebuilt.scatter_add_(-1, e1[..., None], w1[..., None])
        torch.testing.assert_close(rebuilt, w, rtol=0, atol=1e-15)


def test_block_interpolation_and_its_adjoint(gen):
    """interpolate_blocks is sum_e W[g, d, e] z[..., e, g]; spread_blocks is its adjoint; both
    custom Functions pass gradcheck."""
    G, L, n = 3, 4, 6
    w = ops.interp_weights(torch.rand(G, L, dtype=F64, generator=gen) * 2.4 - 1.2, n)
    taps = ops.two_taps(w)
    z = torch.randn(2, 5, n, G, dtype=F64, generator=gen, requires_grad=True)
    out = ops.interpolate_blocks(z, taps, 0.5)
    torch.testing.assert_close(out, 0.5 * torch.einsum("gde,rxeg->rxgd", w, z))
    y = torch.randn(2, 5, G, L, dtype=F64, generator=gen, requires_grad=True)
    spread = ops.spread_blocks(y, taps, n)
    torch.testing.assert_close(spread, torch.einsum("gde,rxgd->rxeg", w, y))
    torch.testing.assert_close((out * y).sum(), 0.5 * (z * spread).sum())
    assert torch.autograd.gradcheck(lambda v: ops.interpolate_blocks(v, taps, -2.0), (z,))
    assert torch.autograd.gradcheck(lambda v: ops.spread_blocks(v, taps, n), (y,))


def test_one_hot_matches_torch(gen):
    lab = torch.randint(0, 6, (5, 4, 7), generator=gen)
    want = torch.nn.functional.one_hot(lab, 7).permute(3, 0, 1, 2)[None].float()
    assert torch.equal(losses.one_hot(lab, 7), want)
    with pytest.raises(Exception, match="one_hot"):
        losses.one_hot(lab, 5)


@pytest.mark.parametrize("shape", [(8, 6, 10), (7, 5, 9), (3, 4, 5)])
@pytest.mark.parametrize("factor", [1, 2, 3])
def test_pooled_one_hot_equals_pooling_the_one_hot(gen, shape, factor):
    lab = torch.randint(0, 6, shape, generator=gen)
    want = losses.soft_labels(losses.one_hot(lab, 7), factor)
    got = losses.pooled_one_hot(lab, 7, factor)
    assert got.dtype == want.dtype and torch.equal(got, want)
    with pytest.raises(Exception, match="one_hot"):
        losses.pooled_one_hot(lab, 5, factor)


LABEL_CASES = [((4, 3, 5), 5, 0.4, (9, 8, 10)), ((3, 4, 2), 3, 0.9, (7, 6, 5)),
               ((5, 5, 6), 7, 0.3, (12, 10, 14)), ((2, 5, 3), 5, 0.6, (5, 11, 8))]


@pytest.mark.parametrize("grid,L,q,shape", LABEL_CASES)
@pytest.mark.parametrize("max_elems", [1 << 25, 1])
def test_label_loss_separable_equals_definition(gen, grid, L, q, shape, max_elems):
    probs = torch.softmax(3 * torch.randn(*grid, L ** 3, dtype=F64, generator=gen), -1)
    probs.requires_grad_(True)
    n = 5
    fixed = losses.soft_labels(losses.one_hot(torch.randint(0, n, shape, generator=gen), n), 1)
    moving = losses.soft_labels(losses.one_hot(torch.randint(0, n, shape, generator=gen), n), 2)
    weights = torch.rand(n, dtype=F64, generator=gen)
    got_e = losses.expected_labels(probs, moving, grid, L, q, max_elems=max_elems)
    got = losses._weighted_mse(got_e, fixed, grid, weights)
    want = losses.nonlocal_label_loss_direct(probs, fixed, moving, grid, L, q, weights)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    torch.testing.assert_close(losses.nonlocal_label_loss(probs, fixed, moving, grid, L, q,
                                                          weights), want, rtol=1e-12, atol=0)
    probs_d = probs.detach().permute(3, 0, 1, 2).contiguous()
    torch.testing.assert_close(losses.nonlocal_label_loss(probs_d, fixed, moving, grid, L, q,
                                                          weights, layout="disp"),
                               want.detach(), rtol=1e-12, atol=0)
    torch.testing.assert_close(_grads(got, probs, None)[0], _grads(want, probs, None)[0],
                               rtol=0, atol=1e-14)


def _trainer(gen, cfg: PDDConfig, shape):
    rng = np.random.default_rng(int(torch.randint(2**31, (1,), generator=gen)))
    subjects = [(rng.normal(0, 400, shape).astype(np.float32),
                 rng.integers(0, 6, shape)) for _ in range(2)]
    model = PDDNet(cfg, seed=int(rng.integers(1000))).double()
    trainer = Trainer(model, subjects, TrainOptions(augment=False))
    trainer.images = [im.double() for im in trainer.images]
    return trainer


@pytest.mark.parametrize("minconv", ["approx", "exact"])
def test_training_step_gradients_equal_the_reference_step(gen, minconv):
    """The fast step (separable correlation, pooled min-pooling, separable label loss) gives the
    reference step's losses and parameter gradients, float64, random data and weights."""
    cfg = PDDConfig(channels=3, grid=(5, 4, 6), disp_size=5, capture=0.3, minconv=minconv)
    trainer = _trainer(gen, cfg, (24, 21, 27))
    model = trainer.model
    model.train()
    args = (trainer.images[0], trainer.labels[0], trainer.images[1], trainer.labels[1])
    results = {}
    for fast in (False, True):
        with ops.fast_gradients(fast):
            model.zero_grad(set_to_none=True)
            label, diff = trainer.losses(*args)
            (label + 1.5 * diff).backward()
        results[fast] = (label.detach(), diff.detach(),
                         {k: p.grad.clone() for k, p in model.named_parameters()})
    torch.testing.assert_close(results[True][0], results[False][0], rtol=1e-10, atol=0)
    torch.testing.assert_close(results[True][1], results[False][1], rtol=1e-10, atol=1e-18)
    scale = max(g.abs().max() for g in results[False][2].values())
    for k, want in results[False][2].items():
        # conv3.bias has an analytically zero gradient (the SSD ignores a shift of both
        # feature maps): compare every tensor at the scale of the largest gradient
        torch.testing.assert_close(results[True][2][k], want, rtol=1e-8, atol=1e-10 * scale,
                                   msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize("minconv", ["approx", "exact"])
def test_forward_fast_equals_the_model(gen, minconv):
    cfg = preset("tiny", minconv=minconv)
    model = PDDNet(cfg, seed=3).double().train()
    fixed, moving = (torch.randn(1, 1, 24, 24, 24, dtype=F64, generator=gen) for _ in range(2))
    want = model(fixed, moving)
    got = forward_fast(model, fixed, moving).registration()
    for name in ("cost", "probs", "grid_disp"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=1e-10,
                                   atol=1e-12)
    with pytest.raises(Exception, match="forward_fast"):
        forward_fast(model, fixed, moving[..., :-1])


def test_keep_freed_memory_is_accepted_on_glibc():
    """The allocator setting a Trainer makes (process-wide, once): accepted where glibc runs."""
    import platform
    import sys

    from pddnet.model.train import keep_freed_memory

    got = keep_freed_memory()
    assert keep_freed_memory() is got  # cached: set once
    if sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc":
        assert got is True


def test_augmentation_equals_sampling_at_the_affine_coordinates(gen):
    """train.apply_affine (grid in grid_sample's order, cached centres) against the definition:
    grid_sample3d at identity_grid @ theta. Labels may differ where a coordinate's float
    rounding crosses a voxel boundary (rare)."""
    from pddnet.model.train import TrainOptions, apply_affine, random_affine

    shape = (13, 10, 17)
    image = torch.randn(1, 1, *shape, generator=gen)
    labels = torch.randint(0, 5, (1, 1, *shape), generator=gen)
    rng = np.random.default_rng(int(torch.randint(2**31, (1,), generator=gen)))
    opts = TrainOptions(max_rotation_deg=20.0, max_scale=0.2, max_shift=0.2)
    for _ in range(3):
        theta = random_affine(rng, opts)
        mat = torch.as_tensor(theta, dtype=torch.float32)
        coords = (ops.identity_grid(shape) @ mat[:, :3].T + mat[:, 3])[None]
        img, lab = apply_affine(image, labels, theta)
        torch.testing.assert_close(img, ops.grid_sample3d(image, coords), rtol=0, atol=1e-5)
        want = ops.grid_sample3d(labels.float(), coords, mode="nearest").long()
        assert lab.dtype == torch.long and (lab != want).float().mean() < 2e-3
        assert torch.equal(apply_affine(image, labels.float(), theta)[1], lab)
