"""The runtime end to end on fake contract models: known answers, orientation, resampling,
fixed-feature reuse, outputs (atomic, refusal of existing files) and the summary.

Not tested here: real exported PDD-Net weights (registration quality; the validation issue
covers Dice), GPU backends, very large volumes (timings at 192x160x256 are measured by hand
and quoted in the session module's report, not asserted), the CLI (tests/runtime/test_runtime_cli.py).
"""

import json

import nibabel as nib
import numpy as np
import pytest

from helpers.fake_models import (
    blob,
    centre_of_mass,
    ct_like,
    field_back,
    grid_affine,
    make_model,
    reorient,
    save_model,
    save_volume,
    volume_back,
)
from pddnet.data.io import Volume
from pddnet.errors import PddnetError
from pddnet.runtime import outputs as outmod
from pddnet.runtime.session import Registrar

SHAPE = (24, 21, 30)
AFF4 = grid_affine(4.0)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    return {
        "shift": save_model(make_model(SHAPE, translation=(2.0, -3.0, 1.0)), d / "shift.onnx"),
        "data": save_model(make_model(SHAPE, translation=(1.0, 2.0, -3.0), gain=0.4, seed=7),
                           d / "data.onnx"),
        "zero": save_model(make_model(SHAPE), d / "zero.onnx"),
        "labels5": save_model(make_model(SHAPE, num_labels=5), d / "labels5.onnx"),
    }


def _files(path):
    return sorted(p.name for p in path.iterdir()) if path.exists() else []


# --------------------------------------------------------------------------------------------
# known answers
# --------------------------------------------------------------------------------------------
def test_known_translation_field_and_warped_blob(models, tmp_path):
    rng = np.random.default_rng(31)
    t = np.array([2.0, -3.0, 1.0])
    c_m = np.array([11.3, 9.6, 14.2]) + rng.uniform(-1, 1, 3)
    fixed = Volume(ct_like(rng, SHAPE), AFF4)
    moving = Volume(blob(SHAPE, c_m), AFF4)
    with Registrar(models["shift"], threads=1) as reg:
        res = reg.register(fixed, moving)
    np.testing.assert_allclose(res.disp, np.broadcast_to(t, SHAPE + (3,)), atol=1e-5)
    # warped(x) = moving(x + t): the blob appears at c_m - t (exactly, away from the borders,
    # where border clamping repeats edge values)
    np.testing.assert_allclose(res.warped[3:-3, 3:-3, 3:-3],
                               blob(SHAPE, c_m - t)[3:-3, 3:-3, 3:-3], atol=1e-2)
    np.testing.assert_allclose(centre_of_mass(res.warped), c_m - t, atol=0.05)
    res.save(tmp_path)
    img = nib.load(tmp_path / "disp.nii.gz")
    assert img.shape == SHAPE + (3,) and img.get_data_dtype() == np.float32
    np.testing.assert_allclose(img.affine, AFF4)
    np.testing.assert_allclose(np.asarray(img.dataobj), res.disp)
    with np.load(tmp_path / "disp.npz") as npz:  # one array (Learn2Reg layout)
        assert npz.files == ["arr_0"]
        np.testing.assert_array_equal(npz["arr_0"], res.disp)
    summary = json.loads((tmp_path / "summary.json").read_text())
    np.testing.assert_allclose(summary["field"]["affine"], AFF4)  # the grid of disp.npz
    w = nib.load(tmp_path / "warped.nii.gz")
    np.testing.assert_allclose(np.asarray(w.dataobj), res.warped)


