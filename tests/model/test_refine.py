"""Instance optimisation and the two-stage mode (issue 5): the numpy runtime against finite
differences, autograd and the PyTorch reference; known answers for the refinement and for field
composition; the stage-two geometry, export and runtime path; the CLI.

Not tested here: registration quality with trained weights (the networks here are randomly
initialised; the gains are measured on held-out synthetic pairs and recorded in
docs/benchmarks.md), TensorRT/CUDA backends, and the speed claims (timings are noisy on shared
CPUs; docs/benchmarks.md has the measurements and commands).
"""

import json

import numpy as np
import pytest

from pddnet.errors import PddnetError
from pddnet.runtime import refine as N
from pddnet.spec import contract as C
from pddnet.spec import refine as S

torch = pytest.importorskip("torch")

from pddnet.model import ops  # noqa: E402
from pddnet.model import refine as R  # noqa: E402

# the refinement runs in float64 on both sides; 0.05 voxel is the parity bound
PARITY_VOXELS = 0.05


def _probs(rng, grid, L, sharp=2.0):
    logits = rng.normal(0.0, sharp, (*grid, L ** 3))
    p = np.exp(logits - logits.max(-1, keepdims=True))
    return p / p.sum(-1, keepdims=True)


def _expectation(p, L, q):
    dset = ops.displacement_set(L, q, dtype=torch.float64).reshape(-1, 3).numpy()
    return p @ dset


# --------------------------------------------------------------------------------------------
# linear operators
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [2, 3, 4, 7, 16])
def test_smoothing_matrix_equals_reference(n):
    ref = ops.smoothing_matrix(n, dtype=torch.float64).numpy()
    np.testing.assert_allclose(N.smoothing_matrix(n), ref, atol=1e-15)


def test_smooth_and_its_transpose_match_the_matrices():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(5, 3, 7, 3))
    m = [N.smoothing_matrix(n) for n in x.shape[:3]]
    dense = np.einsum("ai,bj,ck,ijkd->abcd", m[0], m[1], m[2], x)
    np.testing.assert_allclose(N.smooth(x), dense, atol=1e-13)
    dense_t = np.einsum("ia,jb,kc,ijkd->abcd", m[0], m[1], m[2], x)
    np.testing.assert_allclose(N._apply_axes(x, transpose=True), dense_t, atol=1e-13)
    # and against the reference smooth3 over the grid axes
    ref = ops.smooth3(torch.from_numpy(x).permute(3, 0, 1, 2)).permute(1, 2, 3, 0).numpy()
    np.testing.assert_allclose(N.smooth(x), ref, atol=1e-13)
    # replicate padding keeps a constant field
    const = np.broadcast_to(np.array([0.1, -0.2, 0.3]), (4, 5, 6, 3)).copy()
    np.testing.assert_allclose(N.smooth(const), const, atol=1e-15)


# --------------------------------------------------------------------------------------------
# sampling and gradients
# --------------------------------------------------------------------------------------------
def test_sampling_matches_grid_sample_inside_at_the_border_and_outside():
    rng = np.random.default_rng(2)
    G, L, q = (4, 3, 5), 5, 0.3
    p = _probs(rng, G, L)
    h = 2 * q / (L - 1)
    u = rng.uniform(-q - 1.8 * h, q + 1.8 * h, (*G, 3))  # many points beyond the lattice
    u[0, 0, 0] = [q + 0.5 * h, 0.0, -q - 0.3 * h]        # within one step outside
    u[0, 0, 1] = [q + 3 * h, 0.0, 0.0]                   # far outside: zero, zero gradient
    v, g = N.sample_probabilities(p, u, L, q, grad=True)
    ut = torch.tensor(u, requires_grad=True)
    vt = R.sample_probabilities(torch.tensor(p), ut, L, q)
    vt.sum().backward()
    np.testing.assert_allclose(v, vt.detach().numpy(), atol=1e-14)
    np.testing.assert_allclose(g, ut.grad.numpy(), atol=1e-12)
    assert v[0, 0, 1] == 0 and np.all(g[0, 0, 1] == 0)
    assert v[0, 0, 0] > 0


def test_sampling_at_lattice_points_returns_the_probability():
    rng = np.random.default_rng(3)
    G, L, q = (2, 2, 2), 5, 0.4
    p = _probs(rng, G, L)
    h = 2 * q / (L - 1)
    idx = np.array([1, 4, 0])
    u = np.broadcast_to(-q + h * idx, (*G, 3))
    v = N.sample_probabilities(p, u, L, q)
    np.testing.assert_allclose(v, p.reshape(*G, L, L, L)[..., 1, 4, 0], atol=1e-14)


def _energy_case(seed=4):
    rng = np.random.default_rng(seed)
    G, L, q = (4, 3, 5), 5, 0.3
    p = _probs(rng, G, L, sharp=3.0)
    theta = _expectation(p, L, q) + rng.normal(0, 0.05, (*G, 3))
    return p, theta, L, q


