"""The fused-head Triton kernels (pddnet.backends.trt.kernels) against the PyTorch reference.

Run under the Triton interpreter (``TRITON_INTERPRET=1``, set before triton is first imported)
on torch CPU tensors, fresh random inputs each run (the seed is in the failure message),
against :mod:`pddnet.model.ops` in float64. Shapes are odd and tiny: grids whose ``G_k`` is not
a power of two (the ``(BLOCK_K, BLOCK_D)`` tile has masked rows), ``L`` = 3, 5, 7 so that
``L^3`` is not a multiple of the displacement block (a masked tail in the online softmax),
both min-convolution modes, float32 (the spec's float32 tolerances) and float16 (float32
accumulation; 2e-3 relative).

Tested: ``minconv_affine`` (the mean-field input combination fused into the min-convolution's
load), ``grid_smooth``, ``displacement_head`` (grid smoothing + online softmax + expectation +
entropy, optionally probabilities) and ``fused_head`` (the four launches of the TensorRT head)
against the model's literal head. Not tested here: anything on a GPU (compiled-code numerics,
speed), TensorRT (see test_trt_head.py for the rewrite and the plugin definitions).
"""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before the first import of triton (and of the kernels)

import importlib  # noqa: E402
import secrets  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from pddnet.errors import PddnetError  # noqa: E402
from pddnet.model import ops  # noqa: E402

try:
    import triton  # noqa: E402,F401
except ImportError:  # pragma: no cover
    pytest.skip("triton is not importable (pip install 'pddnet[dev]'): the Triton kernels of the "
                "TensorRT plugins cannot be run", allow_module_level=True)

from pddnet.backends.trt import kernels as K  # noqa: E402

if "Interpreted" not in type(K._head_kernel).__name__:
    K = importlib.reload(K)  # imported earlier without the interpreter


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(secrets.randbits(32))


def _err(got, ref):
    return (got.double() - ref).abs().max().item()


def _tol(dtype, ref, mode="approx"):
    scale = max(1.0, ref.abs().max().item())
    if dtype == torch.float16:
        return 2e-3 * scale
    return 1e-5 * scale if mode == "approx" else 2e-6 * scale


def _pen(gen, mode):
    return 0.1 + 1.9 * torch.rand((), generator=gen).item() if mode == "exact" else None


# grid, L, displacement block of the smoothing / head kernels
CASES = [((3, 5, 3), 3, 16),    # G_k = 3 in a tile of 4 rows; 27 = 16 + 11 (tail)
         ((2, 3, 5), 5, 32),    # G_k = 5 in 8 rows; 125 = 3 * 32 + 29
         ((1, 2, 3), 7, None)]  # 343 in blocks of the default size; one-point axis


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("mode", ["approx", "exact"])
@pytest.mark.parametrize("grid,L,block", CASES)
def test_minconv_affine(gen, grid, L, block, mode, dtype):
    x = torch.randn(*grid, L, L, L, generator=gen)
    y = torch.randn(*grid, L, L, L, generator=gen)
    a, b, c = (torch.randn(3, generator=gen) * 2).tolist()
    pen = _pen(gen, mode)
    ref = ops.minconv(a * x.double() + b * y.double() + c, mode, pen)
    got = K.minconv_affine(x.to(dtype), y.to(dtype), (a, b, c), mode, pen)
    assert got.dtype == dtype and got.shape == ref.shape
    assert _err(got, ref) <= _tol(dtype, ref, mode), f"seed {gen.initial_seed()}"
    # one input: y is never read (b ignored)
    ref1 = ops.minconv(a * x.double() + c, mode, pen)
    got1 = K.minconv_affine(x.to(dtype), None, (a, 123.0, c), mode, pen)
    assert _err(got1, ref1) <= _tol(dtype, ref1, mode), f"seed {gen.initial_seed()}"


@pytest.mark.parametrize("grid,L,block", CASES)
def test_grid_smooth(gen, grid, L, block):
    x = torch.randn(*grid, L, L, L, generator=gen)
    ref = ops.smooth_grid(x.double())
    got = K.grid_smooth(x, block=block)
    assert _err(got, ref) <= 1e-5 * max(1.0, ref.abs().max().item()), f"seed {gen.initial_seed()}"