def test_resampling_2mm_input_to_4mm_model(models):
    """A pair at 2 mm (48x42x60) for a 4 mm model: the field doubles in file voxels."""
    rng = np.random.default_rng(32)
    shape2 = tuple(2 * n for n in SHAPE)
    aff2 = grid_affine(2.0)
    c_m = np.array([23.0, 20.5, 29.0]) + rng.uniform(-2, 2, 3)
    fixed = Volume(ct_like(rng, shape2), aff2)
    moving = Volume(blob(shape2, c_m, sigma=5.0), aff2)
    with Registrar(models["shift"]) as reg:
        res = reg.register(fixed, moving)
    t2 = 2 * np.array([2.0, -3.0, 1.0])
    assert res.disp.shape == shape2 + (3,)
    np.testing.assert_allclose(res.disp, np.broadcast_to(t2, shape2 + (3,)), atol=1e-5)
    np.testing.assert_allclose(res.warped[6:-6, 6:-6, 6:-6],
                               blob(shape2, c_m - t2, sigma=5.0)[6:-6, 6:-6, 6:-6], atol=1e-2)
    np.testing.assert_allclose(centre_of_mass(res.warped), c_m - t2, atol=0.05)
    assert any("resampled 48x42x60 @ 2 mm -> 24x21x30 @ 4 mm" in n for n in res.notes), res.notes


def test_moving_on_another_grid_is_resampled_in_world_coordinates(models):
    """Same world blob, moving stored at 3 mm on a shifted grid; zero field -> blobs coincide."""
    rng = np.random.default_rng(33)
    world_c = np.array([4.0, -2.0, 6.0]) + rng.uniform(-3, 3, 3)
    f_c = np.linalg.solve(AFF4, np.r_[world_c, 1])[:3]
    aff3 = grid_affine(3.0, origin=(-45.0, -33.0, -52.0))
    shape3 = (36, 30, 40)
    m_c = np.linalg.solve(aff3, np.r_[world_c, 1])[:3]
    fixed = Volume(blob(SHAPE, f_c, sigma=2.0), AFF4)
    moving = Volume(blob(shape3, m_c, sigma=2.0 * 4 / 3), aff3)
    with Registrar(models["zero"]) as reg:
        res = reg.register(fixed, moving)
    assert np.abs(res.disp).max() == 0.0
    np.testing.assert_allclose(centre_of_mass(res.warped), f_c, atol=0.05)
    assert any(n.startswith("moving: grid differs from the fixed scan") for n in res.notes)


# --------------------------------------------------------------------------------------------
# orientation
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flips, perm", [((0, 1), (0, 1, 2)),       # LPS
                                         ((0, 1), (2, 0, 1)),       # flipped and transposed
                                         ((2,), (1, 2, 0))])
def test_reoriented_pair_gives_the_same_field(models, tmp_path, flips, perm):
    rng = np.random.default_rng(34)
    f_arr, m_arr = ct_like(rng, SHAPE), ct_like(rng, SHAPE)
    ras_f = save_volume(tmp_path / "f_ras.nii.gz", f_arr, AFF4)
    ras_m = save_volume(tmp_path / "m_ras.nii.gz", m_arr, AFF4)
    fo, affo = reorient(f_arr, AFF4, flips, perm)
    mo, _ = reorient(m_arr, AFF4, flips, perm)
    other_f = save_volume(tmp_path / "f_other.nii.gz", fo, affo)
    other_m = save_volume(tmp_path / "m_other.nii.gz", mo, affo)
    with Registrar(models["data"]) as reg:
        a = reg.register(ras_f, ras_m)
        b = reg.register(other_f, other_m)
    assert np.abs(a.disp).max() > 0.5  # a non-trivial, image-dependent field
    np.testing.assert_allclose(field_back(b.disp, flips, perm), a.disp, atol=1e-5)
    np.testing.assert_allclose(volume_back(b.warped, flips, perm), a.warped, atol=1e-2)
    np.testing.assert_allclose(b.affine, affo)
    assert any("reoriented" in n and "-> RAS" in n for n in b.notes), b.notes


