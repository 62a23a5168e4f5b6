"""The intensity contract (:class:`pddnet.spec.config.Intensity`, ``normalise_intensity``).

Checks: ``ct`` equals the direct formula (and the numerics before modes existed, bit for bit);
``mr`` equals an independent pure-Python implementation of its definition and is unchanged by
``a * v + b`` (``a > 0``) rescaling; metadata and configs without a mode read as ``ct``; every
mode round-trips through ``as_dict``/``from_dict`` and ``PDDConfig``; bad modes and parameters
are refused with messages that say what is expected.

Not tested here: the runtime and PyTorch paths (tests/runtime/test_intensity_paths.py), the
choice of z-score over a percentile window (measured: docs/benchmarks.md).
"""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest

from pddnet.errors import PddnetError
from pddnet.spec.config import Intensity, PDDConfig, normalise_intensity


def _rng() -> np.random.Generator:
    seed = int(np.random.SeedSequence().entropy % 2**32)
    print(f"seed {seed}")
    return np.random.default_rng(seed)


def _mr_like(rng, shape=(14, 12, 13)) -> np.ndarray:
    """Dark background with a few bright 'tissues' of random levels, plus noise (float64)."""
    img = rng.normal(0.02, 0.01, shape)
    body = np.zeros(shape, bool)
    body[2:-2, 2:-2, 2:-2] = True
    img[body] = rng.choice(rng.uniform(0.2, 1.0, 4), size=int(body.sum())) + \
        rng.normal(0, 0.03, int(body.sum()))
    return img


def test_ct_equals_the_direct_formula_and_the_old_numerics():
    rng = _rng()
    hu = rng.uniform(-1500, 3500, (9, 10, 11)).astype(np.float32)
    lower = float(rng.uniform(-1200, -200))
    upper = float(lower + rng.uniform(100, 3000))
    scale = float(rng.uniform(50, 1000))
    it = Intensity(lower=lower, upper=upper, scale=scale)
    got = normalise_intensity(hu, it)
    direct = np.minimum(np.maximum(hu.astype(np.float64), lower), upper) / scale
    assert got.dtype == np.float32 and got.shape == hu.shape
    np.testing.assert_allclose(got, direct, rtol=1e-6, atol=1e-7)
    # what pddnet computed before modes existed, bit for bit
    old = (np.clip(hu, lower, upper) / np.float32(scale)).astype(np.float32)
    np.testing.assert_array_equal(got, old)


def _mr_reference(img: np.ndarray, z_lower: float, z_upper: float) -> np.ndarray:
    """The definition, in pure Python: foreground = above the image mean; z-score over it."""
    flat = [float(v) for v in img.ravel()]
    mean = math.fsum(flat) / len(flat)
    fg = [v for v in flat if v > mean]
    mu, sd = statistics.fmean(fg), statistics.pstdev(fg)
    return np.array([min(max((v - mu) / sd, z_lower), z_upper) for v in flat]).reshape(img.shape)


def test_mr_matches_an_independent_implementation():
    rng = _rng()
    img = _mr_like(rng)
    free = _mr_reference(img, -math.inf, math.inf)
    z_lower = float(rng.uniform(0.3, 0.9) * free.min())  # inside the range: clips both ends
    z_upper = float(rng.uniform(0.3, 0.9) * free.max())
    got = normalise_intensity(img, Intensity(mode="mr", z_lower=z_lower, z_upper=z_upper))
    assert got.dtype == np.float32 and got.shape == img.shape
    np.testing.assert_allclose(got, _mr_reference(img, z_lower, z_upper), rtol=0, atol=2e-6)
    # the clip bounds are reached on both sides for this image, so they are really applied
    assert got.min() == np.float32(z_lower) and got.max() == np.float32(z_upper)


@pytest.mark.parametrize("dtype, atol", [(np.float64, 1e-6), (np.float32, 2e-3)])
def test_mr_is_invariant_to_positive_affine_rescaling(dtype, atol):
    rng = _rng()
    img = _mr_like(rng)
    it = Intensity(mode="mr")
    ref = normalise_intensity(img, it)
    for _ in range(4):
        a = 10 ** rng.uniform(-3, 4)
        b = a * rng.uniform(-0.5, 0.5) if dtype is np.float32 else rng.uniform(-1e4, 1e4)
        got = normalise_intensity((a * img + b).astype(dtype), it)
        np.testing.assert_allclose(got, ref, rtol=0, atol=atol, err_msg=f"a={a}, b={b}")
    # ct is not invariant (a control: the test above can fail)
    ct = Intensity()
    assert not np.allclose(normalise_intensity(img, ct), normalise_intensity(1000 * img, ct))
    # a negative scale inverts the contrast and is not an invariance
    assert not np.allclose(normalise_intensity(-img, it), ref, atol=0.1)


