"""`pddnet register`: several moving scans with fixed-feature reuse, the printed table, and bad
inputs that must exit with status 2, a one-line message and no output files.

Not tested here: the numerical results (tests/runtime/test_runtime_session.py), GPU providers.
"""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from helpers.fake_models import ct_like, grid_affine, make_model, save_model, save_volume
from pddnet.cli import main

SHAPE = (24, 21, 30)
AFF4 = grid_affine(4.0)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    rng = np.random.default_rng(51)
    lab = lambda: rng.integers(0, 4, SHAPE).astype(np.uint8)
    f = {
        "model": save_model(make_model(SHAPE, translation=(1.0, 0.0, -1.0), gain=0.2,
                                       num_labels=5), d / "model.onnx"),
        "fixed": save_volume(d / "fixed.nii.gz", ct_like(rng, SHAPE), AFF4),
        "fixed_lab": save_volume(d / "fixed_lab.nii.gz", lab(), AFF4),
        "m1": save_volume(d / "case_001.nii.gz", ct_like(rng, SHAPE), AFF4),
        "m2": save_volume(d / "case_002.nii", ct_like(rng, SHAPE), AFF4),
        "l1": save_volume(d / "case_001_lab.nii.gz", lab(), AFF4),
        "l2": save_volume(d / "case_002_lab.nii.gz", lab(), AFF4),
    }
    bad = ct_like(rng, SHAPE)
    bad[1, 2, 3] = np.inf
    f["nan"] = save_volume(d / "nan.nii.gz", bad, AFF4)
    f["4d"] = save_volume(d / "4d.nii.gz", ct_like(rng, SHAPE + (2,)), AFF4)
    f["huge"] = save_volume(d / "huge.nii.gz", ct_like(rng, SHAPE), np.diag([40.0, 4, 4, 1]))
    f["1mm"] = save_volume(d / "1mm.nii.gz", ct_like(rng, SHAPE), grid_affine(1.0))
    f["const"] = save_volume(d / "const.nii.gz", np.full(SHAPE, 40.0, np.float32), AFF4)
    frac = lab().astype(np.float32)
    frac[0, 0, 0] = 1.5
    f["frac_lab"] = save_volume(d / "frac_lab.nii.gz", frac, AFF4)
    nine = lab()
    nine[5, 5, 5] = 9
    f["nine_lab"] = save_volume(d / "nine_lab.nii.gz", nine, AFF4)
    f["notonnx"] = d / "model.txt.onnx"
    f["notonnx"].write_text("hello")
    return {k: str(v) for k, v in f.items()}


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_help():
    r = _run("register", "--help")
    assert r.exit_code == 0 and "--moving-labels" in r.output and "--overwrite" in r.output


def test_register_two_moving_scans(files, tmp_path):
    out = tmp_path / "out"
    r = _run("register", "--model", files["model"], "--fixed", files["fixed"],
             "--moving", files["m1"], files["m2"], "--moving-labels", files["l1"], files["l2"],
             "--fixed-labels", files["fixed_lab"], "--out", out, "--threads", 1)
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.iterdir()) == ["case_001", "case_002"]
    for sub in ("case_001", "case_002"):
        s = json.loads((out / sub / "summary.json").read_text())
        assert s["metrics"]["dice_mean"] is not None
        assert (out / sub / "warped_labels.nii.gz").exists()
    s2 = json.loads((out / "case_002" / "summary.json").read_text())
    assert s2["reuse"]["fixed_features"] == "reused" and s2["reuse"]["saved_ms"] > 0
    assert "Dice after" in r.output and "case_001.nii.gz" in r.output
    assert "reused for 1 more moving scan(s), saving" in r.output
    # running again refuses before computing anything; --overwrite replaces
    again = _run("register", "--model", files["model"], "--fixed", files["fixed"],
                 "--moving", files["m1"], files["m2"], "--out", out)
    assert again.exit_code == 2 and "already holds" in again.output and "--overwrite" in again.output
    again = _run("register", "--model", files["model"], "--fixed", files["fixed"],
                 "--moving", files["m1"], files["m2"], "--out", out, "--overwrite")
    assert again.exit_code == 0, again.output


def test_single_moving_writes_into_out(files, tmp_path):
    r = _run("register", "--model", files["model"], "--fixed", files["fixed"],
             "--moving", files["m1"], "--out", tmp_path, "--l2r-half")
    assert r.exit_code == 0, r.output
    assert {"disp.nii.gz", "disp.npz", "disp_itk.nii.gz", "disp_l2r2020.npz", "warped.nii.gz",
            "summary.json"} == {p.name for p in tmp_path.iterdir()}


@pytest.mark.parametrize("change, needle", [
    ({"--moving": "nan"}, "NaN/Inf"),
    ({"--fixed": "4d"}, "expected a 3D volume"),
    ({"--moving": "huge"}, "implausible voxel spacing"),
    ({"--fixed": "1mm", "--moving": "1mm"}, "--spacing-tolerance"),
    ({"--moving": "const"}, "constant"),
    ({"--moving-labels": "frac_lab"}, "non-integer"),
    ({"--fixed-labels": "nine_lab"}, "labels 0..5"),
    ({"--model": "notonnx"}, "not a readable ONNX model"),
    ({"--moving": "missing"}, "no such file"),
    ({"--moving-labels": ["l1", "l2"]}, "2 moving label maps for 1 moving scans"),
    ({"--backend": "tensorrt-someday"}, "unknown backend"),
    ({"--providers": "cuda"}, "not available"),
])
def test_bad_inputs_exit_2_without_outputs(files, tmp_path, change, needle):
    opts = {"--model": "model", "--fixed": "fixed", "--moving": "m1", "--out": None}
    opts.update(change)
    args = ["register"]
    for k, v in opts.items():
        if k == "--out":
            args += [k, tmp_path / "out"]
        elif k in ("--backend", "--providers"):
            args += [k, v]
        else:
            for one in ([v] if isinstance(v, str) else v):
                args += [k, files.get(one, tmp_path / "missing.nii.gz")]
    r = _run(*args)
    assert r.exit_code == 2, r.output
    assert r.output.startswith("error: ") and needle in r.output, r.output
    assert "Traceback" not in r.output
    out = tmp_path / "out"
    assert not out.exists() or not any(out.rglob("*"))