def test_field_components_follow_the_file_axes(models):
    """LPS storage, axes transposed (2, 0, 1): the RAS translation t = (2, -3, 1) is stored as
    (+1, -2, +3) -- component 0 is file axis 0 = RAS axis 2 (unflipped), component 1 is RAS
    axis 0 (flipped), component 2 is RAS axis 1 (flipped); in world millimetres it is the same
    vector, and a blob still moves by it."""
    rng = np.random.default_rng(35)
    fo, affo = reorient(ct_like(rng, SHAPE), AFF4, (0, 1), (2, 0, 1))
    shape_o = fo.shape
    c_m = np.array(shape_o) / 2 + rng.uniform(-1, 1, 3)
    moving = Volume(blob(shape_o, c_m), affo)
    assert "".join(nib.aff2axcodes(affo)) == "SLP"
    with Registrar(models["shift"]) as reg:
        res = reg.register(Volume(fo, affo), moving)
    expect = np.array([1.0, -2.0, 3.0])  # (t2, -t0, -t1)
    np.testing.assert_allclose(res.disp, np.broadcast_to(expect, shape_o + (3,)), atol=1e-5)
    t = np.array([2.0, -3.0, 1.0])
    np.testing.assert_allclose(affo[:3, :3] @ res.disp[5, 6, 7], AFF4[:3, :3] @ t, atol=1e-4)
    np.testing.assert_allclose(centre_of_mass(res.warped), c_m - expect, atol=0.05)


# --------------------------------------------------------------------------------------------
# reuse
# --------------------------------------------------------------------------------------------
def test_reuse_equals_independent_registration(models):
    rng = np.random.default_rng(36)
    lab = rng.integers(0, 4, SHAPE).astype(np.uint8)
    fixed = Volume(ct_like(rng, SHAPE), AFF4)
    movings = [Volume(ct_like(rng, SHAPE), AFF4) for _ in range(3)]
    with Registrar(models["data"]) as reg:
        reg.set_fixed(fixed, Volume(lab, AFF4))
        reused = [reg.register_moving(m, Volume(lab, AFF4)) for m in movings]
        single = [reg.register(fixed, m, Volume(lab, AFF4), Volume(lab, AFF4)) for m in movings]
    for r, s in zip(reused, single):
        assert np.array_equal(r.disp, s.disp) and np.array_equal(r.warped, s.warped)
        assert np.array_equal(r.warped_labels, s.warped_labels)
        assert r.metrics["dice_mean"] == s.metrics["dice_mean"]
    assert [r.reuse["fixed_features"] for r in reused] == ["computed", "reused", "reused"]
    assert reused[0].reuse["saved_ms"] == 0.0 and reused[1].reuse["saved_ms"] > 0
    assert reused[1].reuse["saved_ms"] == pytest.approx(
        reused[1].reuse["fixed_preprocess_ms"] + reused[1].reuse["fixed_branch_ms"])
    assert all(s.reuse["fixed_features"] == "computed" for s in single)


def test_register_moving_needs_set_fixed(models):
    with Registrar(models["zero"]) as reg:
        with pytest.raises(PddnetError, match="set_fixed"):
            reg.register_moving(Volume(np.ones(SHAPE, np.float32), AFF4))


def test_unsplittable_model_falls_back_to_the_full_model(tmp_path):
    import onnx

    m = make_model(SHAPE, translation=(1.0, 0.0, 0.0), gain=0.3)
    w = next(t for t in m.graph.initializer if t.name == "feat_w")
    arr = onnx.numpy_helper.to_array(w) * 2
    m.graph.initializer.append(onnx.numpy_helper.from_array(arr, "feat_w2"))
    next(n for n in m.graph.node if n.name == "moving/obelisk").input[1] = "feat_w2"
    p = save_model(m, tmp_path / "unsplit.onnx")
    rng = np.random.default_rng(37)
    f, mv = ct_like(rng, SHAPE), ct_like(rng, SHAPE)
    with Registrar(p) as reg:
        assert not reg.reuses_features
        res = reg.register(Volume(f, AFF4), Volume(mv, AFF4))
    assert "not reused" in res.notes[0] and res.timings_ms["features"] is None
    from pddnet.backends import create_backend

    with create_backend("onnxruntime", m) as be:
        norm = lambda a: (np.clip(a, -1000, 1500) / 500).astype(np.float32)[None, None]
        ref = be.run({"fixed": norm(f), "moving": norm(mv)})["disp"]
    np.testing.assert_array_equal(res.disp_model, ref)


