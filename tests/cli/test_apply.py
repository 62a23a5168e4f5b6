"""`pddnet apply`: each field a registration writes (disp.nii.gz, disp.npz, disp_itk.nii.gz)
applied to the moving image and labels gives register's own warped.nii.gz and
warped_labels.nii.gz; bad input exits 2 with a one-line message and writes nothing.

The registration runs the fake model (tests/helpers/fake_models.py) on a fixed scan stored
flipped and permuted and a moving scan on another grid, so the field is image-dependent and
every conversion is exercised.

Not tested here: agreement with SimpleITK (tests/runtime/test_fields*.py).
"""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from helpers.fake_models import ct_like, grid_affine, make_model, reorient, save_model
from pddnet.cli import main
from pddnet.data.io import save_nifti

SHAPE = (24, 21, 30)
AFF4 = grid_affine(4.0)


@pytest.fixture(scope="module")
def reg(tmp_path_factory):
    d = tmp_path_factory.mktemp("apply")
    rng = np.random.default_rng(901)
    model = save_model(make_model(SHAPE, translation=(1.0, -2.0, 0.5), gain=0.5, seed=5,
                                  num_labels=4), d / "m.onnx")
    fixed, f_aff = reorient(ct_like(rng, SHAPE), AFF4, flips=(1,), perm=(2, 0, 1))
    m_aff = grid_affine(3.0, origin=(-62.0, -50.0, -70.0))
    m_shape = (46, 40, 56)
    lab = np.zeros(m_shape, np.uint8)
    lab[12:34, 10:30, 14:40] = 1
    lab[18:26, 16:24, 20:32] = 2
    f = {"model": model,
         "fixed": save_nifti(d / "fixed.nii.gz", fixed, f_aff),
         "moving": save_nifti(d / "moving.nii.gz", ct_like(rng, m_shape), m_aff),
         "labels": save_nifti(d / "labels.nii.gz", lab, m_aff),
         "out": d / "out"}
    r = _run("register", "--model", model, "--fixed", f["fixed"], "--moving", f["moving"],
             "--moving-labels", f["labels"], "--out", f["out"])
    assert r.exit_code == 0, r.output
    return f


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _data(path):
    return np.asarray(nib.load(path).dataobj)


@pytest.mark.parametrize("name", ["disp.nii.gz", "disp.npz", "disp_itk.nii.gz"])
def test_each_field_output_reproduces_register(reg, tmp_path, name):
    out = reg["out"]
    r = _run("apply", "--field", out / name, "--image", reg["moving"], "--out",
             tmp_path / "w.nii.gz")
    assert r.exit_code == 0, r.output
    assert "w.nii.gz" in r.output and ("ITK" in r.output) == (name == "disp_itk.nii.gz")
    w = nib.load(tmp_path / "w.nii.gz")
    ref = nib.load(out / "warped.nii.gz")
    np.testing.assert_allclose(w.affine, ref.affine)
    assert w.get_data_dtype() == np.float32
    if name == "disp_itk.nii.gz":  # through mm and back: float32 rounding of the field
        np.testing.assert_allclose(_data(w.get_filename()), _data(ref.get_filename()),
                                   atol=2e-3)
    else:
        np.testing.assert_array_equal(_data(w.get_filename()), _data(ref.get_filename()))
    r = _run("apply", "--field", out / name, "--image", reg["labels"], "--labels", "--out",
             tmp_path / "l.nii.gz", "--reference", reg["fixed"])
    assert r.exit_code == 0, r.output
    lab = nib.load(tmp_path / "l.nii.gz")
    assert lab.get_data_dtype() == np.uint8
    ref_l = _data(out / "warped_labels.nii.gz")
    if name == "disp_itk.nii.gz":  # a rounding can move a point across a half-voxel tie
        assert np.mean(_data(tmp_path / "l.nii.gz") != ref_l) < 1e-3
    else:
        np.testing.assert_array_equal(_data(tmp_path / "l.nii.gz"), ref_l)


def test_npz_alone_needs_its_grid_and_the_old_layout_is_read(reg, tmp_path):
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(reg["out"] / "disp.npz", lone / "disp.npz")
    r = _run("apply", "--field", lone / "disp.npz", "--image", reg["moving"], "--out",
             tmp_path / "w.nii.gz")
    assert r.exit_code == 2 and "--reference" in r.output and "summary.json" in r.output
    assert not (tmp_path / "w.nii.gz").exists()
    r = _run("apply", "--field", lone / "disp.npz", "--image", reg["moving"], "--out",
             tmp_path / "w.nii.gz", "--reference", reg["fixed"])
    assert r.exit_code == 0, r.output
    np.testing.assert_array_equal(_data(tmp_path / "w.nii.gz"),
                                  _data(reg["out"] / "warped.nii.gz"))
    # the two-array disp.npz of earlier versions (disp, affine)
    with np.load(reg["out"] / "disp.npz") as z:
        disp = z["arr_0"]
    np.savez(lone / "old.npz", disp=disp, affine=nib.load(reg["fixed"]).affine)
    r = _run("apply", "--field", lone / "old.npz", "--image", reg["moving"], "--out",
             tmp_path / "old.nii.gz")
    assert r.exit_code == 0, r.output
    np.testing.assert_array_equal(_data(tmp_path / "old.nii.gz"),
                                  _data(reg["out"] / "warped.nii.gz"))