def _head_ref(m, scale, L, q):
    probs = ops.displacement_probabilities(ops.smooth_grid(m), -scale)
    return (ops.expected_displacement(probs, L, q), ops.displacement_entropy(probs), probs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("grid,L,block", CASES)
def test_displacement_head(gen, grid, L, block, dtype):
    q = 0.2 + torch.rand((), generator=gen).item()
    m = torch.rand(*grid, L, L, L, generator=gen) * 4
    scale = -(0.5 + 4 * torch.rand((), generator=gen).item())  # peaked, not one-hot
    disp, ent, probs = _head_ref(m.double(), scale, L, q)
    got_d, got_e, got_p = K.displacement_head(m.to(dtype), scale, q, probs=True, block=block)
    assert got_d.shape == (*grid, 3) and got_e.shape == grid and got_p.shape == (*grid, L ** 3)
    assert got_d.dtype == got_e.dtype == got_p.dtype == dtype
    seed = f"seed {gen.initial_seed()}"
    if dtype == torch.float32:
        assert _err(got_d, disp) <= 1e-5 * q, seed
        assert _err(got_e, ent) <= 1e-5 * max(1.0, ent.abs().max().item()), seed
        assert _err(got_p, probs) <= 1e-6, seed
    else:  # inputs rounded to float16: compare with the reference on the rounded inputs
        disp, ent, probs = _head_ref(m.to(dtype).double(), scale, L, q)
        assert _err(got_d, disp) <= 2e-3 * q, seed
        assert _err(got_e, ent) <= 2e-3 * max(1.0, ent.abs().max().item()), seed
        assert _err(got_p, probs) <= 2e-3 * probs.max().item(), seed
    two = K.displacement_head(m.to(dtype), scale, q, block=block)
    assert len(two) == 2 and torch.equal(two[0], got_d) and torch.equal(two[1], got_e)


def test_displacement_head_large_logits_and_l1(gen):
    """Logits in the hundreds (the online softmax rescales, no overflow) and ``L = 1``."""
    m = torch.rand(2, 3, 3, 5, 5, 5, generator=gen) * 50
    disp, ent, _ = _head_ref(m.double(), -20.0, 5, 0.4)
    got_d, got_e = K.displacement_head(m, -20.0, 0.4, block=16)
    assert torch.isfinite(got_d).all() and torch.isfinite(got_e).all()
    assert _err(got_d, disp) <= 1e-5 and _err(got_e, ent) <= 1e-4
    one = torch.rand(2, 1, 3, 1, 1, 1, generator=gen)
    d1, e1 = K.displacement_head(one, -3.0, 0.7)
    assert torch.allclose(d1, torch.full_like(d1, -0.7)) and e1.abs().max() <= 1e-6


@pytest.mark.parametrize("grid,L,block,mode,dtype", [
    ((3, 5, 3), 3, 16, "approx", torch.float32),
    ((2, 3, 5), 5, 32, "exact", torch.float16),
])  # two cases: each is four interpreted launches (about 40 s on a shared CPU)
def test_fused_head_matches_the_model_head(gen, grid, L, block, mode, dtype):
    """The four launches against ``PDDNet.regularise`` + softmax + expectation, written out."""
    ssd = torch.rand(*grid, L, L, L, generator=gen) * 3
    alpha = (torch.rand(6, generator=gen) + 0.2).double()
    alpha[1] = -0.3
    q = 0.3
    pen = _pen(gen, mode)
    a = alpha.tolist()
    cost = a[1] + a[0] * ssd.double()
    first = ops.mean_field_step(cost, mode, pen)
    second = ops.mean_field_step(a[4] + a[2] * cost + a[3] * first, mode, pen)
    probs = ops.displacement_probabilities(second, a[5])
    disp = ops.expected_displacement(probs, L, q)
    ent = ops.displacement_entropy(probs)
    got_d, got_e, got_p = K.fused_head(ssd.to(dtype), a, q, mode, pen, probs=True, block=block)
    seed = f"seed {gen.initial_seed()}"
    rel = 1e-5 if dtype == torch.float32 else 2e-3
    assert _err(got_d, disp) <= rel * q * 4, seed
    assert _err(got_e, ent) <= rel * 4 * max(1.0, ent.abs().max().item()), seed
    assert _err(got_p, probs) <= rel * 4 * probs.max().item(), seed


def test_launcher_errors(gen):
    x = torch.randn(2, 2, 2, 3, 3, 3, generator=gen)
    with pytest.raises(PddnetError, match="y must have"):
        K.minconv_affine(x, x[:1])
    with pytest.raises(PddnetError, match="penalty"):
        K.minconv_affine(x, None, (1, 0, 0), "exact")
    with pytest.raises(PddnetError, match=r"\(G_i, G_j, G_k, L, L, L\)"):
        K.displacement_head(x[..., :2], -1.0, 0.4)
    with pytest.raises(PddnetError, match="float32 or float16"):
        K.grid_smooth(x.double())
