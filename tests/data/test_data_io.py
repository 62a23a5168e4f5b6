"""NIfTI I/O: round trips, canonical reorientation, input validation, atomic writes.

Not tested here: very large volumes and memory use, NIfTI-2 / Analyze files, scaled
(scl_slope) label maps, the atomic_write helper on its own beyond what save_nifti exercises,
and concurrent writers to the same path.
"""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest

from pddnet.data import io as dio
from pddnet.data.io import Volume, load_nifti, save_nifti, to_canonical
from pddnet.errors import PddnetError


@pytest.fixture
def rng():
    seed = int(np.random.SeedSequence().entropy % (2**32))
    print(f"random seed {seed}")
    return np.random.default_rng(seed)


def _random_affine(rng, spacing=None):
    """A non-trivial RAS affine: random spacing, small rotation, random origin."""
    sp = rng.uniform(0.5, 3.0, 3) if spacing is None else np.asarray(spacing, float)
    a = rng.normal(0, 0.1, 3)
    cx, sx = np.cos(a[0]), np.sin(a[0])
    cz, sz = np.cos(a[2]), np.sin(a[2])
    rot = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]]) @ np.array(
        [[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    aff = np.eye(4)
    aff[:3, :3] = rot * sp
    aff[:3, 3] = rng.uniform(-200, 200, 3)
    return aff


def _only_files(folder):
    return sorted(p.name for p in folder.iterdir())


# ------------------------------------------------------------------ round trips
@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_image_round_trip(tmp_path, rng, suffix):
    shape = tuple(rng.integers(5, 12, 3))
    arr = rng.normal(0, 300, shape).astype(np.float32)
    aff = _random_affine(rng)
    path = tmp_path / f"img{suffix}"
    save_nifti(path, arr, aff)
    vol = load_nifti(path)
    assert vol.array.dtype == np.float32
    np.testing.assert_array_equal(vol.array, arr)
    np.testing.assert_allclose(vol.affine, aff, atol=1e-5)
    np.testing.assert_allclose(vol.spacing, np.linalg.norm(aff[:3, :3], axis=0), rtol=1e-6)
    assert vol.shape == shape and vol.path == path
    with open(path, "rb") as fh:
        magic = fh.read(2)
    assert (magic == b"\x1f\x8b") == (suffix == ".nii.gz")
    assert _only_files(tmp_path) == [path.name]  # no temporary left behind


def test_label_round_trip_and_int_types(tmp_path, rng):
    lab = rng.integers(0, 14, (9, 7, 6))
    aff = _random_affine(rng)
    save_nifti(tmp_path / "lab.nii.gz", lab.astype(np.int64), aff)  # int64 is narrowed
    assert nib.load(tmp_path / "lab.nii.gz").get_data_dtype() == np.uint8
    vol = load_nifti(tmp_path / "lab.nii.gz", kind="label")
    assert vol.array.dtype == np.uint8
    np.testing.assert_array_equal(vol.array, lab)
    # float labels with integral values are accepted
    nib.save(nib.Nifti1Image(lab.astype(np.float32), aff), tmp_path / "f.nii.gz")
    np.testing.assert_array_equal(load_nifti(tmp_path / "f.nii.gz", kind="label").array, lab)


def test_int16_image_comes_back_float32(tmp_path, rng):
    arr = rng.integers(-1024, 2000, (6, 5, 4)).astype(np.int16)
    save_nifti(tmp_path / "ct.nii.gz", arr, np.diag([2.0, 2.0, 2.0, 1.0]))
    vol = load_nifti(tmp_path / "ct.nii.gz")
    assert vol.array.dtype == np.float32
    np.testing.assert_array_equal(vol.array, arr.astype(np.float32))
    assert vol.spacing == (2.0, 2.0, 2.0)


def test_trailing_singleton_axis_is_squeezed(tmp_path, rng):
    arr = rng.normal(0, 1, (6, 5, 4, 1)).astype(np.float32)
    nib.save(nib.Nifti1Image(arr, np.eye(4)), tmp_path / "a.nii.gz")
    vol = load_nifti(tmp_path / "a.nii.gz")
    assert vol.shape == (6, 5, 4)
    np.testing.assert_array_equal(vol.array, arr[..., 0])


# ------------------------------------------------------------------ canonical orientation
def test_to_canonical_undoes_flip_and_transpose(tmp_path, rng):
    n = tuple(int(v) for v in rng.integers(5, 10, 3))
    arr = rng.normal(0, 100, n).astype(np.float32)
    aff = np.diag([*rng.uniform(0.7, 2.5, 3), 1.0])
    aff[:3, 3] = rng.uniform(-50, 50, 3)
    # stored[p, q, r] = arr[n0 - 1 - q, r, p]: axis 0 flipped, axes permuted
    stored = np.ascontiguousarray(np.flip(arr, 0).transpose(2, 0, 1))
    m = np.array([[0, -1, 0, n[0] - 1], [0, 0, 1, 0], [1, 0, 0, 0], [0, 0, 0, 1]], float)
    save_nifti(tmp_path / "odd.nii.gz", stored, aff @ m)
    vol = load_nifti(tmp_path / "odd.nii.gz")
    canon, desc = to_canonical(vol)
    np.testing.assert_array_equal(canon.array, arr)
    np.testing.assert_allclose(canon.affine, aff, atol=1e-5)
    assert "flipped" in desc and "transposed" in desc
    again, desc2 = to_canonical(canon)
    assert desc2 == "already canonical"
    np.testing.assert_array_equal(again.array, arr)


def test_to_canonical_single_flip(rng):
    arr = rng.integers(0, 5, (4, 6, 5)).astype(np.uint8)
    aff = np.diag([-1.5, 1.0, 2.0, 1.0])
    canon, desc = to_canonical(Volume(arr, aff))
    assert desc == "flipped axis 0"
    np.testing.assert_array_equal(canon.array, arr[::-1])
    assert canon.array.dtype == np.uint8
    assert canon.affine[0, 0] == pytest.approx(1.5)


# ------------------------------------------------------------------ bad inputs
def _write_raw(path, arr, aff=None):
    nib.save(nib.Nifti1Image(arr, np.eye(4) if aff is None else aff), path)


def test_missing_file(tmp_path):
    with pytest.raises(PddnetError, match="no such file"):
        load_nifti(tmp_path / "nope.nii.gz")


def test_unreadable_files(tmp_path, rng):
    junk = tmp_path / "junk.nii.gz"
    junk.write_bytes(rng.bytes(500))
    with pytest.raises(PddnetError, match="cannot be read as NIfTI"):
        load_nifti(junk)
    # a valid file cut short
    good = tmp_path / "good.nii.gz"
    _write_raw(good, rng.normal(0, 1, (20, 20, 20)).astype(np.float32))
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(good.read_bytes()[:300])
    with pytest.raises(PddnetError, match="cannot be read"):
        load_nifti(cut)
    with pytest.raises(PddnetError, match="not a file"):
        load_nifti(tmp_path)


@pytest.mark.parametrize("shape", [(7, 6), (5, 4, 3, 2), (4, 4, 4, 3, 1)])
def test_not_3d(tmp_path, rng, shape):
    _write_raw(tmp_path / "a.nii.gz", rng.normal(0, 1, shape).astype(np.float32))
    with pytest.raises(PddnetError, match=r"expected a 3D volume.*" + str(shape).replace(
            "(", r"\(").replace(")", r"\)")):
        load_nifti(tmp_path / "a.nii.gz")


def test_empty_volume(tmp_path):
    _write_raw(tmp_path / "e.nii", np.zeros((0, 4, 4), np.float32))
    with pytest.raises(PddnetError, match="empty"):
        load_nifti(tmp_path / "e.nii")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_image(tmp_path, rng, bad):
    arr = rng.normal(0, 100, (6, 6, 6)).astype(np.float32)
    arr[tuple(rng.integers(0, 6, 3))] = bad
    _write_raw(tmp_path / "n.nii.gz", arr)
    with pytest.raises(PddnetError, match="NaN/Inf"):
        load_nifti(tmp_path / "n.nii.gz")


def test_bad_label_maps(tmp_path, rng):
    lab = rng.integers(0, 10, (6, 5, 4)).astype(np.float32)
    frac = lab.copy()
    frac[1, 1, 1] = 2.5
    _write_raw(tmp_path / "frac.nii.gz", frac)
    with pytest.raises(PddnetError, match="non-integer"):
        load_nifti(tmp_path / "frac.nii.gz", kind="label")
    neg = lab.astype(np.int16)
    neg[2, 2, 2] = -3
    _write_raw(tmp_path / "neg.nii.gz", neg)
    with pytest.raises(PddnetError, match="negative"):
        load_nifti(tmp_path / "neg.nii.gz", kind="label")
    big = lab.astype(np.int16)
    big[0, 0, 0] = 300
    _write_raw(tmp_path / "big.nii.gz", big)
    with pytest.raises(PddnetError, match="exceeds 255"):
        load_nifti(tmp_path / "big.nii.gz", kind="label")
    # the same non-integer file is fine as an image
    assert load_nifti(tmp_path / "frac.nii.gz").array[1, 1, 1] == 2.5


@pytest.mark.parametrize("spacing", [0.0, 25.0, np.nan])
def test_absurd_spacing(tmp_path, rng, spacing):
    # a header as a broken writer would leave it: only the sform, with a bad column
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((5, 5, 5))
    hdr.set_data_dtype(np.float32)
    hdr.set_sform(np.diag([1.0, spacing, 1.0, 1.0]), code=1)
    arr = rng.normal(0, 1, (5, 5, 5)).astype(np.float32)
    nib.save(nib.Nifti1Image(arr, None, header=hdr), tmp_path / "s.nii.gz")
    with pytest.raises(PddnetError, match="spacing|affine"):
        load_nifti(tmp_path / "s.nii.gz")


# ------------------------------------------------------------------ atomic writes
def test_failed_write_leaves_nothing(tmp_path, rng, monkeypatch):
    arr = rng.normal(0, 1, (8, 8, 8)).astype(np.float32)

    def broken_save(img, filename):
        with gzip.open(filename, "wb") as fh:  # write part of a file, then fail
            fh.write(b"\x00" * 100)
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(dio.nib, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_nifti(tmp_path / "out.nii.gz", arr, np.eye(4))
    assert _only_files(tmp_path) == []


def test_save_refusals_leave_nothing(tmp_path, rng):
    arr = rng.normal(0, 1, (4, 4, 4)).astype(np.float32)
    with pytest.raises(PddnetError, match=r"\.nii"):
        save_nifti(tmp_path / "x.png", arr, np.eye(4))
    bad = np.eye(4)
    bad[0, 3] = np.nan
    with pytest.raises(PddnetError, match="affine"):
        save_nifti(tmp_path / "x.nii.gz", arr, bad)
    with pytest.raises(PddnetError, match="shape"):
        save_nifti(tmp_path / "x.nii.gz", arr[0], np.eye(4))
    assert _only_files(tmp_path) == []
    save_nifti(tmp_path / "x.nii.gz", arr, np.eye(4))
    before = (tmp_path / "x.nii.gz").read_bytes()
    with pytest.raises(PddnetError, match="already exists"):
        save_nifti(tmp_path / "x.nii.gz", arr + 1, np.eye(4), overwrite=False)
    assert (tmp_path / "x.nii.gz").read_bytes() == before
    assert _only_files(tmp_path) == ["x.nii.gz"]


def test_volume_affine_must_be_4x4(rng):
    with pytest.raises(PddnetError, match="4x4"):
        Volume(rng.normal(0, 1, (3, 3, 3)), np.eye(3))


def test_atomic_write_result_has_default_permissions(tmp_path):
    import os
    import stat

    from pddnet._files import atomic_write

    umask = os.umask(0o022)
    try:
        with atomic_write(tmp_path / "x.json") as tmp:
            tmp.write_text("{}")
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "x.json").stat().st_mode) == 0o644