def test_existing_output_is_refused_then_replaced(reg, tmp_path):
    target = tmp_path / "w.nii.gz"
    target.write_bytes(b"mine")
    args = ["apply", "--field", reg["out"] / "disp.nii.gz", "--image", reg["moving"],
            "--out", target]
    r = _run(*args)
    assert r.exit_code == 2 and "already exists" in r.output and "--overwrite" in r.output
    assert target.read_bytes() == b"mine"
    assert _run(*args, "--overwrite").exit_code == 0
    assert nib.load(target).shape == nib.load(reg["fixed"]).shape


def test_interrupted_write_leaves_nothing(reg, tmp_path, monkeypatch):
    import pddnet.data.io as io

    def broken(img, path):
        with open(path, "wb") as fh:
            fh.write(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(io.nib, "save", broken)
    with pytest.raises(OSError):
        from pddnet.runtime.fields import apply_field_files
        apply_field_files(reg["out"] / "disp.nii.gz", reg["moving"], tmp_path / "w.nii.gz")
    assert list(tmp_path.iterdir()) == []


def _bad_files(reg, d):
    f = {}
    disp = _data(reg["out"] / "disp.nii.gz")
    aff = nib.load(reg["fixed"]).affine
    f["l2r"] = d / "disp_l2r2020.npz"
    np.savez(f["l2r"], arr_0=np.zeros((3, 4, 5, 6), np.float16))
    f["two"] = d / "two.npz"
    np.savez(f["two"], a=disp, b=disp)
    img = nib.Nifti1Image(disp[:, :, :, None, :], aff)  # 5D without the vector intent
    f["no_intent"] = d / "no_intent.nii.gz"
    nib.save(img, f["no_intent"])
    img.header.set_intent(1006)
    f["dispvect"] = d / "dispvect.nii.gz"
    nib.save(img, f["dispvect"])
    f["3d"] = save_nifti(d / "3d.nii.gz", disp[..., 0], aff)
    nanf = disp.copy()
    nanf[1, 1, 1, 0] = np.nan
    f["nan"] = save_nifti(d / "nan.nii.gz", nanf, aff)
    f["text"] = d / "text.nii.gz"
    f["text"].write_text("not a nifti")
    f["other_grid"] = save_nifti(d / "other_grid.nii.gz", np.zeros((5, 6, 7), np.float32), aff)
    shifted = aff.copy()
    shifted[0, 3] += 10
    f["shifted"] = save_nifti(d / "shifted.nii.gz", _data(reg["fixed"]), shifted)
    far = grid_affine(3.0, origin=(5000.0, 5000.0, 5000.0))
    f["far"] = save_nifti(d / "far.nii.gz", _data(reg["moving"]), far)
    return f


@pytest.mark.parametrize("change, needle", [
    ({"--field": "missing"}, "no such file"),
    ({"--field": "l2r"}, "Learn2Reg 2020 half-resolution"),
    ({"--field": "two"}, "holds 2 arrays"),
    ({"--field": "no_intent"}, "intent 'vector' (1007)"),
    ({"--field": "dispvect"}, "NiftyReg"),
    ({"--field": "3d"}, "is not a displacement field"),
    ({"--field": "nan"}, "NaN/Inf"),
    ({"--field": "text"}, "cannot be read as NIfTI"),
    ({"--reference": "other_grid"}, "--reference the fixed image"),
    ({"--reference": "shifted"}, "10 mm apart"),
    ({"--image": "far"}, "none of the field's target points"),
    ({"--out": "w.txt"}, "must end in .nii or .nii.gz"),
    ({"--max-voxels": "100"}, "--max-voxels"),
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(reg, tmp_path, change, needle):
    bad = _bad_files(reg, tmp_path)
    opts = {"--field": reg["out"] / "disp.nii.gz", "--image": reg["moving"],
            "--out": tmp_path / "out" / "w.nii.gz"}
    for k, v in change.items():
        opts[k] = (tmp_path / "out" / v if k == "--out" else bad.get(v, tmp_path / v)
                   if k != "--max-voxels" else v)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    r = _run("apply", *[x for kv in opts.items() for x in kv])
    assert r.exit_code == 2, r.output
    assert needle in r.output, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.output
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_summary_documents_the_field_files(reg):
    s = json.loads((reg["out"] / "summary.json").read_text())
    assert set(s["field"]["files"]) == {"disp.nii.gz", "disp.npz", "disp_itk.nii.gz"}
    np.testing.assert_allclose(s["field"]["affine"], nib.load(reg["fixed"]).affine)
