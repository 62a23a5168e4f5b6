"""Hardened NIfTI inputs: gzip integrity, the voxel budget checked from the header, notes for
oblique scans and sform/qform disagreements, geometry messages that show both grids, singular
affines, and a property test over broken headers (a PddnetError with one line, or a Volume).

Not tested here: NIfTI-2 and Analyze files (same code path, nibabel reads their headers), the
CLI's --max-voxels option (the CLI module owns it), multi-gigabyte files (the budget refuses
them from the header; the gzip check's cost on a 29 MB file is measured by hand in the report).
"""

from __future__ import annotations

import gzip
import math
import re
import subprocess
import sys
import textwrap
import warnings
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers.fake_models import grid_affine, make_model
from pddnet.data.io import DEFAULT_MAX_VOXELS, Volume, load_nifti, save_nifti
from pddnet.errors import PddnetError
from pddnet.graph.model import read_model_info
from pddnet.runtime.preprocess import prepare_fixed, prepare_moving

SHAPE = (24, 21, 30)  # the fake model's grid, at 4 mm
SRC = Path(__file__).resolve().parents[2] / "src"


@pytest.fixture
def rng():
    seed = int(np.random.SeedSequence().entropy % (2**32))
    print(f"random seed {seed}")
    return np.random.default_rng(seed)


@pytest.fixture(scope="module")
def info():
    return read_model_info(make_model(SHAPE))


def _ct(rng, shape=SHAPE):
    return rng.normal(0, 300, shape).astype(np.float32)


def _rotation(deg_z: float, deg_x: float = 0.0) -> np.ndarray:
    z, x = np.radians(deg_z), np.radians(deg_x)
    rz = np.array([[np.cos(z), -np.sin(z), 0], [np.sin(z), np.cos(z), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(x), -np.sin(x)], [0, np.sin(x), np.cos(x)]])
    return rz @ rx


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _nibabel_read(path) -> tuple[np.ndarray, np.ndarray]:
    img = nib.load(str(path))
    return np.asanyarray(img.dataobj), np.asarray(img.affine, np.float64)