# --------------------------------------------------------------------------------------------
# outputs and summary
# --------------------------------------------------------------------------------------------
def test_outputs_summary_and_metrics(models, tmp_path):
    rng = np.random.default_rng(38)
    f_lab = np.zeros(SHAPE, np.uint8)
    f_lab[6:14, 5:12, 8:20] = 1
    f_lab[14:20, 10:18, 4:12] = 2
    m_lab = np.roll(f_lab, (1, -2, 1), axis=(0, 1, 2))
    with Registrar(models["shift"]) as reg:
        res = reg.register(Volume(ct_like(rng, SHAPE), AFF4), Volume(ct_like(rng, SHAPE), AFF4),
                           moving_labels=Volume(m_lab, AFF4), fixed_labels=Volume(f_lab, AFF4))
    paths = res.save(tmp_path / "out", l2r_half=True)
    assert _files(tmp_path / "out") == sorted(["disp.nii.gz", "disp.npz", "disp_itk.nii.gz",
                                               "disp_l2r2020.npz", "summary.json",
                                               "warped.nii.gz", "warped_labels.nii.gz"])
    s = json.loads(paths["summary.json"].read_text())
    for k in ("load", "preprocess", "features", "head", "postprocess", "write"):
        assert isinstance(s["timings_ms"][k], float) and s["timings_ms"][k] >= 0, k
    assert s["reuse"]["fixed_features"] == "computed"
    assert s["model"]["image_shape"] == list(SHAPE) and s["backend"]["backend"] == "onnxruntime"
    # which implementation ran the head and the features' sampling (this fake model has no
    # DeformableSample3D nodes: ONNX Runtime, with the reason)
    assert s["backend"]["head"]["implementation"] and s["backend"]["sampling"]["reason"]
    assert s["inputs"]["fixed"]["orientation"] == "RAS" and s["notes"] == res.notes
    assert 0 <= s["metrics"]["dice_mean"] <= 1 and "dice_mean_before" in s["metrics"]
    assert s["field"]["units"] == "voxels of the fixed image grid"
    wl = nib.load(tmp_path / "out" / "warped_labels.nii.gz")
    assert wl.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asarray(wl.dataobj), res.warped_labels)
    # warped labels are the moving labels shifted by t = (2, -3, 1) (nearest, border clamp)
    np.testing.assert_array_equal(res.warped_labels[2:20, 5:18, 2:25],
                                  m_lab[4:22, 2:15, 3:26])
    half = np.load(tmp_path / "out" / "disp_l2r2020.npz")["arr_0"]
    assert half.shape == (3, 12, 10, 15) and half.dtype == np.float16
    np.testing.assert_allclose(half[:, 2:-2, 2:-2, 2:-2].reshape(3, -1).mean(1), [2, -3, 1],
                               atol=1e-2)


def test_existing_outputs_are_refused_then_overwritten(models, tmp_path):
    rng = np.random.default_rng(39)
    with Registrar(models["zero"]) as reg:
        res = reg.register(Volume(ct_like(rng, SHAPE), AFF4), Volume(ct_like(rng, SHAPE), AFF4))
    res.save(tmp_path)
    before = (tmp_path / "summary.json").read_text()
    with pytest.raises(PddnetError, match="already holds disp.nii.gz.*--overwrite"):
        res.save(tmp_path)
    assert (tmp_path / "summary.json").read_text() == before
    res.save(tmp_path, overwrite=True)
    assert not [p for p in tmp_path.iterdir() if ".partial" in p.name]


@pytest.mark.parametrize("exc", [KeyboardInterrupt, OSError])
def test_interrupted_save_leaves_nothing(models, tmp_path, monkeypatch, exc):
    rng = np.random.default_rng(40)
    with Registrar(models["zero"]) as reg:
        res = reg.register(Volume(ct_like(rng, SHAPE), AFF4), Volume(ct_like(rng, SHAPE), AFF4))
    real = outmod.save_nifti
    calls = []

    def flaky(path, *a, **k):
        calls.append(path)
        if len(calls) == 2:  # after disp.nii.gz and disp.npz, while writing disp_itk.nii.gz
            raise exc("interrupted")
        return real(path, *a, **k)

    monkeypatch.setattr(outmod, "save_nifti", flaky)
    with pytest.raises(exc):
        res.save(tmp_path / "new" / "out")
    assert not (tmp_path / "new").exists()  # the folders it created are gone too
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "other.txt").write_text("not ours")
    calls.clear()
    with pytest.raises(exc):
        res.save(tmp_path / "kept")
    assert _files(tmp_path / "kept") == ["other.txt"]