def test_energy_gradient_matches_finite_differences():
    p, theta, L, q = _energy_case()
    weight = 1.5
    _, _, _, grad = N.energy(theta, p, L, q, weight, grad=True)
    eps = 1e-6
    fd = np.zeros_like(theta)
    for idx in np.ndindex(theta.shape):
        tp, tm = theta.copy(), theta.copy()
        tp[idx] += eps
        tm[idx] -= eps
        fd[idx] = (N.energy(tp, p, L, q, weight)[0] - N.energy(tm, p, L, q, weight)[0]) / (2 * eps)
    np.testing.assert_allclose(grad, fd, atol=1e-7 * np.abs(fd).max() + 1e-10)


def test_energy_and_gradient_match_autograd():
    p, theta, L, q = _energy_case(5)
    e, data, smooth, grad = N.energy(theta, p, L, q, 0.7, grad=True)
    th = torch.tensor(theta, requires_grad=True)
    et, dt, st = R.refine_energy(th, torch.tensor(p), L, q, 0.7)
    et.backward()
    assert e == pytest.approx(et.item(), abs=1e-15)
    assert data == pytest.approx(dt.item(), abs=1e-15)
    assert smooth == pytest.approx(st.item(), abs=1e-15)
    np.testing.assert_allclose(grad, th.grad.numpy(), atol=1e-16 + 1e-12 * np.abs(grad).max())


def test_diffusion_equals_reference_penalty():
    from pddnet.model.losses import diffusion_penalty

    u = np.random.default_rng(6).normal(size=(3, 4, 5, 3))
    assert N.diffusion(u) == pytest.approx(float(diffusion_penalty(torch.tensor(u))), rel=1e-14)


def test_adam_matches_torch():
    rng = np.random.default_rng(7)
    target = rng.normal(size=(4, 3))
    x = np.zeros((4, 3))
    xt = torch.zeros(4, 3, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([xt], lr=0.05)
    adam = N.Adam(0.05)
    for _ in range(30):
        adam.step(x, 2 * (x - target) ** 3 + 0.1)
        opt.zero_grad()
        (0.5 * (xt - torch.tensor(target)) ** 4 + 0.1 * xt).sum().backward()
        opt.step()
    np.testing.assert_allclose(x, xt.detach().numpy(), atol=1e-13)


# --------------------------------------------------------------------------------------------
# runtime vs reference
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("grid,L,q,image", [((6, 6, 6), 5, 0.3, (24, 24, 24)),
                                            ((8, 7, 9), 7, 0.25, (30, 27, 33))])
def test_runtime_refinement_matches_reference(grid, L, q, image):
    rng = np.random.default_rng(8)
    p = _probs(rng, grid, L, sharp=3.0).astype(np.float32)
    e = _expectation(p.astype(np.float64), L, q).astype(np.float32)
    opts = S.RefineOptions(steps=50, method="probs")
    got = N.instance_optimise(p, e, L, q, opts)
    ref = R.instance_optimise(torch.from_numpy(p), torch.from_numpy(e), L, q, opts)
    vox_got = N.to_voxels(got.grid_disp, image)
    vox_ref = ops.dense_displacement(ref.grid_disp, image).numpy()
    np.testing.assert_allclose(vox_got, vox_ref, atol=PARITY_VOXELS)
    assert np.abs(vox_got - vox_ref).max() < 1e-4  # in fact float32 rounding only
    assert got.energy == pytest.approx(ref.energy, abs=1e-12)
    assert got.energy[1] < got.energy[0]
    # the field moved: the parity is not that of two unchanged inputs
    assert np.abs(got.grid_disp - e).max() > 0.01


def test_zero_steps_is_the_smoothed_expectation():
    rng = np.random.default_rng(9)
    p = _probs(rng, (4, 4, 4), 3)
    e = _expectation(p, 3, 0.2)
    got = N.instance_optimise(p, e, 3, 0.2, S.RefineOptions(steps=0, method="probs"))
    np.testing.assert_allclose(got.grid_disp, N.smooth(e), atol=1e-7)


def test_to_voxels_matches_reference_upsampling():
    g = np.random.default_rng(10).normal(0, 0.1, (5, 4, 6, 3)).astype(np.float32)
    shape = (24, 21, 30)
    ref = ops.dense_displacement(torch.from_numpy(g), shape).numpy()
    np.testing.assert_allclose(N.to_voxels(g, shape), ref, atol=5e-5)  # float32 products


# --------------------------------------------------------------------------------------------
# known answers
# --------------------------------------------------------------------------------------------
def _gaussian_probs(target, L, q, sigma_steps=1.5):
    """Probabilities of a Gaussian (in lattice steps) around ``target`` ``(G, 3)`` (normalised)."""
    h = 2 * q / (L - 1)
    d = np.linspace(-q, q, L)
    di, dj, dk = np.meshgrid(d, d, d, indexing="ij")
    lat = np.stack([di, dj, dk], -1).reshape(-1, 3)
    r2 = (((target[..., None, :] - lat) / h) ** 2).sum(-1)
    p = np.exp(-0.5 * r2 / sigma_steps ** 2)
    return p / p.sum(-1, keepdims=True)


def test_refinement_converges_to_a_known_translation():
    G, L, q = (6, 5, 7), 11, 0.3
    h = 2 * q / (L - 1)
    truth = np.array([2 * h, -h, 3 * h])       # a lattice point, where P_k peaks
    target = np.broadcast_to(truth, (*G, 3))
    p = _gaussian_probs(target, L, q)
    start = np.zeros((*G, 3))                  # 3 lattice steps away
    before = np.abs(N.smooth(start) - truth).max()
    for impl in ("numpy", "torch"):
        if impl == "numpy":
            got = N.instance_optimise(p, start, L, q, S.RefineOptions(steps=100, lr=0.01,
                                                                     method="probs"))
            u = got.grid_disp
        else:
            u = R.instance_optimise(torch.tensor(p), torch.tensor(start), L, q,
                                    S.RefineOptions(steps=100, lr=0.01, method="probs")
                                    ).grid_disp.numpy()
        err = np.abs(u - truth).max()
        assert err < 0.1 * h < 0.05 * before, (impl, err / h)


def test_refinement_converges_to_a_known_ramp():
    """A field varying by one lattice step per control point (a lattice point everywhere, so
    the maximum of the trilinear data term; linear, so the diffusion gradient vanishes inside)."""
    G, L, q = (6, 5, 4), 11, 0.3
    h = 2 * q / (L - 1)
    gi = np.arange(G[0]) - 2.0
    truth = np.zeros((*G, 3))
    truth[..., 0] = h * gi[:, None, None]
    truth[..., 2] = -h
    p = _gaussian_probs(truth, L, q)
    start = truth + np.random.default_rng(11).normal(0, 0.7 * h, truth.shape)
    got = N.instance_optimise(p, start, L, q, S.RefineOptions(steps=150, lr=0.005, weight=0.05,
                                                              method="probs"))
    assert np.abs(got.grid_disp - truth).max() < 0.15 * h
    assert np.abs(got.grid_disp - truth).mean() < 0.05 * h


# --------------------------------------------------------------------------------------------
# composition
# --------------------------------------------------------------------------------------------
def _affine_field(shape, a, b):
    idx = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"), -1)
    return (idx @ np.asarray(a).T + b).astype(np.float32), idx


def test_composition_of_affine_fields_is_analytic():
    shape = (20, 18, 22)
    a1 = np.array([[0.02, 0.01, 0.0], [0.0, -0.03, 0.01], [0.01, 0.0, 0.02]])
    a2 = np.array([[-0.01, 0.0, 0.02], [0.01, 0.02, 0.0], [0.0, 0.01, -0.02]])
    u1, idx = _affine_field(shape, a1, [1.0, -0.5, 0.7])
    u2, _ = _affine_field(shape, a2, [0.4, 0.8, -0.6])
    # keep x + u2(x) inside the grid so that no border clamping is involved
    inner = tuple(slice(3, n - 3) for n in shape)
    expect = (u2.astype(np.float64) + (idx + u2) @ a1.T + np.array([1.0, -0.5, 0.7]))[inner]
    got_np = N.compose(u1, u2)[inner]
    got_t = R.compose_fields(torch.from_numpy(u1), torch.from_numpy(u2)).numpy()[inner]
    np.testing.assert_allclose(got_np, expect, atol=2e-4)
    np.testing.assert_allclose(got_t, expect, atol=2e-4)


def test_composition_runtime_matches_reference_and_warps_like_two_warps():
    rng = np.random.default_rng(12)
    shape = (16, 14, 18)
    coarse = [rng.normal(0, 1.2, (4, 4, 4, 3)).astype(np.float32) for _ in range(2)]
    u1, u2 = (N.to_voxels(c / (np.array(shape) / 2), shape) for c in coarse)
    got = N.compose(u1, u2)
    ref = R.compose_fields(torch.from_numpy(u1), torch.from_numpy(u2)).numpy()
    np.testing.assert_allclose(got, ref, atol=1e-4)
    # warping once with u equals warping twice (a smooth image, away from the border)
    x = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    img = np.sin(x[..., 0] / 4.0) + np.cos(x[..., 1] / 5.0) * np.sin(x[..., 2] / 6.0)
    img = img.astype(np.float32)
    from pddnet.runtime.resample import warp

    once = warp(img, got, order=1)
    twice = warp(warp(img, u1, order=1), u2, order=1)
    inner = tuple(slice(4, n - 4) for n in shape)
    assert np.abs(once - twice)[inner].max() < 0.05


def test_compose_rejects_mismatched_fields():
    with pytest.raises(PddnetError, match="compose"):
        N.compose(np.zeros((4, 4, 4, 3)), np.zeros((4, 4, 5, 3)))


# --------------------------------------------------------------------------------------------
# options and stage-two geometry
# --------------------------------------------------------------------------------------------
def test_refine_options_validation_and_coercion():
    assert S.RefineOptions.coerce(None) is None
    assert S.RefineOptions.coerce(0) is None
    assert S.RefineOptions.coerce(7).steps == 7
    with pytest.raises(PddnetError, match="steps"):
        S.RefineOptions(steps=-1)
    with pytest.raises(PddnetError, match="lr"):
        S.RefineOptions(lr=0)
    with pytest.raises(PddnetError, match="refine must be"):
        S.RefineOptions.coerce("many")
    assert S.parse_modes("ff, inst,ff") == ["ff", "inst"]
    with pytest.raises(PddnetError, match="unknown registration mode"):
        S.parse_modes("ff,fast")


def test_stage2_geometry():
    from pddnet.model.network import PDDNet
    from pddnet.spec.config import preset

    small = preset("small").as_dict()
    assert S.stage2_overrides(small) == {"grid": [30, 30, 30], "capture": 0.15}  # 1.5 x 20
    paper = S.stage2_overrides(preset("paper").as_dict())
    assert paper == {"grid": [48, 48, 48], "capture": 0.2}
    net = PDDNet(preset("tiny"), seed=1).eval()
    net2 = R.stage2_network(net)
    assert net2.config.grid == (9, 9, 9) and net2.config.capture == pytest.approx(0.15)
    assert net2.config.disp_size == net.config.disp_size
    for (k, a), (_, b) in zip(net.state_dict().items(), net2.state_dict().items()):
        assert torch.equal(a, b), k
    # a finer lattice: the stage-two displacement step is half of stage one's
    assert net2.config.disp_step == pytest.approx(net.config.disp_step / 2)
    with pytest.raises(PddnetError, match="changes the weights"):
        R.stage2_network(net, {"channels": 8})
    # the stage-two network registers on its own grid
    x = torch.randn(1, 1, 24, 24, 24)
    reg = net2(x, x)
    assert reg.grid_disp.shape == (9, 9, 9, 3) and reg.probs.shape == (9, 9, 9, 125)


def test_network_for_config_follows_an_overridden_export():
    from pddnet.model.network import PDDNet
    from pddnet.spec.config import preset

    net = PDDNet(preset("tiny"), seed=4).eval()
    assert R.network_for_config(net, net.config.as_dict()) is net
    cfg2 = {**net.config.as_dict(), "grid": [9, 9, 9], "capture": 0.15}
    net2 = R.network_for_config(net, cfg2)
    assert net2.config.grid == (9, 9, 9) and net2.config.capture == 0.15
    assert torch.equal(net2.alpha, net.alpha)
    with pytest.raises(PddnetError, match="channels"):
        R.network_for_config(net, {**net.config.as_dict(), "channels": 8})


def test_register_stages_shapes_and_identity_of_stage_one():
    from pddnet.model.network import PDDNet
    from pddnet.spec.config import preset

    net = PDDNet(preset("tiny"), seed=2).eval()
    rng = torch.Generator().manual_seed(0)
    f, m = torch.randn(1, 1, 24, 24, 24, generator=rng), torch.randn(1, 1, 24, 24, 24,
                                                                      generator=rng)
    ff = R.register_stages(net, f, m)
    with torch.no_grad():
        direct = net(f, m).dense((24, 24, 24))
    assert torch.allclose(ff.disp, direct)
    for method, which in (("probs", [1, 2]), ("features", [2])):
        two = R.register_stages(net, f, m, stages=2,
                                refine=S.RefineOptions(steps=3, method=method))
        assert two.disp.shape == (24, 24, 24, 3) and len(two.stages) == 2
        assert two.stages[1].config.grid == (9, 9, 9)
        assert two.refine_stages == which
        assert set(two.times_ms) == {"features", "head", "warp", "features2", "head2",
                                     "refine2", "compose"} | ({"refine"} if 1 in which else set())
        expect = R.compose_fields(two.stages[0].disp, two.stages[1].disp)
        assert torch.allclose(two.disp, expect)


# --------------------------------------------------------------------------------------------
# export and the runtime pipeline
# --------------------------------------------------------------------------------------------
SHAPE = (24, 24, 24)


@pytest.fixture(scope="module")
def sharp_tiny(tmp_path_factory):
    """A tiny network made to see structure (larger OBELISK offsets, a larger cost scale and
    softmax temperature than at initialisation, so that its probabilities are peaked and the
    fields reach a few voxels on :func:`_pair`), its checkpoint, and an export of both stages
    with the probabilities."""
    from helpers.tiny_pipeline import sharp_tiny_two_stage

    return sharp_tiny_two_stage(tmp_path_factory.mktemp("refine"), seed=3, shape=SHAPE)


def _pair(seed=13):
    """Smooth random CT-like texture and a copy shifted by (2, -1, 1) voxels."""
    from helpers.fake_models import ct_like, grid_affine
    from pddnet.data.io import Volume

    fixed = ct_like(np.random.default_rng(seed), SHAPE, sigma=2.5)
    aff = grid_affine(4.0)
    return Volume(fixed, aff), Volume(np.roll(fixed, (2, -1, 1), axis=(0, 1, 2)), aff)


def _norm(v):
    return torch.from_numpy(np.clip(v.array, -1000, 1500) / 500).float()[None, None]


def test_export_stage2_writes_a_linked_model(sharp_tiny):
    from pddnet.graph.model import load_model
    from pddnet.spec.refine import stage2_path

    _, _, model = sharp_tiny
    second = stage2_path(model)
    assert second.name == "tiny.stage2.onnx" and second.exists()
    one, two = load_model(model), load_model(second)
    meta = {p.key: json.loads(p.value) for p in one.proto.metadata_props}
    assert meta[C.META_STAGE2]["file"] == second.name
    assert meta[C.META_STAGE2]["sha256"] == two.info.sha256
    assert two.info.config["grid"] == [9, 9, 9]
    assert two.info.config["capture"] == pytest.approx(0.15)
    assert "probs" in two.info.outputs
    shapes = {o.name: [d.dim_value for d in o.type.tensor_type.shape.dim]
              for o in two.proto.graph.output}
    assert shapes["grid_disp"] == [9, 9, 9, 3] and shapes["probs"] == [9, 9, 9, 125]
    meta2 = {p.key: json.loads(p.value) for p in two.proto.metadata_props}
    assert meta2[C.META_OVERRIDES]["overrides"]["grid"] == [9, 9, 9]
    assert meta2[C.META_OVERRIDES]["base_config"]["grid"] == [6, 6, 6]


def test_export_with_overrides(sharp_tiny, tmp_path):
    from pddnet.export.onnx_export import export_checkpoint
    from pddnet.graph.model import load_model

    _, ckpt, _ = sharp_tiny
    path = export_checkpoint(ckpt, tmp_path / "g8.onnx", overrides={"grid": [8, 8, 8],
                                                                     "capture": 0.2})
    info = load_model(path).info
    assert info.config["grid"] == [8, 8, 8] and info.config["capture"] == 0.2
    with pytest.raises(PddnetError, match="invalid config overrides"):
        export_checkpoint(ckpt, tmp_path / "bad.onnx", overrides={"channels": 3})


def test_runtime_refine_and_two_stages_match_reference(sharp_tiny):
    """Parity on the same inputs: the reference refines and composes the runtime's own network
    outputs (ONNX Runtime's ``probs``/``grid_disp`` of each stage) -- within 1e-4 voxel, far
    inside the 0.05 bound. End to end (PyTorch network vs ONNX Runtime network, whose outputs
    differ by ~1e-6) two stages without refinement agree as tightly; with refinement a few
    control points may cross a lattice plane (where the trilinear data term has a kink) one
    Adam step apart, so the bound there is on the 99th percentile (docs/refinement.md)."""
    from pddnet.runtime.session import Registrar

    net, _, model = sharp_tiny
    fixed, moving = _pair()
    f, m = _norm(fixed), _norm(moving)
    cfg = net.config
    cfg2 = R.stage2_network(net).config
    opts = S.RefineOptions(steps=30, method="probs")

    def refined(probs, grid, c):
        g = R.instance_optimise(torch.from_numpy(probs), torch.from_numpy(grid), c.disp_size,
                                c.capture, opts).grid_disp
        return ops.dense_displacement(g, SHAPE)

    for kw in ({"refine": opts}, {"stages": 2}, {"stages": 2, "refine": opts}):
        with Registrar(model, threads=1, **kw) as reg:
            res = reg.register(fixed, moving)
        end_to_end = R.register_stages(net, f, m, **kw).disp.numpy()
        assert np.abs(end_to_end).max() > 1.0, kw  # a real displacement, not two zeros
        diff = np.abs(res.disp_model - end_to_end)
        if "refine" in kw:
            o = res.model_outputs
            same = refined(o["probs"], o["grid_disp"], cfg)
            if kw.get("stages") == 2:
                same = R.compose_fields(same, refined(o["probs_stage2"], o["grid_disp_stage2"],
                                                      cfg2))
            np.testing.assert_allclose(res.disp_model, same.numpy(), atol=1e-4, err_msg=str(kw))
            assert np.quantile(diff, 0.99) < PARITY_VOXELS and diff.max() < 0.5, kw
        else:
            assert diff.max() < 1e-3, kw
        assert res.stages["stages"] == kw.get("stages", 1)
        t = res.timings_ms
        assert (t["refine"] is not None) == ("refine" in kw)
        assert (t["stage2"] is not None) == ("stages" in kw)
        if "stages" in kw:
            assert res.stages["stage2_model"]["features"] == "reused from stage one"
            assert res.stages["per_stage"][1]["grid"] == [9, 9, 9]
        json.dumps(res.summary())  # strict JSON


@pytest.mark.parametrize("method", ["features", "probs"])
def test_runtime_refinement_changes_the_network_field(sharp_tiny, method):
    from pddnet.runtime.session import Registrar

    _, _, model = sharp_tiny
    fixed, moving = _pair(14)
    with Registrar(model, threads=1) as reg:
        plain = reg.register(fixed, moving)
    with Registrar(model, threads=1, refine=S.RefineOptions(steps=20, method=method)) as reg:
        refined = reg.register(fixed, moving)
    np.testing.assert_array_equal(refined.model_outputs["disp_network"], plain.disp_model)
    assert np.abs(refined.disp_model - plain.disp_model).max() > 0.05
    info = refined.stages["per_stage"][0]["refine"]
    assert info["method"] == method == refined.stages["refine"]["method"]
    if method == "probs":
        p = info["mean_probability"]
        assert p[1] > p[0]  # the fit raised the probability at the control points
        assert info["grid"] == [6, 6, 6]
    else:
        ssd = info["feature_ssd"]
        assert ssd[1] < ssd[0]  # the fit brought the features closer
        assert info["grid"] == [8, 8, 8]  # the feature grid, a third of 24^3


def test_refine_needs_probs_and_stages_need_a_stage2_model(sharp_tiny, tmp_path):
    import shutil

    from pddnet.export.onnx_export import export_checkpoint
    from pddnet.runtime.session import Registrar

    _, ckpt, model = sharp_tiny
    plain = export_checkpoint(ckpt, tmp_path / "plain.onnx")
    with pytest.raises(PddnetError, match="--probs"):
        Registrar(plain, refine=S.RefineOptions(steps=5, method="probs"))
    with Registrar(plain, refine=5, threads=1) as reg:  # the features need no probs output
        assert reg.register(*_pair(15)).stages["refine"]["method"] == "features"
    with pytest.raises(PddnetError, match="--stage2"):
        Registrar(plain, stages=2)
    # the stage-two model must be next to the model, unchanged
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(model, lone / "tiny.onnx")
    with pytest.raises(PddnetError, match="stage-two model"):
        Registrar(lone / "tiny.onnx", stages=2)
    # ... or given explicitly
    with Registrar(lone / "tiny.onnx", stages=2, stage2_model=model.with_name("tiny.stage2.onnx"),
                   threads=1) as reg:
        assert reg.register(*_pair(15)).disp.shape == SHAPE + (3,)
    # a stage-two model from another export is refused
    other = export_checkpoint(ckpt, tmp_path / "other.onnx", overrides={"grid": [7, 7, 7]})
    shutil.copy(other, lone / "tiny.stage2.onnx")
    with pytest.raises(PddnetError, match="SHA-256"):
        Registrar(lone / "tiny.onnx", stages=2)
    with pytest.raises(PddnetError, match="stages must be 1 or 2"):
        Registrar(model, stages=3)


def test_cli_export_stage2_and_register_modes(sharp_tiny, tmp_path):
    from click.testing import CliRunner

    from helpers.fake_models import save_volume
    from pddnet.cli import main

    _, ckpt, _ = sharp_tiny
    runner = CliRunner()
    res = runner.invoke(main, ["export", str(ckpt), "--out", str(tmp_path / "m.onnx"), "--probs",
                               "--stage2", "--stage2-grid", "8", "8", "8"])
    assert res.exit_code == 0, res.output
    assert "stage two" in res.output and (tmp_path / "m.stage2.onnx").exists()
    fixed, moving = _pair(16)
    fp = save_volume(tmp_path / "f.nii.gz", fixed.array, fixed.affine)
    mp = save_volume(tmp_path / "mv.nii.gz", moving.array, moving.affine)
    res = runner.invoke(main, ["register", "--model", str(tmp_path / "m.onnx"), "--fixed", str(fp),
                               "--moving", str(mp), "--out", str(tmp_path / "out"),
                               "--refine", "5", "--stages", "2", "--threads", "1"])
    assert res.exit_code == 0, res.output
    assert "stage2" in res.output  # stage two's time includes its refinement
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["stages"]["stages"] == 2
    assert summary["stages"]["refine"]["steps"] == 5
    assert summary["stages"]["refine"]["method"] == "features"
    assert summary["stages"]["per_stage"][1]["refine"]["method"] == "features"
    assert summary["stages"]["per_stage"][1]["grid"] == [8, 8, 8]
    # features in two stages: stage two only (stages_refined "last"), recorded
    assert summary["stages"]["refine"]["stages_refined"] == "last"
    assert summary["stages"]["refine_stages"] == [2]
    assert [s["refined"] for s in summary["stages"]["per_stage"]] == [False, True]
    assert summary["timings_ms"]["refine"] is None and summary["timings_ms"]["stage2"] > 0
    res = runner.invoke(main, ["register", "--model", str(tmp_path / "m.onnx"), "--fixed", str(fp),
                               "--moving", str(mp), "--out", str(tmp_path / "out_all"),
                               "--refine", "5", "--stages", "2", "--refine-stages", "all",
                               "--threads", "1"])
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "out_all" / "summary.json").read_text())
    assert "refine" in res.output and "stage2" in res.output
    assert summary["stages"]["refine_stages"] == [1, 2]
    assert summary["timings_ms"]["refine"] > 0 and summary["timings_ms"]["stage2"] > 0
    res = runner.invoke(main, ["register", "--model", str(tmp_path / "m.onnx"), "--fixed", str(fp),
                               "--moving", str(mp), "--out", str(tmp_path / "out2"),
                               "--refine", "5", "--refine-method", "probs", "--threads", "1"])
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "out2" / "summary.json").read_text())
    assert summary["stages"]["refine"]["method"] == "probs"
    assert summary["stages"]["refine"]["lr"] == S.METHOD_DEFAULTS["probs"]["lr"]
    res = runner.invoke(main, ["export", str(ckpt), "--out", str(tmp_path / "x.onnx"),
                               "--stage2-grid", "8", "8", "8"])
    assert res.exit_code == 2 and "need --stage2" in res.output


def test_evaluate_reports_modes_side_by_side(tmp_path, sharp_tiny):
    """``evaluate_checkpoint`` with several modes on a two-subject synthetic dataset."""
    from pddnet.data.synth import write_dataset
    from pddnet.validation.evaluate import evaluate_checkpoint, format_table

    pytest.importorskip("tqdm")
    data = tmp_path / "data"
    try:
        write_dataset(data, subjects=4, seed=0, preset="small", progress=False)
    except TypeError:
        pytest.skip("write_dataset signature changed")
    # the tiny network at the small data's grid (96x80x128) is cheap enough for one pair
    _, ckpt, _ = sharp_tiny
    result = evaluate_checkpoint(ckpt, data, split="test", max_pairs=1, threads=1,
                                 progress=False, modes="ff,inst,2stage+inst,inst-probs", refine=5)
    assert list(result["modes"]) == ["ff", "inst", "2stage+inst", "inst-probs"]
    per_mode = result["mode_settings"]["refine_per_mode"]
    assert per_mode["inst"]["method"] == "features" and per_mode["inst-probs"]["method"] == "probs"
    assert per_mode["inst-probs"]["steps"] == 5
    assert result["pairs"] == result["modes"]["ff"]["pairs"]
    t = result["modes"]["2stage+inst"]["mean"]["times_ms"]
    assert {"features", "head", "warp", "features2", "head2", "refine2", "compose"} <= set(t)
    assert "refine" not in t  # features: stage two only
    assert "refine" not in result["modes"]["ff"]["mean"]["times_ms"]
    table = format_table(result)
    assert "2stage+inst" in table and "refine2" in table


TORCH_FREE = r"""
import sys
sys.modules["torch"] = None          # any `import torch` now raises ImportError
from pddnet.cli import main
from pddnet.runtime.session import Registrar

model, fixed, moving, out = sys.argv[1:5]
with Registrar(model, threads=1, refine=5, stages=2) as reg:
    res = reg.register(fixed, moving)
assert res.stages["refine_stages"] == [2] and res.timings_ms["stage2"] > 0
assert res.stages["per_stage"][1]["times_ms"]["refine"] > 0
try:
    main(["register", "--model", model, "--fixed", fixed, "--moving", moving, "--out", out,
          "--refine", "3", "--stages", "2", "--threads", "1"], standalone_mode=False)
except SystemExit as exc:
    assert not exc.code, exc.code
leaked = sorted(m for m in sys.modules
                if m.startswith("torch.") or m == "pddnet.model" or m.startswith("pddnet.model."))
assert not leaked, leaked
print("TORCH-FREE REFINE OK")
"""


def test_refinement_and_two_stages_run_without_torch(sharp_tiny, tmp_path):
    """The runtime's refinement and second stage never import torch or pddnet.model."""
    import subprocess
    import sys
    from pathlib import Path

    from helpers.fake_models import save_volume

    _, _, model = sharp_tiny
    fixed, moving = _pair(17)
    fp = save_volume(tmp_path / "f.nii.gz", fixed.array, fixed.affine)
    mp = save_volume(tmp_path / "m.nii.gz", moving.array, moving.affine)
    src = Path(__file__).resolve().parents[2] / "src"
    proc = subprocess.run([sys.executable, "-c", TORCH_FREE, str(model), str(fp), str(mp),
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(src), "PATH": ""})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "TORCH-FREE REFINE OK" in proc.stdout
    assert (tmp_path / "out" / "summary.json").exists()


def test_validate_compares_modes_side_by_side(tmp_path):
    """``compare`` with :func:`mode_candidates`: each mode's ONNX Runtime candidate is compared
    with the reference in the same mode, the reference in a mode with the feed-forward
    reference; stage times and the modes table are reported; latency includes the stages."""
    from pddnet.data.synth import write_dataset
    from pddnet.export.onnx_export import export_checkpoint
    from pddnet.model.checkpoint import save_checkpoint
    from pddnet.model.network import PDDNet
    from pddnet.spec.config import preset
    from pddnet.validation.compare import compare, default_candidates, mode_candidates
    from pddnet.validation.report import format_table

    data = tmp_path / "data"
    write_dataset(data, subjects=4, seed=0, preset="small", progress=False)
    net = PDDNet(preset("tiny"), seed=3).eval()
    with torch.no_grad():
        net.features.offsets *= 10.0
        net.alpha[0] = 1000.0
        net.alpha[5] = 20.0
    shape = (48, 40, 64)
    ckpt = save_checkpoint(tmp_path / "t.pt", net, image_shape=shape,
                           metadata={"spacing_mm": [8.0, 8.0, 8.0]})
    model = export_checkpoint(ckpt, tmp_path / "t.onnx", outputs=("probs",), stage2=True)
    ref, cands = default_candidates(ckpt, model)
    cands += mode_candidates(ckpt, model, "ff,inst,2stage", refine_steps=10)
    assert [c.name for c in cands] == ["onnxruntime-fp32", "pytorch+inst",
                                       "onnxruntime-fp32+inst", "pytorch+2stage",
                                       "onnxruntime-fp32+2stage"]
    report = compare(ref, cands, data, max_pairs=1, threads=1, warmup=0, repeats=1,
                     isolate=False, progress=False)
    c = report["candidates"]
    assert c["pytorch+inst"]["compared_with"] == "pytorch" and c["pytorch+inst"]["gates"] == []
    assert c["onnxruntime-fp32+inst"]["compared_with"] == "pytorch+inst"
    assert c["onnxruntime-fp32+inst"]["mode"] == "inst"
    assert [g["metric"] for g in c["onnxruntime-fp32+inst"]["gates"]] == ["delta_dice_points"]
    assert [g["metric"] for g in c["onnxruntime-fp32+2stage"]["gates"]] == [
        "disp_diff_max_vox", "delta_dice_points"]
    # two stages without refinement: ONNX Runtime and PyTorch agree closely end to end
    assert c["onnxruntime-fp32+2stage"]["summary"]["disp_diff_max_vox"] < 0.05
    st = c["onnxruntime-fp32+2stage"]["summary"]["stage_ms"]
    assert st["stage2"] > 0 and st["refine"] is None
    assert c["onnxruntime-fp32+inst"]["summary"]["stage_ms"]["refine"] > 0
    pair = c["onnxruntime-fp32+inst"]["pairs"][0]
    assert pair["model_ms"] == pytest.approx(sum(v for v in pair["stage_ms"].values() if v))
    assert c["onnxruntime-fp32"]["summary"]["stage_ms"]["refine"] is None
    assert report["status"] == "passed", report["failed_gates"]
    table = format_table(report)
    assert "registration modes" in table and "onnxruntime-fp32+2stage" in table
    json.dumps(report)


def test_run_model_includes_refinement_and_stage_two(sharp_tiny):
    from pddnet.runtime.preprocess import prepare_fixed, prepare_moving
    from pddnet.runtime.session import Registrar

    _, _, model = sharp_tiny
    fixed, moving = _pair(18)
    with Registrar(model, threads=1) as plain, \
            Registrar(model, threads=1, refine=5, stages=2) as staged:
        pf = prepare_fixed(fixed, plain.info)
        pm = prepare_moving(moving, pf, plain.info)
        outs0, ms0 = plain.run_model(pf.array, pm.array)
        outs1, ms1 = staged.run_model(pf.array, pm.array)
        res = staged.register(fixed, moving)
    assert "disp_network" in outs1 and "probs_stage2" in outs1
    np.testing.assert_allclose(outs1["disp_network"], outs0["disp"], atol=1e-6)
    np.testing.assert_allclose(outs1["disp"], res.disp_model, atol=1e-5)
    assert ms1 > ms0 > 0


def test_export_overwrite_of_a_stage_pair_is_all_or_nothing(sharp_tiny, tmp_path, monkeypatch):
    """``export --stage2 --overwrite`` interrupted after the stage-two model was built and while
    the stage-one model is saved leaves the previous pair exactly as it was (no temporary file,
    no lock); an uninterrupted run replaces both and links them by SHA-256."""
    import onnx

    from pddnet._files import sha256_file
    from pddnet.export.onnx_export import export_checkpoint

    _, ckpt, _ = sharp_tiny
    out = tmp_path / "m.onnx"
    export_checkpoint(ckpt, out, outputs=("probs",), stage2=True)
    second = tmp_path / "m.stage2.onnx"
    before = {p.name: sha256_file(p) for p in (out, second)}
    real = onnx.save_model
    calls = []

    def save_then_interrupt(model, path, *a, **k):
        calls.append(path)
        if len(calls) == 2:  # the stage-one model, after the stage-two one was written
            raise KeyboardInterrupt
        return real(model, path, *a, **k)

    monkeypatch.setattr(onnx, "save_model", save_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        export_checkpoint(ckpt, out, outputs=("probs", "entropy"), stage2=True, overwrite=True)
    monkeypatch.setattr(onnx, "save_model", real)
    assert len(calls) == 2
    assert {p.name: sha256_file(p) for p in (out, second)} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.stage2.onnx"]
    export_checkpoint(ckpt, out, outputs=("probs", "entropy"), stage2=True, overwrite=True)
    link = json.loads({p.key: p.value for p in onnx.load(out).metadata_props}[C.META_STAGE2])
    assert link["sha256"] == sha256_file(second) != before["m.stage2.onnx"]
