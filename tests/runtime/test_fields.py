"""Field formats against SimpleITK, the independent reference: the ITK displacement field pddnet
writes, read by ``sitk.ReadImage`` -> ``sitk.DisplacementFieldTransform`` -> ``sitk.Resample``,
warps a moving image as pddnet's own warp does; an ITK field written by SimpleITK itself is read
by pddnet and applied as SimpleITK applies it. Fresh random smooth fields and images, on grids
with anisotropic spacing, flipped and permuted axes, oblique (rotated) axes, and a moving image
stored on another grid.

Compared inside the moving image only: outside it pddnet clamps to the border (as
``pddnet register`` does) and SimpleITK fills a default value (here NaN, so those points are
found and left out). Labels (nearest) are equal except at ties (a coordinate within 1e-3 voxel
of a half-integer, where the two round differently).

Not tested here: ANTs and 3D Slicer themselves (not installable as test dependencies; both read
fields through ITK's NIfTI reader, which SimpleITK wraps), sheared grids beyond their refusal.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from helpers.fake_models import grid_affine
from pddnet.data.io import Volume, save_nifti
from pddnet.errors import PddnetError
from pddnet.runtime.fields import (
    Field,
    itk_grid_problem,
    itk_to_voxels,
    load_field,
    save_itk_field,
    voxels_to_itk,
    warp_with_field,
)

sitk = pytest.importorskip("SimpleITK", reason="SimpleITK is a test dependency (pip install "
                           "'pddnet[dev]')")

#: allowed |pddnet - SimpleITK| on images of range +-1000 HU (both interpolate trilinearly; the
#: difference is float32 rounding of coordinates: measured up to 9e-4, see test_report_...)
IMAGE_ATOL = 5e-3
#: worst differences measured over every case, reported by test_report_max_differences
MAX_DIFF: dict[str, float] = {}


def _rotation(rng) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    return q * np.sign(np.diag(r))


def _affine(kind: str, rng, origin=(-40.0, -30.0, -50.0)) -> np.ndarray:
    """A fixed grid: ``aniso`` (diagonal, anisotropic), ``flipped`` (axes permuted and two
    reversed, LPS-like), ``oblique`` (a random rotation times anisotropic spacing)."""
    spacing = rng.uniform(0.8, 3.0, 3)
    if kind == "aniso":
        lin = np.diag(spacing)
    elif kind == "flipped":
        lin = np.eye(3)[:, [2, 0, 1]] * np.array([-1.0, 1.0, -1.0]) * spacing
    elif kind == "oblique":
        lin = _rotation(rng) @ np.diag(spacing)
    else:
        raise ValueError(kind)
    a = np.eye(4)
    a[:3, :3] = lin
    a[:3, 3] = np.asarray(origin) + rng.uniform(-5, 5, 3)
    return a


def _smooth_field(rng, shape, amplitude) -> np.ndarray:
    """A random smooth field ``(i, j, k, 3)`` float32 in voxels, up to about ``amplitude``."""
    coarse = rng.normal(0, 1, (4, 4, 4, 3))
    d = np.stack([ndimage.zoom(coarse[..., a], [n / 4 for n in shape], order=3)
                  for a in range(3)], axis=-1)
    d *= amplitude / np.abs(d).max()
    return d.astype(np.float32)


def _smooth_image(rng, shape) -> np.ndarray:
    x = ndimage.gaussian_filter(rng.normal(0, 1, shape), 1.2)
    return (x / np.abs(x).max() * 1000).astype(np.float32)


def _moving_grid(fixed_affine, fixed_shape, rng):
    """Another grid covering the fixed field of view with a margin: other spacing, rotated."""
    lin = _rotation(rng) @ np.diag(rng.uniform(1.0, 2.5, 3))
    corners = np.array([[i, j, k, 1.0] for i in (0, fixed_shape[0]) for j in (0, fixed_shape[1])
                        for k in (0, fixed_shape[2])]) @ fixed_affine.T
    a = np.eye(4)
    a[:3, :3] = lin
    inv = np.linalg.inv(lin)
    local = corners[:, :3] @ inv.T  # corners in the moving voxel frame (up to the origin)
    lo, hi = local.min(0) - 6, local.max(0) + 6
    a[:3, 3] = lin @ lo
    return a, tuple(int(n) for n in np.ceil(hi - lo))


def _sitk_warp(moving_path, fixed_path, field_path, *, labels: bool) -> np.ndarray:
    """SimpleITK's resampling of ``moving`` onto ``fixed`` through the ITK field (i, j, k)."""
    fld = sitk.Cast(sitk.ReadImage(str(field_path)), sitk.sitkVectorFloat64)
    tx = sitk.DisplacementFieldTransform(fld)
    mov = sitk.ReadImage(str(moving_path))
    ref = sitk.ReadImage(str(fixed_path))
    if labels:
        out = sitk.Resample(mov, ref, tx, sitk.sitkNearestNeighbor, 255)
    else:
        mov = sitk.Cast(mov, sitk.sitkFloat64)
        out = sitk.Resample(mov, ref, tx, sitk.sitkLinear, float("nan"))
    return sitk.GetArrayFromImage(out).transpose(2, 1, 0)


