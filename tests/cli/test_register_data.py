"""`pddnet register --data`: a whole Learn2Reg split into a submission folder, `--json`, and
`pddnet data info --json`.

A tiny hand-made dataset (test scans in imagesTs/labelsTs, as Learn2Reg ships them, the rest in
imagesTr/labelsTr) and a fake model whose fields reach outside the grid. The submission is scored
by an independent implementation of the official evaluation's definitions
(tests/helpers/l2r_reference.py: file names, get_fdata, the zero-outside label warp, Dice,
SDlogJ, folding count, aggregates) and pddnet's numbers must equal it to float precision.
Also: resume (finished pairs skipped, a missing, a truncated and a torn temporary file
handled, a lost log rebuilt from the files), the refusals (unknown split, mixed options, a
folder made by another model or name style, a folder that is not a submission, image names the
evaluation cannot parse), short names, progress on stderr, and `--json` output shape.

Not tested here: the real official evaluation.py (it needs the evalutils package; it was run
by hand on a synthetic split, see docs/validation.md), kill -9 during a dataset run (each file
is written through pddnet._files.atomic_write, tested in tests/test_files.py), GPU providers.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from helpers.fake_models import ct_like, grid_affine, make_model, save_model
from helpers.l2r_reference import score_submission
from pddnet.cli import main
from pddnet.data.io import save_nifti

SHAPE = (24, 21, 30)
AFF = grid_affine(4.0)
LABELS = [1, 2, 3, 4]


def _labels(rng):
    from scipy import ndimage

    f = ndimage.gaussian_filter(rng.normal(size=SHAPE), 2.0)
    lab = np.digitize(f, np.quantile(f, [0.3, 0.5, 0.7, 0.9])).astype(np.uint8)
    lab[:3] = 1   # a label on the grid's edge, so the zero-outside rule matters
    return lab


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("l2r")
    seed = int(np.random.SeedSequence().entropy % (2**32))
    print(f"random seed {seed}")
    rng = np.random.default_rng(seed)
    training = []
    for i in range(1, 5):
        rel = f"./imagesTr/Tiny_{i:04d}_0000.nii.gz"
        save_nifti(root / rel, ct_like(rng, SHAPE), AFF)
        save_nifti(root / rel.replace("images", "labels"), _labels(rng), AFF)
        training.append({"image": rel, "label": rel.replace("images", "labels")})
    test = []
    for i in (5, 6, 7):
        rel = f"./imagesTs/Tiny_{i:04d}_0000.nii.gz"
        save_nifti(root / rel, ct_like(rng, SHAPE), AFF)
        save_nifti(root / rel.replace("images", "labels"), _labels(rng), AFF)
        test.append(rel)
    doc = {"name": "Tiny", "labels": {"0": {"0": "background", "1": "a", "2": "b", "3": "c",
                                            "4": "d"}},
           "training": training, "test": [{"image": t} for t in test],
           "registration_val": [{"fixed": training[1]["image"], "moving": training[2]["image"]}],
           "registration_test": [{"fixed": test[0], "moving": test[1]},
                                 {"fixed": test[1], "moving": test[0]},
                                 {"fixed": test[0], "moving": test[2]}]}
    (root / "Tiny_dataset.json").write_text(json.dumps(doc, indent=1))
    model = save_model(make_model(SHAPE, translation=(2.6, -2.2, 1.7), gain=0.9, num_labels=5),
                       root / "model.onnx")
    return {"root": root, "doc": doc, "model": model}


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _register(ds, out, *extra):
    return _run("register", "--model", ds["model"], "--data", ds["root"], "--out", out,
                "--threads", 1, *extra)


def _files(out):
    return sorted(p.name for p in out.iterdir())


EXPECTED = ["disp_0005_0000_0006_0000.nii.gz", "disp_0005_0000_0007_0000.nii.gz",
            "disp_0006_0000_0005_0000.nii.gz", "log.jsonl", "pddnet_submission.json"]


def test_submission_equals_the_official_definitions(dataset, tmp_path):
    out = tmp_path / "sub"
    r = _register(dataset, out, "--json")
    assert r.exit_code == 0, r.output
    assert _files(out) == EXPECTED
    got = json.loads(r.stdout)                    # stdout is one JSON object, nothing else
    assert "register test" in r.stderr and "Dice: mean" in r.stderr   # progress, summary
    assert got["registered"] == 3 and got["skipped"] == 0 and got["split"] == "test"
    ref = score_submission(dataset["root"], dataset["doc"]["registration_test"], out, LABELS)
    assert min(c["outside"] for c in ref["cases"]) > 0.02   # the fields do reach outside
    for rec, case in zip(got["pairs"], ref["cases"]):
        m = rec["metrics"]
        assert m["labels"] == LABELS
        assert m["dice_mean"] == pytest.approx(case["dice"], rel=1e-12, abs=1e-15)
        assert m["hd95_mean"] == pytest.approx(case["hd95"], rel=1e-12)
        assert m["sdlogj"] == pytest.approx(case["sdlogj"], rel=1e-9)
        assert m["num_foldings"] == case["num_foldings"] == 0.0
        assert m["folding_percent"] == pytest.approx(case["folding_percent"], rel=1e-9)
    for key in ("dice", "hd95", "sdlogj"):
        for stat in ("mean", "std", "30"):
            assert got["aggregates"][key][stat] == pytest.approx(ref["aggregates"][key][stat],
                                                                 rel=1e-9, abs=1e-15), key
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [x["status"] for x in log] == ["registered"] * 3
    assert [x["file"] for x in log] == [p["file"] for p in got["pairs"]]
    assert log[0]["fixed"] == "./imagesTs/Tiny_0005_0000.nii.gz"


def test_resume_skips_finished_pairs_and_repairs_the_rest(dataset, tmp_path, capsys):
    out = tmp_path / "sub"
    assert _register(dataset, out, "--no-progress").exit_code == 0
    before = {n: (out / n).read_bytes() for n in EXPECTED[:3]}
    again = _register(dataset, out, "--json", "--no-progress")
    assert again.exit_code == 0, again.output
    res = json.loads(again.stdout)
    assert res["registered"] == 0 and [p["status"] for p in res["pairs"]] == ["skipped"] * 3
    assert {n: (out / n).read_bytes() for n in EXPECTED[:3]} == before
    assert len((out / "log.jsonl").read_text().splitlines()) == 3      # nothing appended
    first = res["pairs"]
    # one file gone, one truncated, a temporary file left by a killed run
    (out / EXPECTED[0]).unlink()
    (out / EXPECTED[1]).write_bytes(before[EXPECTED[1]][:1000])
    (out / ".disp_0006_0000_0005_0000.nii.gz.1a2b3c4d.partial.nii.gz").write_bytes(b"x")
    third = _register(dataset, out, "--json", "--no-progress")
    assert third.exit_code == 0, third.output
    res = json.loads(third.stdout)
    assert [p["status"] for p in res["pairs"]] == ["registered", "skipped", "registered"]
    assert "removed .disp_0006_0000_0005_0000.nii.gz.1a2b3c4d.partial.nii.gz" in third.stderr
    assert _files(out) == EXPECTED and not list(out.glob(".*"))
    assert {n: (out / n).read_bytes() for n in EXPECTED[:3]} == before   # same model, same bytes
    # the log lost: metrics are computed again from the files, equal to the first ones
    (out / "log.jsonl").unlink()
    fourth = _register(dataset, out, "--json", "--no-progress")
    res = json.loads(fourth.stdout)
    assert [p["status"] for p in res["pairs"]] == ["scored"] * 3
    for a, b in zip(first, res["pairs"]):
        for k in ("dice_mean", "hd95_mean", "sdlogj", "folding_percent", "num_foldings"):
            assert b["metrics"][k] == pytest.approx(a["metrics"][k], rel=1e-12), k


def test_refusals(dataset, tmp_path):
    out = tmp_path / "sub"
    r = _register(dataset, out, "--split", "train", "--fixed", dataset["root"] / "x.nii.gz")
    assert r.exit_code == 2 and "drop --fixed" in r.output
    r = _run("register", "--model", dataset["model"], "--out", out)
    assert r.exit_code == 2 and "--data DIR" in r.output
    assert _register(dataset, out, "--no-progress").exit_code == 0
    r = _register(dataset, out, "--names", "short", "--no-progress")
    assert r.exit_code == 2 and "another names" in r.output and "--overwrite" in r.output
    r = _register(dataset, out, "--split", "val", "--no-progress")
    assert r.exit_code == 2 and "another split" in r.output
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    r = _register(dataset, other, "--no-progress")
    assert r.exit_code == 2 and "not a pddnet submission" in r.output
    assert _files(other) == ["notes.txt"]
    # a json without the split: a clear error, nothing written
    doc = dict(dataset["doc"])
    del doc["registration_val"]
    alt = dataset["root"] / "alt"
    alt.mkdir(exist_ok=True)
    (alt / "Alt_dataset.json").write_text(json.dumps(
        {**doc, "training": [{k: "../" + v[2:] for k, v in t.items()} for t in doc["training"]],
         "registration_test": [{k: "../" + v[2:] for k, v in p.items()}
                               for p in doc["registration_test"]]}))
    r = _run("register", "--model", dataset["model"], "--data", alt, "--split", "val",
             "--out", tmp_path / "v")
    assert r.exit_code == 2 and "no 'registration_val' list" in r.output
    assert not (tmp_path / "v").exists()
    # a model that cannot be loaded: refused, and no empty submission folder is left
    bad = tmp_path / "bad.onnx"
    bad.write_text("not a model")
    r = _run("register", "--model", bad, "--data", dataset["root"], "--out", tmp_path / "n" / "s")
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    assert not (tmp_path / "n").exists()


def test_image_names_the_evaluation_cannot_read(dataset, tmp_path):
    root = tmp_path / "bad"
    rng = np.random.default_rng(0)
    for n in ("a.nii.gz", "b.nii.gz"):
        save_nifti(root / "imagesTr" / n, ct_like(rng, SHAPE), AFF)
    (root / "Bad_dataset.json").write_text(json.dumps({
        "training": [{"image": "./imagesTr/a.nii.gz"}, {"image": "./imagesTr/b.nii.gz"}],
        "registration_test": [{"fixed": "./imagesTr/a.nii.gz", "moving": "./imagesTr/b.nii.gz"}]}))
    r = _run("register", "--model", dataset["model"], "--data", root, "--out", tmp_path / "s")
    assert r.exit_code == 2 and "NAME_SSSS_MMMM.nii.gz" in r.output


def test_short_names_and_val_split(dataset, tmp_path):
    out = tmp_path / "short"
    r = _register(dataset, out, "--names", "short", "--split", "val", "--no-progress", "--json")
    assert r.exit_code == 0, r.output
    assert _files(out) == ["disp_0002_0003.nii.gz", "log.jsonl", "pddnet_submission.json"]
    res = json.loads(r.stdout)
    assert res["pairs"][0]["metrics"]["dice_mean"] is not None


def test_data_info_json_reads_images_ts(dataset):
    r = _run("data", "info", "--json", dataset["root"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert info["splits"]["test"] == {"pairs": 3, "pairs_with_labels": 3}
    assert info["splits"]["val"] == {"pairs": 1, "pairs_with_labels": 1}
    assert info["labels"] == {"0": "background", "1": "a", "2": "b", "3": "c", "4": "d"}
    assert info["problems"] == []
    text = _run("data", "info", dataset["root"])
    assert "test pairs: 3 (3 with label maps for both scans)" in text.output


def test_register_json_single_pair(dataset, tmp_path):
    root = dataset["root"]
    r = _run("register", "--model", dataset["model"], "--threads", 1, "--json",
             "--fixed", root / "imagesTs/Tiny_0005_0000.nii.gz",
             "--moving", root / "imagesTs/Tiny_0006_0000.nii.gz",
             "--fixed-labels", root / "labelsTs/Tiny_0005_0000.nii.gz",
             "--moving-labels", root / "labelsTs/Tiny_0006_0000.nii.gz", "--out", tmp_path / "o")
    assert r.exit_code == 0, r.output
    got = json.loads(r.stdout)
    assert "times in ms" in r.stderr and "times in ms" not in r.stdout
    (one,) = got["results"]
    assert set(one["outputs"]) >= {"disp.nii.gz", "summary.json", "warped_labels.nii.gz"}
    assert one["timings_ms"]["head"] is not None
    ref = score_submission(root, [{"fixed": "./imagesTs/Tiny_0005_0000.nii.gz",
                                   "moving": "./imagesTs/Tiny_0006_0000.nii.gz"}],
                           _as_submission(tmp_path / "o"), LABELS)
    assert one["metrics"]["dice_mean"] == pytest.approx(ref["cases"][0]["dice"], rel=1e-12)
    assert one["metrics"]["num_foldings"] == 0.0


def _as_submission(folder):
    """The single-pair disp.nii.gz under the official name, in a folder of its own."""
    sub = folder.parent / "as_sub"
    sub.mkdir()
    (sub / "disp_0005_0000_0006_0000.nii.gz").write_bytes((folder / "disp.nii.gz").read_bytes())
    return sub


@pytest.mark.parametrize("sig", ["SIGKILL", "SIGINT"])
def test_a_stopped_run_leaves_complete_files_and_resumes(dataset, tmp_path, sig):
    """Stopped after its first file (kill -9 or Ctrl-C), a run leaves only complete fields (and
    whole log lines); the next run skips them and registers the rest."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    src = Path(__file__).resolve().parents[2] / "src"
    out = tmp_path / "sub"
    slow = ("import sys, time, nibabel; real = nibabel.save\n"
            "def save(*a, **k):\n    r = real(*a, **k); time.sleep(1.5); return r\n"
            "nibabel.save = save\nfrom pddnet.cli import main\nmain(sys.argv[1:])\n")
    p = subprocess.Popen([sys.executable, "-c", slow, "register", "--model",
                          str(dataset["model"]), "--data", str(dataset["root"]), "--out",
                          str(out), "--threads", "1", "--no-progress"],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env={**os.environ, "PYTHONPATH": str(src)})
    t0 = time.time()
    while not list(out.glob(".disp_*.partial*")) and not list(out.glob("disp_*")):
        assert p.poll() is None, p.communicate()[0]
        assert time.time() - t0 < 120
        time.sleep(0.01)
    p.send_signal(getattr(signal, sig))     # inside the first file's write (save sleeps after)
    text, _ = p.communicate(timeout=120)
    assert p.returncode in ((-9,) if sig == "SIGKILL" else (130,)), text
    done = sorted(q.name for q in out.glob("disp_*"))
    assert len(done) <= 1
    res = _register(dataset, out, "--json", "--no-progress")
    assert res.exit_code == 0, res.output
    got = json.loads(res.stdout)
    assert [r["status"] == "registered" for r in got["pairs"]].count(True) == 3 - len(done)
    assert _files(out) == EXPECTED and not list(out.glob(".*"))
    assert all(json.loads(line) for line in (out / "log.jsonl").read_text().splitlines())
