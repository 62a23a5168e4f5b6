"""The intensity contract in the runtime: pre-processing applies the model's normalisation
(``ct`` or ``mr``) exactly as training does, reads metadata without a mode as ``ct``, and warns
when a ``ct`` model is given an image that is not in Hounsfield units.

Not tested here: the formulas themselves (tests/spec/test_intensity.py), a trained ``mr``
model's accuracy (docs/benchmarks.md).
"""

from __future__ import annotations

import numpy as np
import pytest

from helpers.fake_models import ct_like, grid_affine, make_model, save_model
from pddnet.data.io import Volume
from pddnet.data.synth import synthesize_subject
from pddnet.graph.model import load_model
from pddnet.runtime.preprocess import not_hu_reason, prepare_fixed, prepare_moving
from pddnet.spec.config import Intensity

SHAPE = (24, 21, 30)
AFF4 = grid_affine(4.0)
MR = {"mode": "mr", "z_lower": -2.0, "z_upper": 3.0}


def _rng() -> np.random.Generator:
    seed = int(np.random.SeedSequence().entropy % 2**32)
    print(f"seed {seed}")
    return np.random.default_rng(seed)


@pytest.fixture(scope="module")
def infos(tmp_path_factory):
    d = tmp_path_factory.mktemp("intensity")
    return {
        "old": load_model(save_model(make_model(SHAPE), d / "old.onnx")).info,
        "mr": load_model(save_model(make_model(SHAPE, extra_input_meta={"intensity": MR}),
                                    d / "mr.onnx")).info,
    }


def _mr_image(rng) -> np.ndarray:
    """MR-like: positive arbitrary units, smooth structure, a random scale."""
    x = np.abs(ct_like(rng, SHAPE) + 1000.0) * np.float32(10 ** rng.uniform(-3, 1))
    return x.astype(np.float32)


def test_metadata_without_a_mode_is_ct_and_mr_round_trips(infos):
    assert infos["old"].normalisation == Intensity()
    assert infos["old"].intensity["mode"] == "ct"
    assert infos["mr"].normalisation == Intensity(mode="mr")
    assert infos["mr"].as_dict()["intensity"] == MR


@pytest.mark.parametrize("kind", ["old", "mr"])
def test_runtime_and_pytorch_paths_give_identical_arrays(infos, kind):
    network = pytest.importorskip("pddnet.model.network")
    rng = _rng()
    info = infos[kind]
    img = ct_like(rng, SHAPE) if kind == "old" else _mr_image(rng)
    fixed = prepare_fixed(Volume(img, AFF4), info)
    moving = prepare_moving(Volume(img[::-1].copy(), AFF4), fixed, info)
    # the scan is on the model grid already, so the resampling is the identity
    np.testing.assert_array_equal(fixed.array[0, 0],
                                  network.normalise_intensity(img, info.normalisation))
    np.testing.assert_array_equal(moving.array[0, 0],
                                  network.normalise_intensity(img[::-1], info.normalisation))
    assert fixed.array.dtype == np.float32 and fixed.array.shape == (1, 1, *SHAPE)
    assert any(n.startswith(f"intensity: {info.normalisation.mode},") for n in fixed.notes)


def test_mr_model_is_unchanged_by_rescaling_in_the_runtime(infos):
    rng = _rng()
    img = _mr_image(rng)
    a, b = 10 ** rng.uniform(-2, 3), rng.uniform(0, 50)
    x1 = prepare_fixed(Volume(img, AFF4), infos["mr"]).array
    x2 = prepare_fixed(Volume((img.astype(np.float64) * a + b * a).astype(np.float32), AFF4),
                       infos["mr"]).array
    np.testing.assert_allclose(x1, x2, atol=2e-3)


@pytest.mark.parametrize("scale", [1.0, 60.0, 4000.0])
def test_ct_model_warns_about_images_that_are_not_hu(infos, scale):
    rng = _rng()
    img = (_mr_image(rng) / np.float32(_mr_image(rng).max()) * np.float32(scale))
    notes = prepare_fixed(Volume(img, AFF4), infos["old"]).notes
    warn = [n for n in notes if "does not look like CT in Hounsfield units" in n]
    assert len(warn) == 1 and "--intensity mr" in warn[0] and warn[0].startswith("fixed:")
    # an mr model is not warned, and CT in HU is not warned either
    assert not any("Hounsfield" in n for n in prepare_fixed(Volume(img, AFF4),
                                                            infos["mr"]).notes)
    hu = prepare_fixed(Volume(ct_like(rng, SHAPE), AFF4), infos["old"]).notes
    assert not any("does not look like CT" in n for n in hu)


def test_not_hu_reason_on_synthetic_ct_and_mr():
    seed = int(_rng().integers(0, 1000))
    ct, lab, _ = synthesize_subject("small", seed, 0)
    mr, lab_mr, _ = synthesize_subject("small", seed, 0, contrast="mr")
    assert not_hu_reason(ct) == ""
    assert not_hu_reason(mr) != ""
    assert not_hu_reason(np.linspace(0, 1, 1000)).startswith("its values span only")
