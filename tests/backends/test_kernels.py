"""Triton kernels of the TensorRT plugins (pddnet.backends.trt.kernels) against the PyTorch reference.

Every kernel runs under the Triton interpreter (``TRITON_INTERPRET=1``, set below before triton
is first imported) on torch CPU tensors, on fresh random inputs each run, and is compared with
:mod:`pddnet.model.ops` computed in float64, at the tolerances of ``docs/ops.md``: float32 in
the spec's float32 tolerance, float16 (float32 accumulation) at 2e-3 relative against the
reference on the unrounded inputs. Shapes are tiny but include sizes that are not multiples of
the block sizes, odd grids (``G = (3, 5, 2)``), ``L`` = 1, 3, 5 and 7, sampling points beyond
the volume border (the border clamp), and both min-convolution modes.

Also here: the AOT kernels compile to PTX for sm_90 with the ptxas of the triton wheel (no GPU
needed) and their PTX entries take exactly TensorRT's AOT parameters; ``register_plugins``
wires every plugin through a small stand-in for ``tensorrt.plugin`` that applies the documented
signature rules (a stand-in, not TensorRT); the plugin module imports without tensorrt, and
``register_plugins`` then fails with the pip extra.

Not tested here (needs a GPU and/or TensorRT): running any kernel on a GPU (numerics of the
compiled code, FMA contraction, ``tl.gather`` lowering), performance, registering with the real
``tensorrt.plugin``, building an engine, ONNX parsing with the plugins bound, the JIT plugins'
torch/CUDA-stream handling, loading the PTX into a driver.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before the first import of triton (and of the kernels)

import importlib  # noqa: E402
import secrets  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from pddnet.errors import PddnetError  # noqa: E402
from pddnet.model import ops  # noqa: E402

try:
    import triton  # noqa: E402,F401
except ImportError:  # pragma: no cover
    pytest.skip("triton is not importable (pip install 'pddnet[dev]'): the Triton kernels of the "
                "TensorRT plugins cannot be run", allow_module_level=True)

from helpers.fake_tensorrt import write_fake_tensorrt  # noqa: E402
from pddnet.backends.trt import kernels as K  # noqa: E402

if "Interpreted" not in type(K._minconv_kernel).__name__:
    # imported earlier in this process without the interpreter: rebuild the kernels with it
    K = importlib.reload(K)


@pytest.fixture
def gen():
    """A fresh generator per test; the seed is in the failure message."""
    seed = secrets.randbits(32)
    return torch.Generator().manual_seed(seed)


def _max_err(got, ref):
    return (got.double() - ref).abs().max().item()


# ------------------------------------------------------------------------- DeformableSample3D

DEFORM_CASES = [
    # C, input (I, J, K), S, output (I', J', K'), offset range, block
    (3, (5, 7, 6), 4, (3, 5, 4), 1.6, 16),   # 60 output voxels in blocks of 16: a tail
    (2, (4, 3, 5), 3, (7, 2, 3), 0.4, None),  # one partial block
    (1, (1, 2, 9), 2, (2, 1, 3), 2.5, 4),    # a one-voxel axis; far outside the volume
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", DEFORM_CASES)
def test_deformable_sample(gen, case, dtype):
    c, shape, s, out_shape, reach, block = case
    x = torch.randn(1, c, *shape, generator=gen)
    off = (torch.rand(s, 3, generator=gen) * 2 - 1) * reach
    ref = ops.deformable_sample(x.double(), off.double(), out_shape)
    got = K.deformable_sample(x.to(dtype), off, out_shape, block=block)
    assert got.dtype == dtype and got.shape == ref.shape
    if dtype == torch.float32:
        tol = 1e-5
    else:
        tol = 2e-3 * (x.max() - x.min()).item()  # "2e-3 relative to the input range"
    assert _max_err(got, ref) <= tol, f"seed {gen.initial_seed()}"


def test_deformable_sample_border_clamp_matters(gen):
    """Offsets that leave the volume: the result is the border value, not zero padding."""
    x = torch.randn(1, 2, 4, 5, 3, generator=gen)
    off = torch.tensor([[5.0, -5.0, 5.0]])
    got = K.deformable_sample(x, off, (2, 3, 2))
    corner = x[0, :, -1, 0, -1]
    assert torch.allclose(got[0], corner[:, None, None, None].expand(2, 2, 3, 2), atol=1e-6)


# -------------------------------------------------------------------------------- Correlation

CORR_CASES = [
    # C, feature (I, J, K), grid, L, q, block
    (4, (6, 5, 7), (3, 5, 2), 3, 0.9, 16),    # L^3 = 27 in blocks of 16; q reaches past +-1
    (3, (5, 4, 6), (3, 5, 2), 5, 0.4, None),  # L^3 = 125 in one block of 128
    (2, (3, 7, 4), (2, 1, 3), 5, 1.3, 32),   # a one-point grid axis; 125 in blocks of 32
    (2, (4, 4, 4), (2, 2, 2), 1, 0.5, None),  # L = 1: the single displacement is -q
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", CORR_CASES)
def test_correlation(gen, case, dtype):
    c, shape, grid, L, q, block = case
    f = torch.randn(1, c, *shape, generator=gen)
    m = torch.randn(1, c, *shape, generator=gen)
    ref = ops.correlation(f.double(), m.double(), grid, L, q)
    got = K.correlation(f.to(dtype), m.to(dtype), grid, L, q, block=block)
    assert got.dtype == dtype and got.shape == ref.shape == (*grid, L, L, L)
    rel = 1e-4 if dtype == torch.float32 else 2e-3  # relative to max(cost)
    assert _max_err(got, ref) <= rel * ref.max().item(), f"seed {gen.initial_seed()}"


def test_correlation_samples_beyond_border():
    """The first test case really samples outside [-1, 1] (so the border clamp is exercised)."""
    _, _, grid, L, q, _ = CORR_CASES[0]
    for g in grid:
        outer = (2 * (g - 1) + 1) / g - 1 + q
        assert outer > 1.0


# ------------------------------------------------------------------------ MinConv, MeanField

def _cost(gen, grid, L):
    return torch.randn(*grid, L, L, L, generator=gen)


MINCONV_CASES = [((3, 5, 2), 3), ((3, 5, 2), 5), ((1, 2, 1), 7), ((2, 1, 1), 1)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("mode", ["approx", "exact"])
@pytest.mark.parametrize("grid,L", MINCONV_CASES)
def test_minconv(gen, grid, L, mode, dtype):
    cost = _cost(gen, grid, L)
    pen = 0.1 + 1.9 * torch.rand((), generator=gen).item() if mode == "exact" else None
    ref = ops.minconv(cost.double(), mode, pen)
    got = K.minconv(cost.to(dtype), mode, pen)
    assert got.dtype == dtype and got.shape == ref.shape
    scale = ref.abs().max().item()
    if dtype == torch.float16:
        tol = 2e-3 * scale
    else:
        tol = 1e-5 if mode == "approx" else 1e-6 * scale  # exact: equal up to rounding
    assert _max_err(got, ref) <= tol, f"seed {gen.initial_seed()}"


def test_minconv_penalty_as_tensor(gen):
    cost = _cost(gen, (2, 2, 1), 3)
    pen = torch.tensor(0.7, dtype=torch.float16)
    ref = ops.minconv(cost.double(), "exact", pen.double())
    assert _max_err(K.minconv(cost, "exact", pen), ref) <= 1e-6 * ref.abs().max().item()


MFS_CASES = [
    # grid, L, block of the grid-smoothing kernel
    ((3, 5, 2), 3, 16),    # D = 27 in blocks of 16; G_k = 2
    ((2, 3, 3), 5, 128),   # G_k = 3 in a tile of 4 rows
    ((1, 1, 5), 3, None),  # smoothing only along k
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("mode", ["approx", "exact"])
@pytest.mark.parametrize("grid,L,block", MFS_CASES)
def test_mean_field_step(gen, grid, L, block, mode, dtype):
    cost = _cost(gen, grid, L)
    pen = 0.1 + 1.9 * torch.rand((), generator=gen).item() if mode == "exact" else None
    ref = ops.mean_field_step(cost.double(), mode, pen)
    got = K.mean_field_step(cost.to(dtype), mode, pen, block=block)
    assert got.dtype == dtype and got.shape == ref.shape
    scale = ref.abs().max().item()
    if dtype == torch.float16:
        tol = 2e-3 * scale
    else:
        tol = 1e-5 if mode == "approx" else 1e-6 * scale
    assert _max_err(got, ref) <= tol, f"seed {gen.initial_seed()}"


# ------------------------------------------------------------------------------ launcher API

def test_out_argument_is_filled(gen):
    cost = _cost(gen, (2, 1, 2), 3)
    out = torch.full_like(cost, float("nan"))
    res = K.minconv(cost, out=out)
    assert res is out and torch.isfinite(out).all()
    with pytest.raises(PddnetError, match="out"):
        K.minconv(cost, out=torch.empty(2, 2, 2, 3, 3, 3))


def test_launcher_errors(gen):
    cost = _cost(gen, (1, 1, 1), 3)
    with pytest.raises(PddnetError, match="penalty"):
        K.minconv(cost, "exact")
    with pytest.raises(PddnetError, match="mode"):
        K.minconv(cost, "fast")
    with pytest.raises(PddnetError, match="float32 or float16"):
        K.minconv(cost.double())
    with pytest.raises(PddnetError, match=r"\(1,C,I,J,K\)"):
        K.correlation(torch.zeros(1, 2, 3, 3, 3), torch.zeros(1, 2, 3, 3, 4), (1, 1, 1), 3, 0.5)


def test_float_bits_round_trip():
    import struct

    for q in (0.0, 0.4, 1.3, 1e-3):
        assert struct.unpack("<f", struct.pack("<i", K.float_bits(q)))[0] == pytest.approx(q)


# ---------------------------------------------------------------------- AOT / PTX entry fix-up

_PTX = textwrap.dedent("""\
    .visible .entry k(
    \t.param .u64 .ptr .global .align 1 k_param_0,
    \t.param .u32 k_param_1,
    \t.param .u64 .ptr .global .align 1 k_param_2,
    \t.param .u64 .ptr .global .align 1 k_param_3,
    \t.param .u64 .ptr .global .align 1 k_param_4
    )
    {
    \tld.param.b64 %rd1, [k_param_0];
    \tld.param.b32 %r1, [k_param_1];
    \tld.param.b64 %rd2, [k_param_2];
    }
    """)


def test_strip_scratch_params():
    out = K.strip_scratch_params(_PTX, "k", 3)
    assert K._entry_params(out, "k") == K._entry_params(_PTX, "k")[:3]
    assert "k_param_3" not in out and "ld.param.b64 %rd2, [k_param_2];" in out
    assert K.strip_scratch_params(out, "k", 3) == out
    used = _PTX.replace("[k_param_2];", "[k_param_2];\n\tld.param.b64 %rd3, [k_param_4];")
    with pytest.raises(PddnetError, match="used by the kernel"):
        K.strip_scratch_params(used, "k", 3)
    with pytest.raises(PddnetError, match="fewer"):
        K.strip_scratch_params(_PTX, "k", 6)


_AOT_SCRIPT = r'''
import struct, sys
import numpy as np
sys.path.insert(0, sys.argv[1])
import tensorrt.plugin as trtp
from triton.backends.compiler import GPUTarget
from pddnet.backends.trt import kernels as K, plugins as P

K.AOT_TARGET = GPUTarget("cuda", 90, 32)
ids = P.register_plugins()
assert ids == ["pddnet::DeformableSample3D", "pddnet::Correlation", "pddnet::MinConv",
               "pddnet::MeanFieldStep"], ids
assert P.registered() == {"pddnet::DeformableSample3D": "aot+jit", "pddnet::Correlation": "aot+jit",
                          "pddnet::MinConv": "aot+jit", "pddnet::MeanFieldStep": "jit"}
assert P.register_plugins(["MinConv"]) == ["pddnet::MinConv"]  # idempotent
assert "aot" not in trtp.REG["pddnet::MeanFieldStep"]
try:
    P.register_plugins(["Warp"])
    raise AssertionError("unknown op accepted")
except P.PddnetError as exc:
    assert "unknown op" in str(exc)

def desc(shape, dtype):
    return trtp.TensorDesc(tuple(trtp.ShapeExpr(s) for s in shape), dtype)

def vals(exprs):
    return [e.value for e in exprs]

def check(pid, inputs, attrs, out_shape, grid, args):
    d = trtp.REG[pid]
    out = d["register"](*inputs, *attrs)
    assert tuple(vals(out.shape_expr)) == out_shape and out.dtype == inputs[0].dtype, pid
    name, ptx, lp, extra = d["aot"](*inputs, *attrs, (out,), 0)
    params = K._entry_params(ptx, name)
    assert len(params) == len(inputs) + len(extra) + 1, (pid, params)
    assert [p.split()[1] for p in params] == [".u64"] * len(inputs) + [".u32"] * len(extra) + [".u64"]
    assert (lp.grid_x.value, lp.grid_y.value) == grid, (pid, lp.grid_x.value, lp.grid_y.value)
    assert lp.block_x.value % 32 == 0 and lp.block_x.value >= 32
    assert vals(extra) == args, (pid, vals(extra))
    assert ".reqntid %d" % lp.block_x.value in ptx.replace(", 1, 1", "")
    return out

for dt in ("FLOAT", "HALF"):
    check("pddnet::DeformableSample3D", [desc((1, 3, 5, 7, 6), dt), desc((4, 3), "FLOAT")],
          [np.array([3, 5, 40], np.int32)], (1, 12, 3, 5, 40), (3, 4), [3, 5, 7, 6, 3, 5, 40])
    bits = struct.unpack("<i", struct.pack("<f", 0.4))[0]
    check("pddnet::Correlation", [desc((1, 4, 6, 5, 7), dt)] * 2,
          [np.array([3, 5, 2], np.int32), 15, 0.4], (3, 5, 2, 15, 15, 15), (30, 27),
          [4, 6, 5, 7, 3, 5, 2, bits])
    for mode in ("approx", "exact"):
        check("pddnet::MinConv", [desc((3, 5, 2, 15, 15, 15), dt), desc((), "FLOAT")], [mode],
              (3, 5, 2, 15, 15, 15), (30, 1), [])
    out = trtp.REG["pddnet::MeanFieldStep"]["register"](desc((3, 5, 2, 5, 5, 5), dt), desc((), dt), "approx")
    assert tuple(vals(out.shape_expr)) == (3, 5, 2, 5, 5, 5)
print("AOT-OK")
'''


def test_aot_kernels_compile_and_plugins_register(tmp_path):
    """In a process without the interpreter: PTX for sm_90 with TensorRT's parameter lists."""
    fake = write_fake_tensorrt(tmp_path / "fake")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    proc = subprocess.run([sys.executable, "-c", _AOT_SCRIPT, str(fake)], env=env,
                          capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 and ("ptxas" in proc.stderr and "No such file" in proc.stderr):
        pytest.skip("triton's bundled ptxas cannot run here: " + proc.stderr[-300:])
    assert proc.returncode == 0 and "AOT-OK" in proc.stdout, proc.stdout + proc.stderr[-4000:]


# ------------------------------------------------------------------------------ plugin module

def test_plugins_import_without_tensorrt_and_register_names_the_extra(monkeypatch):
    for name in [m for m in sys.modules if m == "tensorrt" or m.startswith("tensorrt.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # makes `import tensorrt` fail
    monkeypatch.delitem(sys.modules, "pddnet.backends.trt.plugins", raising=False)
    plugins = importlib.import_module("pddnet.backends.trt.plugins")
    assert "tensorrt" not in [m for m, v in sys.modules.items() if v is not None]
    with pytest.raises(PddnetError, match=r"pddnet\[gpu\]"):
        plugins.register_plugins()
    assert plugins.plugin_id("MinConv") == "pddnet::MinConv"


def test_importing_export_and_plugins_needs_no_heavy_packages():
    code = ("import sys, pddnet.export, pddnet.backends.trt.plugins; "
            "print([m for m in ('triton', 'tensorrt', 'torch') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr
