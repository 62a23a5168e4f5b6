"""Refinement on image evidence (method ``features``, issue 13): the numpy runtime against
finite differences, autograd and the PyTorch reference on fresh random inputs; a known
translation; the options and modes; the runtime path through ``Registrar`` and its fallback.

Not tested here: registration quality with trained weights and the speed claim (measured on
held-out synthetic pairs by ``scripts/refine_modes.py``; figures in docs/benchmarks.md).
"""

import numpy as np
import pytest

from pddnet.errors import PddnetError
from pddnet.runtime import refine as N
from pddnet.spec import refine as S

torch = pytest.importorskip("torch")

from pddnet.model import ops  # noqa: E402
from pddnet.model import refine as R  # noqa: E402


def _features(rng, c, shape, shift=(1.0, -0.5, 0.7), band=(0.15, 0.5)):
    """Smooth random features (a few sinusoids per channel, ``band`` radians per voxel) and the
    same function shifted by ``shift`` feature voxels: ``m(x) = f(x - shift)``."""
    x = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"))
    freq = rng.uniform(*band, (c, 3, 3)) * rng.choice([-1, 1], (c, 3, 3))
    phase = rng.uniform(0, 2 * np.pi, (c, 3))

    def f(pts):
        return np.stack([sum(np.sin(np.einsum("a,a...->...", freq[ch, t], pts) + phase[ch, t])
                             for t in range(3)) for ch in range(c)])

    sh = np.asarray(shift)[:, None, None, None]
    return f(x)[None], f(x - sh)[None]


def _theta(rng, shape, scale=0.15):
    return rng.normal(0.0, scale, (*shape, 3))


# --------------------------------------------------------------------------------------------
# energy, gradient, inputs
# --------------------------------------------------------------------------------------------
def test_feature_inputs_match_reference_and_keep_the_ssd_with_all_components():
    rng = np.random.default_rng(21)
    f = rng.normal(size=(5, 6, 4, 7)) * rng.uniform(0.5, 3, (5, 1, 1, 1))
    m = f + rng.normal(0, 0.3, f.shape)
    for k in (2, 5, 9):
        a = N.feature_inputs(f, m, k)
        b = R.feature_inputs(torch.tensor(f[None]), torch.tensor(m[None]), k)
        assert a[0].shape == (min(k, 5), 6, 4, 7)
        # eigenvector signs are arbitrary: compare component by component up to sign
        for x, y in zip(a, b):
            y = y[0].numpy()
            sign = np.sign(np.sum(x * y, axis=(1, 2, 3)))[:, None, None, None]
            np.testing.assert_allclose(x, sign * y, atol=1e-10)
    # with every component the projection is a rotation: the SSD of the normalised maps
    s = f.std(axis=(1, 2, 3))[:, None, None, None]
    full = N.feature_inputs(f, m, 5)
    np.testing.assert_allclose(((full[0] - full[1]) ** 2).sum(), ((f - m) ** 2 / s ** 2).sum(),
                               rtol=1e-12)


def _sampler_case(seed, c=3, shape=(6, 5, 7)):
    rng = np.random.default_rng(seed)
    f, m = (x[0] for x in _features(rng, c, shape))
    return N.FeatureSampler(*N.feature_inputs(f, m, c)), rng


def test_feature_gradient_matches_finite_differences():
    sampler, rng = _sampler_case(22)
    theta = _theta(rng, sampler.shape, 0.25)  # many points past the border too
    _, _, _, grad = N.feature_energy(theta, sampler, 0.8, grad=True)
    eps = 1e-6
    fd = np.zeros_like(theta)
    for idx in np.ndindex(theta.shape):
        tp, tm = theta.copy(), theta.copy()
        tp[idx] += eps
        tm[idx] -= eps
        fd[idx] = (N.feature_energy(tp, sampler, 0.8)[0] - N.feature_energy(tm, sampler, 0.8)[0]) \
            / (2 * eps)
    np.testing.assert_allclose(grad, fd, atol=1e-6 * np.abs(fd).max())


def test_feature_energy_and_gradient_match_autograd():
    rng = np.random.default_rng(23)
    shape = (7, 6, 8)
    f, m = _features(rng, 4, shape)
    fi, mi = R.feature_inputs(torch.tensor(f), torch.tensor(m), 3)
    sampler = N.FeatureSampler(*N.feature_inputs(f[0], m[0], 3))
    theta = _theta(rng, shape, 0.3)
    e, data, smooth, grad = N.feature_energy(theta, sampler, 1.7, grad=True)
    th = torch.tensor(theta, requires_grad=True)
    et, dt, st = R.feature_energy(th, fi, mi, 1.7)
    et.backward()
    assert e == pytest.approx(et.item(), abs=1e-13)
    assert data == pytest.approx(dt.item(), abs=1e-13)
    assert smooth == pytest.approx(st.item(), abs=1e-13)
    np.testing.assert_allclose(grad, th.grad.numpy(), atol=1e-12 * np.abs(grad).max())


def test_upsample_matches_reference():
    g = np.random.default_rng(24).normal(size=(4, 5, 3, 3))
    ref = ops.upsample_field(torch.tensor(g), (11, 9, 8)).numpy()
    np.testing.assert_allclose(N.upsample(g, (11, 9, 8)), ref, atol=1e-13)


# --------------------------------------------------------------------------------------------
# the optimisation: parity and a known answer
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape,grid,k", [((8, 7, 9), (4, 3, 5), 4), ((10, 8, 6), (6, 6, 6), 2)])
def test_runtime_feature_refinement_matches_reference(shape, grid, k):
    rng = np.random.default_rng(25)
    f, m = _features(rng, 5, shape)
    g = rng.normal(0, 0.08, (*grid, 3))
    opts = S.RefineOptions(steps=40, lr=0.02, weight=0.5, components=k)
    got = N.feature_optimise(f.astype(np.float32), m.astype(np.float32), g, opts)
    ref = R.feature_optimise(torch.tensor(f, dtype=torch.float32),
                             torch.tensor(m, dtype=torch.float32), torch.tensor(g), opts)
    # the same trajectory: energies to float64 rounding, the field to its float32 output
    assert got.energy == pytest.approx(ref.energy, abs=1e-11)
    assert got.data == pytest.approx(ref.data, abs=1e-11)
    np.testing.assert_allclose(got.grid_disp, ref.grid_disp.numpy(), atol=2e-7)
    assert got.energy[1] < 0.8 * got.energy[0]  # the fit lowered the energy
    start = N.smooth(N.upsample(g, shape))
    assert np.abs(got.grid_disp - start).max() > 0.02  # and moved the field


def test_feature_refinement_recovers_a_known_translation():
    shape = (14, 12, 16)
    shift = np.array([1.0, -1.0, 1.0])  # whole feature voxels: m(x + shift) = f(x) exactly
    f, m = _features(np.random.default_rng(26), 4, shape, shift)
    truth = shift * 2.0 / np.asarray(shape)  # normalised
    opts = S.RefineOptions(steps=200, lr=0.005, weight=0.1, components=4)
    inner = (slice(3, -3),) * 3
    for impl in ("numpy", "torch"):
        if impl == "numpy":
            u = N.feature_optimise(f, m, np.zeros((4, 4, 4, 3)), opts).grid_disp
        else:
            u = R.feature_optimise(torch.tensor(f), torch.tensor(m), torch.zeros(4, 4, 4, 3,
                                   dtype=torch.float64), opts).grid_disp.numpy()
        err_vox = np.abs(u[inner] - truth) * np.asarray(shape) / 2.0
        # from 1 voxel off to within 0.15 (the border, where the clamped moving map cannot
        # match, pulls a little through the smoothing and the diffusion term)
        assert err_vox.max() < 0.15 and err_vox.mean() < 0.03, (impl, err_vox.max())


def test_feature_optimise_rejects_bad_inputs():
    f = np.zeros((1, 3, 5, 5, 5), np.float32)
    with pytest.raises(PddnetError, match="features must both be"):
        N.feature_optimise(f, np.zeros((1, 3, 5, 5, 4)), np.zeros((2, 2, 2, 3)))
    with pytest.raises(PddnetError, match="grid_disp"):
        N.feature_optimise(f, f, np.zeros((2, 2, 3)))
    with pytest.raises(PddnetError, match="fits the features"):
        N.feature_optimise(f, f, np.zeros((2, 2, 2, 3)), S.RefineOptions(method="probs"))
    with pytest.raises(PddnetError, match="fits the probabilities"):
        N.instance_optimise(np.zeros((2, 2, 2, 27)), np.zeros((2, 2, 2, 3)), 3, 0.2,
                            S.RefineOptions())


# --------------------------------------------------------------------------------------------
# options and modes
# --------------------------------------------------------------------------------------------
def test_refine_options_per_method_defaults():
    d = S.RefineOptions()
    assert d.method == "features"
    assert (d.steps, d.lr, d.weight, d.components) == tuple(
        S.METHOD_DEFAULTS["features"][k] for k in ("steps", "lr", "weight", "components"))
    p = S.RefineOptions(method="probs")
    assert (p.steps, p.lr, p.weight, p.components) == (50, 0.02, 1.5, None)
    assert S.RefineOptions(steps=7).lr == S.METHOD_DEFAULTS["features"]["lr"]
    assert S.RefineOptions(steps=7).with_method("probs") == S.RefineOptions(steps=7,
                                                                            method="probs")
    assert S.RefineOptions.coerce(9).method == "features"
    assert S.RefineOptions().as_dict()["method"] == "features"
    with pytest.raises(PddnetError, match="method"):
        S.RefineOptions(method="mind")
    with pytest.raises(PddnetError, match="components"):
        S.RefineOptions(components=0)
    with pytest.raises(PddnetError, match="features' only"):
        S.RefineOptions(method="probs", components=4)
    # which stages two-stage registration refines: per method, explicit, validated
    assert d.stages_refined == "last" and p.stages_refined == "all"
    assert d.refined_stages(2) == [2] and d.refined_stages(1) == [1]
    assert p.refined_stages(2) == [1, 2] and p.refined_stages(1) == [1]
    assert S.RefineOptions(stages_refined="all").refined_stages(2) == [1, 2]
    assert S.RefineOptions(method="probs", stages_refined="last").refined_stages(2) == [2]
    assert S.RefineOptions.coerce({"stages_refined": "all"}).stages_refined == "all"
    assert d.as_dict()["stages_refined"] == "last"
    assert d.with_method("probs").stages_refined == "all"
    with pytest.raises(PddnetError, match="stages_refined"):
        S.RefineOptions(stages_refined="first")


def test_mode_options():
    base = S.RefineOptions(steps=12)
    assert S.mode_options("ff", base) is None and S.mode_options("2stage", base) is None
    assert S.mode_options("inst", base) is base
    assert S.mode_options("2stage+inst", None) == S.RefineOptions()
    p = S.mode_options("inst-probs", base)
    assert p.method == "probs" and p.steps == 12 and p.lr == S.METHOD_DEFAULTS["probs"]["lr"]
    assert S.MODES["2stage+inst-probs"] == (2, True)
    assert S.parse_modes("ff,inst-probs") == ["ff", "inst-probs"]


# --------------------------------------------------------------------------------------------
# the runtime path
# --------------------------------------------------------------------------------------------
SHAPE = (24, 24, 24)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny network with structured features (larger OBELISK offsets), its export with the
    probabilities and the stage-two model."""
    from helpers.tiny_pipeline import sharp_tiny_two_stage

    net, ckpt, model = sharp_tiny_two_stage(tmp_path_factory.mktemp("feat"), seed=5, shape=SHAPE)
    return net, model, ckpt


def _pair(seed):
    from helpers.fake_models import ct_like, grid_affine
    from pddnet.data.io import Volume

    fixed = ct_like(np.random.default_rng(seed), SHAPE, sigma=2.5)
    aff = grid_affine(4.0)
    return Volume(fixed, aff), Volume(np.roll(fixed, (2, -1, 1), axis=(0, 1, 2)), aff)


@pytest.mark.parametrize("stages", [1, 2])
def test_registrar_feature_refinement_equals_the_reference(tiny, stages):
    """End to end through ``Registrar``: the runtime's field equals the PyTorch reference run
    on the runtime's own feature maps and network fields (the same inputs), stage by stage."""
    from pddnet.graph.model import load_model
    from pddnet.runtime.preprocess import prepare_fixed, prepare_moving
    from pddnet.runtime.runner import PairRunner
    from pddnet.runtime.session import Registrar

    net, model, _ = tiny
    fixed, moving = _pair(31)
    opts = S.RefineOptions(steps=25)
    with Registrar(model, threads=1, refine=opts, stages=stages) as reg:
        res = reg.register(fixed, moving)
        info = reg.info
    pf = prepare_fixed(fixed, info)
    pm = prepare_moving(moving, pf, info)
    runner = PairRunner(load_model(model).proto, "onnxruntime", {"threads": 1})
    try:
        run = runner.run_pair(pf.array, pm.array)
    finally:
        runner.close()

    def ref(ff, fm, grid):
        g = R.feature_optimise(torch.from_numpy(ff), torch.from_numpy(fm),
                               torch.from_numpy(grid), opts).grid_disp
        return ops.dense_displacement(g.float(), SHAPE)

    u = ref(run.fixed_features, run.moving_features, run.outputs["grid_disp"])
    if stages == 1:
        np.testing.assert_allclose(res.disp_model, u.numpy(), atol=1e-4)
    else:
        # stages_refined "last" (the features default): stage one feeds stage two unrefined
        np.testing.assert_array_equal(res.model_outputs["disp_stage1"], run.outputs["disp"])
        assert res.stages["refine_stages"] == [2]
        assert [s["refined"] for s in res.stages["per_stage"]] == [False, True]
        assert "refine" not in res.stages["per_stage"][0] and res.timings_ms["refine"] is None
        # stage two refines the warped moving scan's features against the same fixed ones
        from pddnet.runtime.resample import warp

        m1 = warp(pm.array[0, 0], res.model_outputs["disp_stage1"], order=1)[None, None]
        runner2 = PairRunner(load_model(model.with_name("tiny.stage2.onnx")).proto,
                             "onnxruntime", {"threads": 1})
        try:
            run2 = runner2.run_pair(pf.array, m1.astype(np.float32))
        finally:
            runner2.close()
        u2 = ref(run2.fixed_features, run2.moving_features, run2.outputs["grid_disp"])
        expect = R.compose_fields(torch.from_numpy(res.model_outputs["disp_stage1"]), u2)
        np.testing.assert_allclose(res.disp_model, expect.numpy(), atol=1e-3)
        assert res.stages["per_stage"][1]["refine"]["method"] == "features"
    assert np.abs(res.disp_model - res.model_outputs["disp_network"]).max() > 0.05


@pytest.mark.parametrize("which", ["last", "all"])
def test_two_stage_feature_refinement_matches_the_reference_end_to_end(tiny, which):
    """Two stages with the feature fit, runtime (ONNX Runtime network, numpy refinement) vs
    the PyTorch reference (:func:`register_stages`: PyTorch network, float64 autograd
    refinement) end to end on the same pre-processed arrays of a fresh pair. The networks
    differ by ~1e-6, so the bound is the 99th percentile (docs/refinement.md). With
    ``stages_refined="last"`` stage one is the network's own field in both implementations."""
    from pddnet.runtime.preprocess import prepare_fixed, prepare_moving
    from pddnet.runtime.session import Registrar

    net, model, _ = tiny
    seed = int(np.random.default_rng().integers(100, 10_000))
    fixed, moving = _pair(seed)
    opts = S.RefineOptions(steps=25, stages_refined=which)
    with Registrar(model, threads=1, refine=opts, stages=2) as reg:
        res = reg.register(fixed, moving)
        info = reg.info
    pf = prepare_fixed(fixed, info)
    pm = prepare_moving(moving, pf, info)
    f, m = torch.from_numpy(pf.array), torch.from_numpy(pm.array)
    ref = R.register_stages(net, f, m, refine=opts, stages=2)
    assert ref.refine_stages == res.stages["refine_stages"] == ([2] if which == "last" else [1, 2])
    assert (ref.stages[0].refined is None) == (which == "last")
    assert ref.stages[1].refined is not None
    if which == "last":
        with torch.no_grad():
            network = net(f, m).dense(SHAPE)
        torch.testing.assert_close(ref.stages[0].disp, network)
        np.testing.assert_array_equal(res.model_outputs["disp_stage1"],
                                      res.model_outputs["disp_network"])
    e2e = ref.disp.numpy()
    assert np.abs(e2e).max() > 1.0, seed  # a real displacement
    d1 = np.abs(res.model_outputs["disp_stage1"] - ref.stages[0].disp.numpy())
    diff = np.abs(res.disp_model - e2e)
    assert np.quantile(d1, 0.99) < 0.05 and np.quantile(diff, 0.99) < 0.05, (which, seed)
    assert diff.max() < 0.5, (which, seed)


def test_unsplit_model_falls_back_to_the_probability_fit_and_says_so(tiny, tmp_path):
    from pddnet.export.onnx_export import export_checkpoint
    from pddnet.graph.model import load_model
    from pddnet.runtime.runner import PairRunner
    from pddnet.runtime.stages import StagePipeline

    _, model, ckpt = tiny
    loaded = load_model(model)
    whole = PairRunner(loaded.proto, "onnxruntime", {"threads": 1}, split=False)
    try:
        pipe = StagePipeline(loaded, refine=10, stage1=whole)
        assert pipe.refine.method == "probs" and pipe.refine.steps == 10
        assert "fell back to method 'probs'" in pipe.note
        assert pipe.describe()["refine_fallback"] == pipe.note
        fixed, moving = (np.random.default_rng(s).normal(size=(1, 1) + SHAPE).astype(np.float32)
                         for s in (1, 2))
        run = whole.run_pair(fixed, moving)
        outs, info = pipe.run(run.outputs, fixed=fixed, moving=moving)
        assert info["per_stage"][0]["refine"]["method"] == "probs"
        # the split runner keeps the features method
        split = PairRunner(loaded.proto, "onnxruntime", {"threads": 1})
        try:
            assert StagePipeline(loaded, refine=10, stage1=split).note is None
        finally:
            split.close()
    finally:
        whole.close()
    # without probs there is nothing to fall back to: a clear refusal
    plain = load_model(export_checkpoint(ckpt, tmp_path / "plain.onnx"))
    whole = PairRunner(plain.proto, "onnxruntime", {"threads": 1}, split=False)
    try:
        with pytest.raises(PddnetError, match="split into features and head"):
            StagePipeline(plain, refine=10, stage1=whole)
    finally:
        whole.close()


def test_refine_options_from_json_and_validate_mode_names():
    from pathlib import Path

    from pddnet.validation.compare import mode_candidates

    o = S.RefineOptions.coerce({"steps": 7, "method": "probs"})
    assert o == S.RefineOptions(steps=7, method="probs")
    with pytest.raises(PddnetError, match="unknown settings"):
        S.RefineOptions.coerce({"stpes": 7})
    cands = {c.name: c for c in mode_candidates("ck.pt", Path("m.onnx"),
                                                "ff,inst,inst-probs,2stage+inst-probs")}
    assert cands["pytorch+inst"].mode == "inst"
    assert cands["pytorch+inst-probs"].mode == "inst-probs"
    assert cands["onnxruntime-fp32+2stage+inst-probs"].mode == "2stage+inst-probs"
    assert S.RefineOptions.coerce(cands["pytorch+inst-probs"].registrar["refine"]).method == \
        "probs"
