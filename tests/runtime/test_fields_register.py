"""A registration's field outputs, end to end: ``disp_itk.nii.gz`` applied by SimpleITK gives
``warped.nii.gz`` and ``warped_labels.nii.gz``; ``disp.npz`` is one array (the Learn2Reg
layout) and its grid is in ``summary.json``; a sheared fixed grid gets no ITK field, with a note.

The fake model (tests/helpers/fake_models.py, ``gain > 0``) makes an image-dependent smooth
field; the fixed scan is stored in a flipped and permuted orientation and the moving scan on
another (shifted, 3 mm) grid, so the export goes through every step of the post-processing.

Not tested here: the field formats on their own (tests/runtime/test_fields.py), ``pddnet apply``
(tests/cli/test_apply.py).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from helpers.fake_models import ct_like, grid_affine, make_model, reorient, save_model
from pddnet.data.io import Volume, save_nifti
from pddnet.runtime.session import Registrar

sitk = pytest.importorskip("SimpleITK", reason="SimpleITK is a test dependency (pip install "
                           "'pddnet[dev]')")

SHAPE = (24, 21, 30)
AFF4 = grid_affine(4.0)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("model")
    return save_model(make_model(SHAPE, translation=(1.5, -1.0, 0.5), gain=0.6, seed=3,
                                 num_labels=4), d / "m.onnx")


def _sitk_resample(moving_path, fixed_path, field_path, *, labels: bool) -> np.ndarray:
    tx = sitk.DisplacementFieldTransform(
        sitk.Cast(sitk.ReadImage(str(field_path)), sitk.sitkVectorFloat64))
    mov = sitk.ReadImage(str(moving_path))
    if labels:
        out = sitk.Resample(mov, sitk.ReadImage(str(fixed_path)), tx,
                            sitk.sitkNearestNeighbor, 255)
    else:
        out = sitk.Resample(sitk.Cast(mov, sitk.sitkFloat64), sitk.ReadImage(str(fixed_path)),
                            tx, sitk.sitkLinear, float("nan"))
    return sitk.GetArrayFromImage(out).transpose(2, 1, 0)


def test_register_outputs_apply_in_simpleitk(model, tmp_path):
    rng = np.random.default_rng(801)
    fixed_arr, fixed_aff = reorient(ct_like(rng, SHAPE), AFF4, flips=(0, 2), perm=(1, 2, 0))
    m_aff = grid_affine(3.0, origin=(-62.0, -50.0, -70.0))
    m_shape = (46, 40, 56)  # covers the fixed field of view with a margin of 20 mm
    moving = ct_like(rng, m_shape)
    m_lab = np.zeros(m_shape, np.uint8)
    m_lab[12:34, 10:30, 14:40] = 1
    m_lab[18:26, 16:24, 20:32] = 2
    m_lab[26:32, 12:18, 36:44] = 3
    paths = {"fixed": save_nifti(tmp_path / "fixed.nii.gz", fixed_arr, fixed_aff),
             "moving": save_nifti(tmp_path / "moving.nii.gz", moving, m_aff),
             "labels": save_nifti(tmp_path / "labels.nii.gz", m_lab, m_aff)}
    with Registrar(model, threads=1) as reg:
        res = reg.register(paths["fixed"], paths["moving"], moving_labels=paths["labels"])
    assert np.abs(res.disp).max() > 0.5  # a real, non-constant field
    assert np.ptp(res.disp[..., 0]) > 0.1
    out = tmp_path / "out"
    res.save(out)
    assert {"disp.nii.gz", "disp.npz", "disp_itk.nii.gz"} <= {p.name for p in out.iterdir()}

    theirs = _sitk_resample(paths["moving"], paths["fixed"], out / "disp_itk.nii.gz",
                            labels=False)
    inside = np.isfinite(theirs)
    assert inside.mean() > 0.9
    diff = float(np.abs(res.warped - theirs)[inside].max())
    print(f"register -> SimpleITK: max |warped - sitk| = {diff:.3g} HU over {inside.sum()} "
          "voxels")
    assert diff < 5e-3, diff

    theirs_l = _sitk_resample(paths["labels"], paths["fixed"], out / "disp_itk.nii.gz",
                              labels=True)
    differ = (res.warped_labels != theirs_l) & inside
    print(f"register -> SimpleITK labels: {int(differ.sum())} of {inside.sum()} voxels differ")
    assert differ.mean() < 1e-3  # ties only (a coordinate at a half-integer)

    # disp.npz: one array, the field; its grid is in summary.json
    with np.load(out / "disp.npz") as z:
        assert z.files == ["arr_0"]
        np.testing.assert_array_equal(z["arr_0"], res.disp)
    s = json.loads((out / "summary.json").read_text())
    np.testing.assert_allclose(s["field"]["affine"], fixed_aff)
    assert "disp_itk.nii.gz" in s["field"]["files"] and "disp_itk.nii.gz" in s["outputs"]


def test_sheared_fixed_grid_writes_no_itk_field_and_says_why(model, tmp_path):
    rng = np.random.default_rng(802)
    sheared = AFF4.copy()
    sheared[0, 1] = 0.4
    with Registrar(model, threads=1) as reg:
        res = reg.register(Volume(ct_like(rng, SHAPE), sheared),
                           Volume(ct_like(rng, SHAPE), sheared))
    names = res.save(tmp_path / "out")
    assert "disp_itk.nii.gz" not in names and not (tmp_path / "out" / "disp_itk.nii.gz").exists()
    s = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert any("disp_itk.nii.gz not written" in n and "not perpendicular" in n
               for n in s["notes"])
    assert "disp_itk.nii.gz" not in s["outputs"] and "disp.npz" in s["outputs"]