# ------------------------------------------------------------------ gzip integrity
def test_flipped_byte_in_stored_payload_is_refused_with_the_crc_message(tmp_path, rng):
    """A .nii.gz of stored (level 0) deflate blocks: a flipped payload byte changes one voxel,
    nibabel reads it without a word, the CRC check refuses it."""
    arr = _ct(rng, (12, 10, 9))
    save_nifti(tmp_path / "a.nii", arr, grid_affine(2.0))
    raw = (tmp_path / "a.nii").read_bytes()
    comp = bytearray(gzip.compress(raw, compresslevel=0))
    at = len(comp) - 8 - int(rng.integers(1, arr.nbytes // 2))  # inside the voxel data
    comp[at] ^= 1 << int(rng.integers(0, 8))
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(bytes(comp))
    silently, _ = _nibabel_read(bad)  # what happened before: a changed voxel, no error
    assert silently.shape == arr.shape and not np.array_equal(silently, arr)
    with pytest.raises(PddnetError) as err:
        load_nifti(bad)
    msg = str(err.value)
    assert msg.startswith(f"{bad}: ") and "\n" not in msg
    assert "the gzip data is corrupted (CRC check failed)" in msg and "copy it again" in msg


def test_flipped_bytes_in_compressed_payload_are_refused(tmp_path, rng):
    """The usual (level 6) .nii.gz: a byte flipped anywhere after the NIfTI header's share of
    the stream is refused, whatever zlib makes of it (CRC, invalid codes, early end)."""
    arr = _ct(rng, (20, 18, 16))
    good = tmp_path / "good.nii.gz"
    save_nifti(good, arr, grid_affine(3.0))
    comp = good.read_bytes()
    for at in rng.integers(400, len(comp) - 8, 6):
        b = bytearray(comp)
        b[int(at)] ^= int(rng.integers(1, 256))
        bad = tmp_path / f"bad{int(at)}.nii.gz"
        bad.write_bytes(bytes(b))
        with pytest.raises(PddnetError, match=r"the gzip data is corrupted \(") as err:
            load_nifti(bad)
        assert "\n" not in str(err.value) and str(bad) in str(err.value)


@pytest.mark.parametrize("cut", ["trailer", "isize", "half"])
def test_truncated_gzip_is_refused(tmp_path, rng, cut):
    arr = _ct(rng, (16, 14, 12))
    good = tmp_path / "good.nii.gz"
    save_nifti(good, arr, grid_affine(2.5))
    comp = good.read_bytes()
    n = {"trailer": len(comp) - 8, "isize": len(comp) - 3, "half": len(comp) // 2}[cut]
    short = tmp_path / "short.nii.gz"
    short.write_bytes(comp[:n])
    if cut == "trailer":  # before: nibabel stops before the trailer and loads it silently
        np.testing.assert_array_equal(_nibabel_read(short)[0], arr)
    with pytest.raises(PddnetError, match=r"gzip data is corrupted \(truncated") as err:
        load_nifti(short)
    assert "\n" not in str(err.value) and "cannot be read" in str(err.value)


def test_trailing_data_after_the_stream_is_refused_but_zero_padding_is_not(tmp_path, rng):
    arr = _ct(rng, (8, 9, 10))
    good = tmp_path / "good.nii.gz"
    save_nifti(good, arr, grid_affine(2.0))
    padded = tmp_path / "padded.nii.gz"
    padded.write_bytes(good.read_bytes() + b"\0" * int(rng.integers(1, 600)))
    np.testing.assert_array_equal(load_nifti(padded).array, arr)
    junk = tmp_path / "junk.nii.gz"
    junk.write_bytes(good.read_bytes() + rng.bytes(40).replace(b"\x1f", b"\x20"))
    with pytest.raises(PddnetError, match="trailing data after the gzip stream"):
        load_nifti(junk)


def test_intact_files_load_exactly_as_nibabel_reads_them(tmp_path, rng):
    """Images and label maps, .nii and .nii.gz, one member or several: the arrays and affines
    are bit-identical to nibabel's own read (float32 for images, uint8 for labels)."""
    aff = grid_affine(1.5, origin=tuple(rng.uniform(-200, 200, 3)))
    aff[:3, :3] = _rotation(float(rng.uniform(-20, 20))) @ aff[:3, :3]
    img = rng.integers(-1024, 3000, (17, 13, 11)).astype(np.int16)
    lab = rng.integers(0, 14, (17, 13, 11)).astype(np.uint8)
    for name, arr, kind in (("i", img, "image"), ("l", lab, "label")):
        for suffix in (".nii", ".nii.gz"):
            path = save_nifti(tmp_path / f"{name}{suffix}", arr, aff)
            data, affine = _nibabel_read(path)
            vol = load_nifti(path, kind=kind)
            want = data.astype(np.float32) if kind == "image" else data.astype(np.uint8)
            assert vol.array.dtype == want.dtype
            np.testing.assert_array_equal(vol.array, want)
            np.testing.assert_array_equal(vol.affine, affine)
            assert vol.notes == []  # save_nifti writes matching sform and qform
    # the same bytes as two gzip members are one valid file
    unc = gzip.decompress((tmp_path / "i.nii.gz").read_bytes())
    cut = int(rng.integers(1, len(unc)))
    two = tmp_path / "two.nii.gz"
    two.write_bytes(gzip.compress(unc[:cut]) + gzip.compress(unc[cut:]))
    np.testing.assert_array_equal(load_nifti(two).array, img.astype(np.float32))


# ------------------------------------------------------------------ the voxel budget
def _header_only_gz(path: Path, shape, rng, dtype=np.float32, n_bytes=1000) -> Path:
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(dtype)
    hdr.set_sform(np.diag([1.0, 1.0, 1.0, 1.0]), code=1)
    hdr["vox_offset"] = 352
    with gzip.open(path, "wb") as fh:
        fh.write(hdr.binaryblock + b"\0" * 4 + rng.bytes(n_bytes))
    return path


_MEASURE = textwrap.dedent("""
    import resource, sys, time
    from pddnet.data.io import load_nifti
    from pddnet.errors import PddnetError
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    try:
        load_nifti(sys.argv[1])
        print("LOADED")
    except PddnetError as exc:
        print("REFUSED", exc)
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    print(f"{time.perf_counter() - t:.3f} {grown}")
""")


def _measure(path: Path) -> tuple[str, float, int]:
    """(message, seconds, peak-memory growth in KiB) of load_nifti(path) in a fresh process."""
    r = subprocess.run([sys.executable, "-c", _MEASURE, str(path)], capture_output=True,
                       text=True, timeout=120, env={"PYTHONPATH": str(SRC), "PATH": "/usr/bin"})
    assert r.returncode == 0, r.stderr
    out = r.stdout.strip().splitlines()
    secs, grown = out[-1].split()
    return "\n".join(out[:-1]), float(secs), int(grown)


def test_header_declaring_1000_cubed_voxels_is_refused_before_allocation(tmp_path, rng):
    bomb = _header_only_gz(tmp_path / "bomb.nii.gz", (1000, 1000, 1000), rng)
    assert bomb.stat().st_size < 10_000
    msg, secs, grown_kib = _measure(bomb)
    assert msg.startswith(f"REFUSED {bomb}: its header declares 1000x1000x1000 voxels (1.0e9; "
                          "4.0 GB as stored float32, 4.0 GB as float32), more than the limit "
                          f"of {DEFAULT_MAX_VOXELS:,} voxels;"), msg
    assert "pass --max-voxels N" in msg and "max_voxels=N" in msg
    assert secs < 3.0 and grown_kib < 200 * 1024, (secs, grown_kib)
    assert _files(tmp_path) == ["bomb.nii.gz"]  # nothing written


def test_gzip_stream_longer_than_its_header_declares_is_stopped(tmp_path, rng):
    """A small header (10x10x10) followed by 64 MB of compressed zeros: the gzip check stops
    reading soon after the declared end and refuses the file, in constant memory."""
    path = tmp_path / "long.nii.gz"
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((10, 10, 10))
    hdr.set_data_dtype(np.float32)
    hdr.set_sform(np.eye(4), code=1)
    hdr["vox_offset"] = 352
    c = zlib.compressobj(9, zlib.DEFLATED, 31)
    with open(path, "wb") as fh:
        fh.write(c.compress(hdr.binaryblock + b"\0" * 4 + rng.bytes(4000)))
        zeros = b"\0" * (1 << 20)
        for _ in range(64):
            fh.write(c.compress(zeros))
        fh.write(c.flush())
    assert path.stat().st_size < 200_000
    msg, secs, grown_kib = _measure(path)
    assert msg.startswith(f"REFUSED {path}: refused: its gzip stream holds more data than its "
                          "header declares (4352 bytes, header and voxels; reading stopped at "
                          ), msg
    assert secs < 3.0 and grown_kib < 200 * 1024, (secs, grown_kib)


def test_max_voxels_limits_and_none_lifts_it(tmp_path, rng):
    shape = (40, 36, 33)  # 47,520 voxels
    arr = _ct(rng, shape)
    path = save_nifti(tmp_path / "mid.nii.gz", arr, grid_affine(2.0))
    n = math.prod(shape)
    with pytest.raises(PddnetError, match=re.escape(
            "declares 40x36x33 voxels (4.8e4; 190.1 kB as stored float32, 190.1 kB as "
            "float32), more than the limit of 47,519 voxels")):
        load_nifti(path, max_voxels=n - 1)
    np.testing.assert_array_equal(load_nifti(path, max_voxels=n).array, arr)
    np.testing.assert_array_equal(load_nifti(path, max_voxels=None).array, arr)
    for bad in (0, -5, 2.5, True, "big"):
        with pytest.raises(PddnetError, match="max_voxels must be a positive integer or None"):
            load_nifti(path, max_voxels=bad)


def test_uncompressed_file_shorter_than_its_header_declares(tmp_path, rng):
    arr = _ct(rng, (10, 11, 12))
    path = save_nifti(tmp_path / "a.nii", arr, grid_affine(2.0))
    cut = tmp_path / "cut.nii"
    cut.write_bytes(path.read_bytes()[:-int(rng.integers(1, arr.nbytes))])
    with pytest.raises(PddnetError, match=r"the file holds \d+ bytes but its header declares "
                                          r"5632 \(10x11x12 float32 voxels\); the file is "
                                          "incomplete"):
        load_nifti(cut)


# ------------------------------------------------------------------ notes
def _with_forms(path: Path, arr, sform, qform, *, scode=1, qcode=1) -> Path:
    img = nib.Nifti1Image(arr, None)
    img.set_sform(sform, code=scode)
    img.set_qform(qform, code=qcode)
    nib.save(img, str(path))
    return path


def test_oblique_scans_get_notes(tmp_path, rng, info):
    deg = round(float(rng.uniform(8.0, 16.0)), 1) + 0.02  # far from a rounding boundary
    aff = grid_affine(4.0)
    aff[:3, :3] = _rotation(deg) @ aff[:3, :3]
    fixed = save_nifti(tmp_path / "f.nii.gz", _ct(rng), aff)
    fx = prepare_fixed(fixed, info)
    note = [n for n in fx.notes if "oblique" in n]
    assert len(note) == 1, fx.notes
    assert note[0] == (
        f"fixed: oblique scan (voxel axes up to {deg:.1f} deg off the nearest RAS axes); the "
        "model grid follows the scan's own voxel axes (reordered to the closest RAS axes, not "
        "rotated), so the scan is not resampled to world axes")
    # the model grid carries the rotation: nothing was resampled to world axes
    np.testing.assert_allclose(fx.grid_affine[:3, :3], aff[:3, :3], atol=1e-5)
    # a moving scan on another (axis-aligned, 3 mm) grid: resampled through the affines
    mov = save_nifti(tmp_path / "m.nii.gz", _ct(rng, (30, 28, 40)), grid_affine(3.0))
    mv = prepare_moving(mov, fx, info)
    assert not any("oblique" in n for n in mv.notes), mv.notes
    # an oblique moving scan on another grid: its full affine is used
    aff_m = grid_affine(3.0)
    aff_m[:3, :3] = _rotation(-deg / 2, deg / 3) @ aff_m[:3, :3]
    mov2 = save_nifti(tmp_path / "m2.nii.gz", _ct(rng, (30, 28, 40)), aff_m)
    mv2 = prepare_moving(mov2, fx, info)
    assert any(n.startswith("moving: oblique scan (voxel axes up to ") and n.endswith(
        "resampled to the model grid with its full affine (rotation included)")
        for n in mv2.notes), mv2.notes
    # an axis-aligned (flipped, permuted) scan is not oblique
    flipped = grid_affine(4.0)[:, [1, 0, 2, 3]] * np.array([1.0, -1.0, 1.0, 1.0])
    plain = save_nifti(tmp_path / "p.nii.gz", _ct(rng, (21, 24, 30)), flipped)
    assert not any("oblique" in n for n in prepare_fixed(plain, info).notes)


def test_sform_qform_disagreement_gets_a_note_and_the_sform_is_used(tmp_path, rng, info):
    sform = grid_affine(4.0, origin=tuple(rng.uniform(-60, -20, 3)))
    shift = float(rng.uniform(1.0, 5.0))
    qform = sform.copy()
    qform[0, 3] += shift
    arr = _ct(rng)
    path = _with_forms(tmp_path / "f.nii.gz", arr, sform, qform)
    vol = load_nifti(path)
    np.testing.assert_allclose(vol.affine, sform, atol=1e-5)  # the sform, as nibabel does
    hdr = nib.load(str(path)).header
    gap = abs(float(hdr.get_qform()[0, 3]) - float(hdr.get_sform()[0, 3]))  # float32-stored
    assert gap == pytest.approx(shift, abs=1e-4)
    assert vol.notes == [f"the sform and qform disagree (they place the grid's corner voxels "
                         f"up to {gap:.3g} mm apart); pddnet uses the sform (code 1), as "
                         "nibabel does"]
    lab = _with_forms(tmp_path / "l.nii.gz", rng.integers(0, 3, SHAPE).astype(np.uint8),
                      sform, qform, qcode=2)
    fx = prepare_fixed(path, info, labels=lab)
    assert f"fixed: {vol.notes[0]}" in fx.notes
    assert any(n.startswith("fixed labels: the sform and qform disagree") for n in fx.notes)
    # a qform with code 0 is not consulted: no note
    quiet = _with_forms(tmp_path / "q.nii.gz", arr, sform, qform, qcode=0)
    assert load_nifti(quiet).notes == []


def test_consistent_forms_from_nibabel_give_no_note(tmp_path, rng):
    """float32 storage of the sform and the quaternion qform must not read as a disagreement."""
    for i in range(5):
        aff = np.eye(4)
        aff[:3, :3] = _rotation(*rng.uniform(-40, 40, 2)) @ np.diag(rng.uniform(0.5, 5.0, 3))
        aff[:3, 3] = rng.uniform(-300, 300, 3)
        path = save_nifti(tmp_path / f"{i}.nii.gz", _ct(rng, (40, 50, 60)), aff)
        assert load_nifti(path).notes == []


# ------------------------------------------------------------------ geometry messages
def test_label_geometry_message_shows_two_different_grids(tmp_path, rng, info):
    aff = grid_affine(4.0, origin=(-46.0, -40.0, -58.0))
    las = aff.copy()
    las[0, 0], las[0, 3] = -4.0, 46.0
    fixed = save_nifti(tmp_path / "f.nii.gz", _ct(rng), aff)
    lab = save_nifti(tmp_path / "l.nii.gz", rng.integers(0, 3, SHAPE).astype(np.uint8), las)
    with pytest.raises(PddnetError) as err:
        prepare_fixed(fixed, info, labels=lab)
    msg = str(err.value)
    assert "\n" not in msg
    assert ("image: 24x21x30 at 4 mm, RAS, origin (-46.0, -40.0, -58.0); labels: 24x21x30 at "
            "4 mm, LAS, origin (46.0, -40.0, -58.0); the same voxel lies up to 92 mm apart"
            ) in msg, msg
    # grids that differ by a rotation only: the obliquity and the distance show it
    rot = aff.copy()
    rot[:3, :3] = _rotation(0.5) @ aff[:3, :3]
    lab2 = save_nifti(tmp_path / "l2.nii.gz", rng.integers(0, 3, SHAPE).astype(np.uint8), rot)
    with pytest.raises(PddnetError, match=r"labels: 24x21x30 at 4 mm, RAS \(axes 0\.5 deg "
                                          r"off\), origin .*apart in the two"):
        prepare_fixed(fixed, info, labels=lab2)
    # a small shift: printed with enough decimals to differ
    near = aff.copy()
    near[1, 3] += 0.02
    lab3 = save_nifti(tmp_path / "l3.nii.gz", rng.integers(0, 3, SHAPE).astype(np.uint8), near)
    with pytest.raises(PddnetError, match=re.escape(
            "image: 24x21x30 at 4 mm, RAS, origin (-46.00, -40.00, -58.00); labels: 24x21x30 "
            "at 4 mm, RAS, origin (-46.00, -39.98, -58.00)")):
        prepare_fixed(fixed, info, labels=lab3)


# ------------------------------------------------------------------ singular affines
def test_singular_affines_are_refused(tmp_path, rng, info):
    arr = _ct(rng, (6, 7, 8))
    coplanar = np.eye(4)
    coplanar[:3, :3] = [[2.0, 2.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 2.0]]  # columns 0 == 1
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(arr.shape)
    hdr.set_data_dtype(np.float32)
    hdr.set_sform(coplanar, code=1)
    path = tmp_path / "s.nii.gz"
    nib.save(nib.Nifti1Image(arr, None, header=hdr), str(path))
    with pytest.raises(PddnetError, match=r"the affine is singular \(determinant 0") as err:
        load_nifti(path)
    assert str(err.value).startswith(str(path)) and "\n" not in str(err.value)
    # the same through the runtime, for an in-memory volume (nearly coplanar columns)
    near = np.diag([4.0, 4.0, 4.0, 1.0])
    near[:3, 1] = near[:3, 0] + np.array([0.0, 1e-7, 0.0])
    with pytest.raises(PddnetError, match=r"^fixed scan: volume: the affine is singular"):
        prepare_fixed(Volume(_ct(rng), near), info)
    bottom = grid_affine(4.0)
    bottom[3, 3] = 2.0
    with pytest.raises(PddnetError, match=r"last row is \(0, 0, 0, 2\)"):
        prepare_fixed(Volume(_ct(rng), bottom), info)
    nan = grid_affine(4.0)
    nan[2, 1] = np.nan
    with pytest.raises(PddnetError, match="NaN or Inf"):
        prepare_fixed(Volume(_ct(rng), nan), info)


# ------------------------------------------------------------------ broken headers
_FLOATS = st.sampled_from([0.0, -1.0, 1.0, 2.5, 0.7, 25.0, 1e30, -1e-30, math.nan, math.inf])
_DIMS = st.sampled_from([0, 1, 2, 3, 4, 5, -1, -7, 1000, 32767])
_DTYPES = st.sampled_from([0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 768, 1024, 1280, 1536,
                           1792, 2048, 2304, 7])
_FIELDS = ("ndim", "dims", "pixdim", "datatype", "bitpix", "codes", "quatern", "srow", "slope",
           "offset", "extra")


@st.composite
def _headers(draw):
    """A valid small header (3D or 4D with one volume) with up to 4 of its fields broken."""
    broken = draw(st.sets(st.sampled_from(_FIELDS), max_size=4))

    def pick(name, good, bad):
        return draw(bad if name in broken else good)

    f = {
        "ndim": pick("ndim", st.sampled_from([3, 4]), st.integers(-2, 8)),
        "dims": pick("dims", st.lists(st.integers(1, 6), min_size=3, max_size=3).map(
            lambda d: d + [1, 1, 1, 1]), st.lists(_DIMS, min_size=7, max_size=7)),
        "pixdim": pick("pixdim", st.lists(st.floats(0.5, 4.0), min_size=3, max_size=3).map(
            lambda p: [1.0] + p + [1.0] * 4), st.lists(_FLOATS, min_size=8, max_size=8)),
        "datatype": pick("datatype", st.sampled_from([2, 4, 8, 16, 64, 256, 512, 768]),
                         _DTYPES),
        "bitpix": pick("bitpix", st.just(None), st.sampled_from([0, 8, 13, 64])),
        "codes": pick("codes", st.tuples(st.integers(0, 2), st.integers(0, 2)),
                      st.tuples(st.integers(-1, 5), st.integers(-1, 5))),
        "quatern": pick("quatern", st.lists(st.floats(-0.5, 0.5), min_size=3, max_size=3).map(
            lambda q: q + [-20.0, 10.0, 5.0]), st.lists(_FLOATS, min_size=6, max_size=6)),
        "srow": pick("srow", st.lists(st.floats(-0.3, 0.3), min_size=12, max_size=12).map(
            lambda r: (np.asarray(r) + np.c_[np.diag([2.0, 3.0, 1.5]), np.zeros(3)].ravel()
                       ).tolist()), st.lists(_FLOATS, min_size=12, max_size=12)),
        "slope": pick("slope", st.sampled_from([0.0, 1.0, 2.0]),
                      st.sampled_from([math.nan, math.inf, -1e30, 1e-40])),
        "offset": pick("offset", st.just(352.0), st.sampled_from([0.0, 360.0, 100.0, 1e12,
                                                                  math.nan])),
        "extra": pick("extra", st.just(0), st.integers(-64, 64)),
    }
    return f


@settings(max_examples=60, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(f=_headers(), gz=st.booleans(), kind=st.sampled_from(["image", "label"]),
       seed=st.integers(0, 2**32 - 1))
def test_any_header_gives_a_volume_or_a_one_line_refusal(tmp_path, f, gz, kind, seed):
    rng = np.random.default_rng(seed)
    hdr = nib.Nifti1Header()
    hdr["dim"] = [f["ndim"]] + f["dims"]
    hdr["pixdim"] = f["pixdim"]
    hdr["datatype"] = f["datatype"]
    try:
        size = np.dtype(nib.nifti1.data_type_codes.dtype[f["datatype"]]).itemsize
    except KeyError:
        size = 4
    hdr["bitpix"] = 8 * size if f["bitpix"] is None else f["bitpix"]
    hdr["qform_code"], hdr["sform_code"] = f["codes"]
    q = f["quatern"]
    hdr["quatern_b"], hdr["quatern_c"], hdr["quatern_d"] = q[:3]
    hdr["qoffset_x"], hdr["qoffset_y"], hdr["qoffset_z"] = q[3:]
    r = f["srow"]
    hdr["srow_x"], hdr["srow_y"], hdr["srow_z"] = r[:4], r[4:8], r[8:]
    hdr["scl_slope"], hdr["scl_inter"] = f["slope"], float(rng.normal())
    hdr["vox_offset"] = f["offset"]
    declared = math.prod(max(d, 0) for d in f["dims"][:max(f["ndim"], 0)]) * size
    n = max(0, min(declared, 8192) + f["extra"])
    if kind == "label" and size == 1:  # a plausible label map now and then
        data = rng.integers(0, 4, n).astype(np.uint8).tobytes()
    else:
        data = rng.bytes(n)
    payload = hdr.binaryblock + b"\0" * 4 + data
    path = tmp_path / ("h.nii.gz" if gz else "h.nii")
    path.write_bytes(gzip.compress(payload) if gz else payload)
    try:
        with warnings.catch_warnings():  # numpy's overflow/invalid-value notes on garbage data
            warnings.simplefilter("ignore", RuntimeWarning)
            vol = load_nifti(path, kind=kind)
    except PddnetError as exc:
        msg = str(exc)
        assert msg and "\n" not in msg and "\r" not in msg, msg
        return
    assert isinstance(vol, Volume) and vol.array.ndim == 3 and vol.array.size > 0
    assert vol.array.dtype == (np.float32 if kind == "image" else np.uint8)
    assert np.all(np.isfinite(vol.affine)) and abs(np.linalg.det(vol.affine[:3, :3])) > 0
    assert all("\n" not in n for n in vol.notes)