def test_mr_refuses_an_image_without_foreground_spread():
    for img in (np.full((6, 6, 6), 3.0), np.where(np.arange(216).reshape(6, 6, 6) % 2, 1.0, 0.0)):
        with pytest.raises(PddnetError, match="no foreground spread"):
            normalise_intensity(img, Intensity(mode="mr"))
    with pytest.raises(PddnetError, match="expected an Intensity"):
        normalise_intensity(np.zeros(3), {"mode": "ct"})


def test_old_dicts_without_a_mode_read_as_ct():
    d = {"lower": -900.0, "upper": 1200, "scale": 400}
    it = Intensity.from_dict(d)
    assert it == Intensity(lower=-900, upper=1200, scale=400, mode="ct")
    assert it.as_dict() == {"mode": "ct", "lower": -900.0, "upper": 1200.0, "scale": 400.0}
    cfg = PDDConfig.from_dict({"channels": 4, "intensity": d})
    assert cfg.intensity == it
    # a config dict of an older checkpoint (no intensity at all) gets the default, ct
    assert PDDConfig.from_dict({"channels": 4}).intensity.mode == "ct"


@pytest.mark.parametrize("it", [Intensity(), Intensity(lower=-500, upper=500, scale=250),
                                Intensity(mode="mr"), Intensity(mode="mr", z_lower=-3, z_upper=5)])
def test_round_trip(it):
    assert Intensity.from_dict(it.as_dict()) == it
    assert set(it.as_dict()) == {"mode", "lower", "upper", "scale"} if it.mode == "ct" else \
        {"mode", "z_lower", "z_upper"}
    cfg = PDDConfig(channels=4, intensity=it)
    back = PDDConfig.from_dict(__import__("json").loads(cfg.to_json()))
    assert back == cfg and back.intensity == it


@pytest.mark.parametrize("d, message", [
    ({"mode": "pet"}, "mode must be one of ['ct', 'mr']"),
    ({"mode": 1}, "mode must be one of"),
    ({"mode": "mr", "z_lower": -2}, "mode 'mr' needs z_lower, z_upper; missing z_upper"),
    ({"mode": "ct", "lower": 0, "upper": 1}, "mode 'ct' needs lower, upper, scale; missing scale"),
    ({"mode": "mr", "z_lower": -2, "z_upper": 3, "lower": 0}, "unknown keys ['lower'] for mode"),
    ({"mode": "ct", "lower": 0, "upper": 1, "scale": 1, "z_upper": 3}, "unknown keys ['z_upper']"),
    ({"mode": "mr", "z_lower": 3, "z_upper": 3}, "needs z_upper > z_lower"),
    ({"mode": "mr", "z_lower": float("nan"), "z_upper": 3}, "z_lower must be a finite number"),
    ({"mode": "mr", "z_lower": "-2", "z_upper": 3}, "z_lower must be a finite number"),
    ({"lower": 1, "upper": 0, "scale": 1}, "needs upper > lower"),
    ({"lower": 0, "upper": 1, "scale": 0}, "scale != 0"),
    ([1, 2], "expected an object {mode, ...}"),
])
def test_bad_values_are_refused(d, message):
    with pytest.raises(PddnetError, match="invalid intensity normalisation") as exc:
        Intensity.from_dict(d)
    assert message in str(exc.value)
    if isinstance(d, dict):  # and the same inside a config, named as such
        with pytest.raises(PddnetError, match="invalid PDDConfig"):
            PDDConfig.from_dict({"intensity": d})


def test_fields_of_the_other_mode_are_refused_by_the_constructor():
    with pytest.raises(PddnetError, match="lower belong to another mode than 'mr'"):
        Intensity(mode="mr", lower=0.0)
    with pytest.raises(PddnetError, match="z_upper belong to another mode than 'ct'"):
        Intensity(z_upper=5.0)
