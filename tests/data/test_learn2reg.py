"""The Learn2Reg dataset reader and `pddnet data info`.

Most tests build tiny hand-made Learn2Reg folders (random volumes of a few hundred voxels,
json written here); one runs the reader on a folder written by the synthetic generator.

Not tested here: real Learn2Reg downloads (no network), keypoint/mask entries of the json
(ignored by the reader), "training_paired_images" (paired tasks such as NLST are not
supported as a split), and load time on large volumes.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from pddnet.cli import main
from pddnet.data.io import save_nifti
from pddnet.data.learn2reg import Learn2RegDataset, find_dataset_json, subject_name
from pddnet.data.synth import write_dataset
from pddnet.errors import PddnetError

SHAPE = (9, 8, 7)


@pytest.fixture
def rng():
    seed = int(np.random.SeedSequence().entropy % (2**32))
    print(f"random seed {seed}")
    return np.random.default_rng(seed)


def _make(root, rng, names=("Tiny_0001", "Tiny_0002", "Tiny_0003", "Tiny_0004", "Tiny_0005"),
          val=((2, 3),), test=((3, 4), (4, 3)), extra=None):
    """A Learn2Reg folder with random images and labels; returns (root, affine, doc)."""
    aff = np.diag([1.5, 1.5, 2.0, 1.0])
    aff[:3, 3] = rng.uniform(-20, 20, 3)
    training = []
    for n in names:
        img = rng.normal(0, 200, SHAPE).astype(np.float32)
        lab = rng.integers(0, 4, SHAPE).astype(np.uint8)
        save_nifti(root / "imagesTr" / f"{n}_0000.nii.gz", img, aff)
        save_nifti(root / "labelsTr" / f"{n}_0000.nii.gz", lab, aff)
        training.append({"image": f"./imagesTr/{n}_0000.nii.gz",
                         "label": f"./labelsTr/{n}_0000.nii.gz"})

    def pair(i, j):
        return {"fixed": training[i]["image"], "moving": training[j]["image"]}

    doc = {"name": "Tiny", "labels": {"0": {"0": "background", "1": "a", "2": "b", "3": "c"}},
           "training": training}
    if val is not None:
        doc["registration_val"] = [pair(i, j) for i, j in val]
    if test is not None:
        doc["registration_test"] = [pair(i, j) for i, j in test]
    doc.update(extra or {})
    (root / "Tiny_dataset.json").write_text(json.dumps(doc, indent=1))
    return root, aff, doc


def test_reads_hand_made_layout(tmp_path, rng):
    root, aff, _ = _make(tmp_path, rng)
    ds = Learn2RegDataset(root)
    assert ds.json_path == root / "Tiny_dataset.json"
    assert Learn2RegDataset(root / "Tiny_dataset.json").json_path == ds.json_path
    assert [s.name for s in ds.subjects] == [f"Tiny_000{i}" for i in range(1, 6)]
    assert ds.subjects[0].image == root / "imagesTr" / "Tiny_0001_0000.nii.gz"
    assert ds.label_names == {0: "background", 1: "a", 2: "b", 3: "c"}
    # no pddnet block: training subjects are those in no val/test pair (0001, 0002)
    train = ds.pairs("train")
    assert [(p.fixed.name, p.moving.name) for p in train] == [("Tiny_0001", "Tiny_0002"),
                                                             ("Tiny_0002", "Tiny_0001")]
    assert [str(p) for p in ds.pairs("val")] == ["Tiny_0003 <- Tiny_0004"]
    assert len(ds.pairs("test")) == 2
    ds.check()
    fixed, moving, fl, ml = ds.load_pair(ds.pairs("test")[0])
    assert fixed.shape == SHAPE and fixed.array.dtype == np.float32
    assert fl.array.dtype == np.uint8 and ml.shape == SHAPE
    np.testing.assert_allclose(fixed.affine, aff, atol=1e-5)
    assert fixed.array.std() > 0 and not np.array_equal(fixed.array, moving.array)
    with pytest.raises(PddnetError, match="unknown split"):
        ds.pairs("holdout")


def test_reads_synth_layout(tmp_path):
    seed = int(np.random.SeedSequence().entropy % 100_000)
    rep = write_dataset(tmp_path / "ds", subjects=5, seed=seed, preset="small", progress=False)
    ds = Learn2RegDataset(tmp_path / "ds")
    assert [s.name for s in ds.subjects] == rep.subjects
    assert ds.label_names[6] == "liver" and len(ds.label_names) == 14
    assert ds.train_subjects() == ds.subjects[:1]  # pddnet split, not derived
    assert ds.pairs("train") == []
    assert [(p.fixed.name, p.moving.name) for p in ds.pairs("test")] == [
        (q.fixed, q.moving) for q in rep.test_pairs]
    assert len(ds.pairs("val")) == 2
    ds.check()
    f, m, fl, ml = ds.load_pair(ds.pairs("val")[0])
    assert f.shape == (96, 80, 128) and f.spacing == (4.0, 4.0, 4.0)
    assert set(np.unique(fl.array)) == set(range(14))
    res = CliRunner().invoke(main, ["data", "info", str(tmp_path / "ds")])
    assert res.exit_code == 0, res.output
    for text in ("subjects: 5", "96x80x128 voxels at 4 x 4 x 4 mm (5)", "1 spleen",
                 "test pairs: 2", "val pairs: 2", "train pairs: 0", "problems: none found"):
        assert text in res.output


def test_pddnet_split_with_several_training_subjects(tmp_path, rng):
    names = [f"Tiny_000{i}" for i in range(1, 6)]
    _make(tmp_path, rng, extra={"pddnet": {"split": {"train": names[:3], "val": names[3:],
                                                     "test": []}}})
    ds = Learn2RegDataset(tmp_path)
    assert len(ds.pairs("train")) == 6  # all ordered pairs among 3 subjects
    assert {p.fixed.name for p in ds.pairs("train")} == set(names[:3])


def test_missing_files_are_all_listed(tmp_path, rng):
    root, _, _ = _make(tmp_path, rng)
    (root / "imagesTr" / "Tiny_0002_0000.nii.gz").unlink()
    (root / "labelsTr" / "Tiny_0005_0000.nii.gz").unlink()
    ds = Learn2RegDataset(root)  # opening does not need the files
    with pytest.raises(PddnetError) as err:
        ds.check()
    msg = str(err.value)
    assert "2 problem(s)" in msg
    assert "missing file: imagesTr/Tiny_0002_0000.nii.gz" in msg
    assert "missing file: labelsTr/Tiny_0005_0000.nii.gz" in msg
    res = CliRunner().invoke(main, ["data", "info", str(root)])
    assert res.exit_code == 1
    assert "problems (2)" in res.output and "Tiny_0002_0000.nii.gz" in res.output


def test_geometry_mismatches_are_all_listed(tmp_path, rng):
    root, aff, _ = _make(tmp_path, rng)
    # label of 0001 with another shape; image of 0004 shifted by 3 mm; 0005 with 1 mm spacing
    save_nifti(root / "labelsTr" / "Tiny_0001_0000.nii.gz",
               rng.integers(0, 3, (9, 8, 6)).astype(np.uint8), aff)
    shifted = aff.copy()
    shifted[0, 3] += 3.0
    save_nifti(root / "imagesTr" / "Tiny_0004_0000.nii.gz",
               rng.normal(0, 1, SHAPE).astype(np.float32), shifted)
    fine = aff.copy()
    fine[0, 0] = 1.0
    save_nifti(root / "imagesTr" / "Tiny_0005_0000.nii.gz",
               rng.normal(0, 1, SHAPE).astype(np.float32), fine)
    with pytest.raises(PddnetError) as err:
        Learn2RegDataset(root).check()
    msg = str(err.value)
    assert "subject Tiny_0001 image vs label: shapes differ" in msg
    assert "affines differ" in msg and "Tiny_0004" in msg
    assert "spacings differ" in msg and "Tiny_0005" in msg
    assert "val pair Tiny_0003 <- Tiny_0004" in msg


def test_no_json_several_jsons_malformed_json(tmp_path, rng):
    with pytest.raises(PddnetError, match="no \\*_dataset.json"):
        Learn2RegDataset(tmp_path)
    with pytest.raises(PddnetError, match="no such folder"):
        Learn2RegDataset(tmp_path / "absent")
    root, _, _ = _make(tmp_path, rng)
    (root / "Other_dataset.json").write_text("{}")
    with pytest.raises(PddnetError, match="several dataset jsons.*Other_dataset.json"):
        Learn2RegDataset(root)
    assert find_dataset_json(root / "Tiny_dataset.json") == root / "Tiny_dataset.json"
    (root / "Other_dataset.json").unlink()
    (root / "Tiny_dataset.json").write_text('{"name": "Tiny", "training": [')
    with pytest.raises(PddnetError, match="not valid JSON.*line 1"):
        Learn2RegDataset(root)
    (root / "Tiny_dataset.json").write_text("[1, 2]")
    with pytest.raises(PddnetError, match="JSON object"):
        Learn2RegDataset(root)
    res = CliRunner().invoke(main, ["data", "info", str(root)])
    assert res.exit_code == 2 and "error:" in res.output


def test_missing_keys_and_bad_entries(tmp_path, rng):
    root, _, doc = _make(tmp_path, rng, test=None)
    ds = Learn2RegDataset(root)
    with pytest.raises(PddnetError, match="no 'registration_test'"):
        ds.pairs("test")
    assert "test pairs: none" in ds.describe()
    bad = dict(doc)
    del bad["training"]
    (root / "Tiny_dataset.json").write_text(json.dumps(bad))
    with pytest.raises(PddnetError, match="no 'training' key"):
        Learn2RegDataset(root)
    bad = dict(doc, training=[{"label": "./labelsTr/x.nii.gz"}])
    (root / "Tiny_dataset.json").write_text(json.dumps(bad))
    with pytest.raises(PddnetError, match="training entry 0 has no 'image'"):
        Learn2RegDataset(root)
    bad = dict(doc, registration_val=[{"fixed": "./imagesTr/Tiny_0001_0000.nii.gz"}])
    (root / "Tiny_dataset.json").write_text(json.dumps(bad))
    with pytest.raises(PddnetError, match="registration_val entry 0 needs 'fixed' and 'moving'"):
        Learn2RegDataset(root)


def test_pair_outside_training_list(tmp_path, rng):
    """Learn2Reg test images may be listed only in the pairs; labels are found if present."""
    root, aff, doc = _make(tmp_path, rng)
    save_nifti(root / "imagesTr" / "Tiny_0009_0000.nii.gz",
               rng.normal(0, 1, SHAPE).astype(np.float32), aff)
    doc["registration_test"] = [{"fixed": "./imagesTr/Tiny_0009_0000.nii.gz",
                                 "moving": "./imagesTr/Tiny_0001_0000.nii.gz"}]
    (root / "Tiny_dataset.json").write_text(json.dumps(doc))
    ds = Learn2RegDataset(root)
    (p,) = ds.pairs("test")
    assert p.fixed.name == "Tiny_0009" and p.fixed.label is None
    f, m, fl, ml = ds.load_pair(p)
    assert fl is None and ml is not None
    ds.check()


def test_subject_name():
    assert subject_name("./imagesTr/AbdomenCTCT_0001_0000.nii.gz") == "AbdomenCTCT_0001"
    assert subject_name("NLST_0001_0001.nii.gz") == "NLST_0001_0001"
    assert subject_name("/x/case.nii") == "case"


def test_images_ts_take_their_labels_from_labels_ts(tmp_path, rng):
    """Learn2Reg ships test scans in imagesTs/ with labels in labelsTs/: the reader finds them
    where the official evaluation looks (``images`` -> ``labels`` in the json's path), checks
    their geometry, and counts labelled pairs."""
    root, aff, doc = _make(tmp_path, rng, test=None)
    ts = []
    for n in ("Tiny_0006", "Tiny_0007"):
        save_nifti(tmp_path / "imagesTs" / f"{n}_0000.nii.gz",
                   rng.normal(0, 200, SHAPE).astype(np.float32), aff)
        ts.append(f"./imagesTs/{n}_0000.nii.gz")
    save_nifti(tmp_path / "labelsTs" / "Tiny_0006_0000.nii.gz",
               rng.integers(0, 4, SHAPE).astype(np.uint8), aff)
    doc["registration_test"] = [{"fixed": ts[0], "moving": ts[1]}]
    (root / "Tiny_dataset.json").write_text(json.dumps(doc))
    ds = Learn2RegDataset(root)
    (pair,) = ds.pairs("test")
    assert pair.fixed.label == tmp_path / "labelsTs" / "Tiny_0006_0000.nii.gz"
    assert pair.moving.label is None                 # no label map: registered, not scored
    info = ds.info()
    assert info["splits"]["test"] == {"pairs": 1, "pairs_with_labels": 0}
    assert info["problems"] == []
    # a labelsTs map on another grid is a problem
    save_nifti(tmp_path / "labelsTs" / "Tiny_0007_0000.nii.gz",
               rng.integers(0, 4, (5, 5, 5)).astype(np.uint8), aff)
    ds = Learn2RegDataset(root)
    assert ds.info()["splits"]["test"] == {"pairs": 1, "pairs_with_labels": 1}
    assert any("Tiny_0007 image vs label: shapes differ" in p for p in ds.problems())
    r = CliRunner().invoke(main, ["data", "info", "--json", str(root)])
    assert r.exit_code == 1 and json.loads(r.stdout)["problems"]