def _mapped_index(field: Field, moving_affine) -> np.ndarray:
    """Continuous moving-voxel index of every fixed voxel's target, (i, j, k, 3)."""
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in field.shape], indexing="ij"), -1)
    m = np.linalg.inv(moving_affine) @ field.affine
    return (idx + field.disp.astype(np.float64)) @ m[:3, :3].T + m[:3, 3]


def _case(tmp_path, kind, seed, *, other_grid: bool):
    rng = np.random.default_rng(seed)
    shape = tuple(int(n) for n in rng.integers(14, 22, 3))
    a_f = _affine(kind, rng)
    disp = _smooth_field(rng, shape, amplitude=rng.uniform(1.5, 4.0))
    if other_grid:
        a_m, m_shape = _moving_grid(a_f, shape, rng)
    else:
        a_m, m_shape = a_f, shape
    moving = _smooth_image(rng, m_shape)
    labels = np.zeros(m_shape, np.uint8)
    labels[tuple(slice(n // 4, 3 * n // 4) for n in m_shape)] = 1
    labels[tuple(slice(n // 3, n // 2) for n in m_shape)] = 2
    labels[(rng.uniform(size=m_shape) < 0.05)] = 3
    paths = {
        "fixed": save_nifti(tmp_path / "fixed.nii.gz", np.zeros(shape, np.float32), a_f),
        "moving": save_nifti(tmp_path / "moving.nii.gz", moving, a_m),
        "labels": save_nifti(tmp_path / "labels.nii.gz", labels, a_m),
        "itk": save_itk_field(tmp_path / "disp_itk.nii.gz", disp, a_f),
    }
    return Field(disp, a_f, "test"), Volume(moving, a_m), Volume(labels, a_m), paths


CASES = [(kind, seed, other) for seed, kind in enumerate(["aniso", "flipped", "oblique"], 700)
         for other in (False, True)] + [("oblique", 710, True), ("flipped", 711, False)]


@pytest.mark.parametrize("kind, seed, other_grid", CASES)
def test_exported_itk_field_in_simpleitk_matches_pddnet_warp(tmp_path, kind, seed, other_grid):
    field, moving, labels, paths = _case(tmp_path, kind, seed, other_grid=other_grid)
    ours = warp_with_field(field, moving)
    theirs = _sitk_warp(paths["moving"], paths["fixed"], paths["itk"], labels=False)
    inside = np.isfinite(theirs)
    assert inside.mean() > 0.5, "the case should map most points inside the moving image"
    diff = float(np.abs(ours - theirs)[inside].max())
    name = f"{kind} seed {seed}{', moving on another grid' if other_grid else ''}"
    MAX_DIFF[f"image, {name}"] = diff
    assert diff < IMAGE_ATOL, diff
    # and where SimpleITK found no value, the target lies outside the moving image
    idx = _mapped_index(field, moving.affine)
    n = np.asarray(moving.shape)
    outside = np.any((idx < -0.5 - 1e-4) | (idx > n - 0.5 + 1e-4), axis=-1)
    assert not np.any(outside & inside)

    ours_l = warp_with_field(field, labels, labels=True)
    theirs_l = _sitk_warp(paths["labels"], paths["fixed"], paths["itk"], labels=True)
    inside_l = np.all((idx > -0.5 + 1e-3) & (idx < n - 0.5 - 1e-3), axis=-1)
    frac = np.abs(idx - np.floor(idx) - 0.5)
    tie = np.any(frac < 1e-3, axis=-1)
    mismatch = (ours_l != theirs_l) & inside_l
    MAX_DIFF[f"labels, {name}: voxels that differ (of {inside_l.sum()})"] = float(
        mismatch.sum())
    assert not np.any(mismatch & ~tie), (int(mismatch.sum()), int((mismatch & ~tie).sum()))


def test_itk_field_header_and_values(tmp_path):
    """The file ITK tools expect: 5D (i, j, k, 1, 3), intent vector, float32, mm, LPS."""
    rng = np.random.default_rng(720)
    a = _affine("oblique", rng)
    disp = _smooth_field(rng, (9, 11, 13), 3.0)
    path = save_itk_field(tmp_path / "f.nii.gz", disp, a)
    img = nib.load(path)
    assert img.shape == (9, 11, 13, 1, 3) and img.get_data_dtype() == np.float32
    assert int(img.header["intent_code"]) == 1007
    np.testing.assert_allclose(img.affine, a, atol=1e-4)
    # a displacement of one voxel along axis a is the physical column a of the affine, in LPS
    for ax in range(3):
        unit = np.zeros((1, 1, 1, 3), np.float32)
        unit[..., ax] = 1
        v = voxels_to_itk(unit, a)[0, 0, 0, 0]
        np.testing.assert_allclose(v, a[:3, ax] * [-1, -1, 1], rtol=1e-6)
    s = sitk.ReadImage(str(path))
    assert s.GetNumberOfComponentsPerPixel() == 3 and s.GetSize() == (9, 11, 13)
    # SimpleITK's physical point of voxel (i, j, k) is the NIfTI affine's, x and y negated
    p = np.array(s.TransformIndexToPhysicalPoint((2, 3, 4)))
    np.testing.assert_allclose(p, (a @ [2, 3, 4, 1])[:3] * [-1, -1, 1], atol=1e-4)
    # reading it back gives the voxel field (float32 rounding only)
    back = load_field(path)
    assert back.source.startswith("ITK displacement field")
    np.testing.assert_allclose(back.disp, disp, atol=1e-5)
    np.testing.assert_allclose(itk_to_voxels(voxels_to_itk(disp, a), a), disp, atol=1e-5)


@pytest.mark.parametrize("kind, seed", [("oblique", 730), ("flipped", 731)])
def test_field_written_by_simpleitk_is_read_and_applied_as_simpleitk_applies_it(
        tmp_path, kind, seed):
    """An ITK field from another writer (SimpleITK: random physical vectors, LPS) -> pddnet
    reads it into voxels and warps as SimpleITK does."""
    rng = np.random.default_rng(seed)
    shape = (17, 15, 19)
    a_f = _affine(kind, rng)
    disp_true = _smooth_field(rng, shape, 3.0)
    vec = voxels_to_itk(disp_true, a_f)[:, :, :, 0, :].astype(np.float64)
    fld = sitk.GetImageFromArray(vec.transpose(2, 1, 0, 3), isVector=True)
    fld.SetSpacing([float(s) for s in np.linalg.norm(a_f[:3, :3], axis=0)])
    fld.SetOrigin([float(v) for v in a_f[:3, 3] * [-1, -1, 1]])
    direction = np.diag([-1.0, -1.0, 1.0]) @ a_f[:3, :3] / np.linalg.norm(a_f[:3, :3], axis=0)
    fld.SetDirection([float(v) for v in direction.ravel()])
    sitk.WriteImage(sitk.Cast(fld, sitk.sitkVectorFloat32), str(tmp_path / "w.nii.gz"))
    field = load_field(tmp_path / "w.nii.gz")
    np.testing.assert_allclose(field.affine, a_f, atol=1e-4)
    np.testing.assert_allclose(field.disp, disp_true, atol=1e-4)
    moving = _smooth_image(rng, shape)
    save_nifti(tmp_path / "m.nii.gz", moving, a_f)
    save_nifti(tmp_path / "f.nii.gz", np.zeros(shape, np.float32), a_f)
    ours = warp_with_field(field, Volume(moving, a_f))
    theirs = _sitk_warp(tmp_path / "m.nii.gz", tmp_path / "f.nii.gz", tmp_path / "w.nii.gz",
                        labels=False)
    inside = np.isfinite(theirs)
    diff = float(np.abs(ours - theirs)[inside].max())
    MAX_DIFF[f"sitk-written field {kind}"] = diff
    assert inside.mean() > 0.5 and diff < IMAGE_ATOL, diff


def test_sheared_grid_is_refused_for_itk():
    a = grid_affine(2.0)
    a[0, 1] = 0.5  # axes i and j no longer perpendicular
    assert itk_grid_problem(a) is not None and itk_grid_problem(grid_affine(2.0)) is None
    with pytest.raises(PddnetError, match="not perpendicular.*disp.nii.gz"):
        save_itk_field("/nonexistent/x.nii.gz", np.zeros((3, 3, 3, 3), np.float32), a)


def test_zero_field_is_identity_and_translation_moves_by_its_mm(tmp_path):
    """Analytic: an ITK field of constant (+4 mm R, i.e. -4 mm in LPS x) samples the moving
    image 4 mm to the right, in SimpleITK and in pddnet."""
    a = np.diag([2.0, 3.0, 1.5, 1.0])
    shape = (10, 12, 14)
    ramp = np.broadcast_to(np.arange(10, dtype=np.float32)[:, None, None], shape).copy()
    save_nifti(tmp_path / "m.nii.gz", ramp, a)
    save_nifti(tmp_path / "f.nii.gz", ramp, a)
    disp = np.zeros(shape + (3,), np.float32)
    disp[..., 0] = 2.0  # two voxels of 2 mm along +i = +x (R)
    save_itk_field(tmp_path / "t.nii.gz", disp, a)
    assert nib.load(tmp_path / "t.nii.gz").get_fdata()[0, 0, 0, 0, 0] == -4.0  # LPS: -R
    out = _sitk_warp(tmp_path / "m.nii.gz", tmp_path / "f.nii.gz", tmp_path / "t.nii.gz",
                     labels=False)
    np.testing.assert_allclose(out[:8], ramp[:8] + 2)
    np.testing.assert_allclose(warp_with_field(Field(disp, a, ""), Volume(ramp, a))[:8],
                               ramp[:8] + 2)
    zero = warp_with_field(Field(np.zeros_like(disp), a, ""), Volume(ramp, a))
    np.testing.assert_array_equal(zero, ramp)


def test_report_max_differences():
    """Prints the measured worst differences (run with -s to see them)."""
    for k, v in sorted(MAX_DIFF.items()):
        print(f"{k}: {v:.3g}")