# --------------------------------------------------------------------------------------------
# bad inputs (the CLI tests check the same errors leave no output folder content)
# --------------------------------------------------------------------------------------------
def test_bad_in_memory_inputs(models):
    rng = np.random.default_rng(41)
    good = Volume(ct_like(rng, SHAPE), AFF4)
    nan = ct_like(rng, SHAPE)
    nan[3, 4, 5] = np.nan
    cases = [
        (Volume(nan, AFF4), "NaN/Inf"),
        (Volume(np.zeros((0, 21, 30), np.float32), AFF4), "empty"),
        (Volume(np.full(SHAPE, -1000.0, np.float32), AFF4), "constant"),
        (Volume(ct_like(rng, SHAPE + (2,)), AFF4), "expected a 3D volume"),
        (Volume(ct_like(rng, SHAPE), np.diag([50.0, 4, 4, 1])), "implausible voxel spacing"),
    ]
    with Registrar(models["zero"]) as reg:
        for vol, needle in cases:
            with pytest.raises(PddnetError, match=needle):
                reg.register(good, vol)
            with pytest.raises(PddnetError, match=needle):
                reg.register(vol, good)
        with pytest.raises(PddnetError, match="expected a NIfTI path or a pddnet.data.io.Volume"):
            reg.register(good, np.zeros(SHAPE))


def test_spacing_tolerance(models):
    rng = np.random.default_rng(42)
    aff1 = grid_affine(1.0)
    pair = (Volume(ct_like(rng, SHAPE), aff1), Volume(ct_like(rng, SHAPE), aff1))
    with Registrar(models["zero"]) as reg:
        with pytest.raises(PddnetError) as ei:
            reg.register(*pair)
    msg = str(ei.value)
    assert "1 mm" in msg and "4 mm" in msg and "--spacing-tolerance" in msg and "75%" in msg
    with Registrar(models["zero"], spacing_tolerance=0.8) as reg:
        reg.register(*pair)
    aff5 = grid_affine(5.0)  # 25% off: within the default tolerance
    with Registrar(models["zero"]) as reg:
        reg.register(Volume(ct_like(rng, SHAPE), aff5), Volume(ct_like(rng, SHAPE), aff5))


def test_bad_labels(models):
    rng = np.random.default_rng(43)
    img = Volume(ct_like(rng, SHAPE), AFF4)
    frac = rng.integers(0, 3, SHAPE).astype(np.float32)
    frac[1, 1, 1] = 0.5
    big = rng.integers(0, 3, SHAPE).astype(np.int16)
    big[2, 2, 2] = 300
    nine = rng.integers(0, 3, SHAPE).astype(np.uint8)
    nine[3, 3, 3] = 9
    with Registrar(models["labels5"]) as reg:
        for lab, needle in [(frac, "non-integer"), (big, "exceeds 255"),
                            (nine, r"up to 9 \(9 unexpected\).*labels 0\.\.5")]:
            with pytest.raises(PddnetError, match=needle):
                reg.register(img, img, moving_labels=Volume(lab, AFF4))
            with pytest.raises(PddnetError, match=needle):
                reg.register(img, img, fixed_labels=Volume(lab, AFF4))
        with pytest.raises(PddnetError, match="must have the shape and affine"):
            reg.register(img, img, moving_labels=Volume(nine[:-1], AFF4))


def test_moving_outside_the_fixed_field_of_view(models):
    rng = np.random.default_rng(44)
    far = grid_affine(4.0, origin=(2000.0, 0.0, 0.0))
    with Registrar(models["zero"]) as reg:
        with pytest.raises(PddnetError, match="does not overlap"):
            reg.register(Volume(ct_like(rng, SHAPE), AFF4), Volume(ct_like(rng, SHAPE), far))
