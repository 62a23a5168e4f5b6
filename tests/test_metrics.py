"""Tests for pddnet.validation.metrics (Learn2Reg metric definitions).

What is tested: hand-computed Dice of boxes, identical/disjoint maps, absent labels -> NaN and
skipped; DSC30 against np.percentile; latency statistics; input validation raising PddnetError.

Not tested here: bit-for-bit agreement with the official Learn2Reg evaluation run on real
challenge data (neither the official code nor the data are dependencies of this project);
spacing-dependent behaviour is only checked on simple shapes.
"""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest

from pddnet.errors import PddnetError
from pddnet.validation import metrics as M


@pytest.fixture
def rng():
    return np.random.default_rng()


def _box(shape, lo, hi, value=1, dtype=np.uint8):
    a = np.zeros(shape, dtype)
    a[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = value
    return a


def _random_labels(rng, shape=(20, 18, 22), n_labels=5):
    return rng.integers(0, n_labels + 1, size=shape).astype(np.uint8)


# ------------------------------------------------------------------------------------- Dice
def test_dice_two_known_boxes(rng):
    shape = (30, 28, 26)
    # random box sizes and a random offset along axis 0; overlap counted by hand
    s = rng.integers(6, 12, size=3)
    lo = rng.integers(2, 6, size=3)
    off = int(rng.integers(1, s[0]))
    fixed = _box(shape, lo, lo + s, 3)
    lo2 = lo.copy()
    lo2[0] += off
    warped = _box(shape, lo2, lo2 + s, 3)
    moving = fixed.copy()
    vol = int(np.prod(s))
    inter = (s[0] - off) * s[1] * s[2]
    expected = 2 * inter / (2 * vol)
    d = M.dice_per_label(fixed, moving, warped)
    assert list(d) == [3]
    assert d[3] == pytest.approx(expected, rel=1e-12)
    assert M.mean_dice(fixed, moving, warped) == pytest.approx(expected, rel=1e-12)


def test_dice_against_bruteforce(rng):
    fixed = _random_labels(rng)
    moving = _random_labels(rng)
    warped = _random_labels(rng)
    d = M.dice_per_label(fixed, moving, warped)
    for l, v in d.items():
        f, w = fixed == l, warped == l
        assert v == pytest.approx(2 * (f & w).sum() / (f.sum() + w.sum()), rel=1e-12)
    assert M.mean_dice(fixed, moving, warped) == pytest.approx(np.mean(list(d.values())))


def test_dice_identical_is_one_and_disjoint_is_zero(rng):
    fixed = _random_labels(rng)
    d = M.dice_per_label(fixed, fixed, fixed.copy())
    assert d and all(v == 1.0 for v in d.values())
    assert M.mean_dice(fixed, fixed, fixed) == 1.0
    # disjoint: warped puts every label where the fixed has another one
    n = int(fixed.max())
    warped = np.where(fixed > 0, fixed % n + 1, 0).astype(np.uint8)
    d = M.dice_per_label(fixed, fixed, warped)
    assert all(v == 0.0 for v in d.values())
    # a label lost by the warp scores 0, not NaN
    d = M.dice_per_label(fixed, fixed, np.zeros_like(fixed))
    assert all(v == 0.0 for v in d.values())


def test_dice_absent_label_is_nan_and_skipped(rng):
    shape = (16, 16, 16)
    fixed = _box(shape, (2, 2, 2), (8, 8, 8), 1)
    fixed[10:14, 10:14, 10:14] = 2
    moving = fixed.copy()
    moving[moving == 2] = 0          # label 2 absent from the moving map -> NaN
    moving[1:3, 1:3, 1:3] = 5        # label 5 absent from the fixed map -> NaN
    warped = fixed.copy()
    warped[2:4] = 0                  # some loss on label 1
    d = M.dice_per_label(fixed, moving, warped)
    assert sorted(d) == [1, 2, 5]
    assert math.isnan(d[2]) and math.isnan(d[5])
    f1, w1 = fixed == 1, warped == 1
    exp1 = 2 * (f1 & w1).sum() / (f1.sum() + w1.sum())
    assert d[1] == pytest.approx(exp1)
    assert M.mean_dice(fixed, moving, warped) == pytest.approx(exp1)
    # explicit labels: a label in neither map is NaN too; all-NaN mean is NaN (no warning)
    d = M.dice_per_label(fixed, moving, warped, labels=[7, 1])
    assert list(d) == [1, 7] and math.isnan(d[7])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert math.isnan(M.mean_dice(fixed, moving, warped, labels=[2, 9]))


def test_dice_large_and_negative_labels_fall_back(rng):
    fixed = rng.choice(np.array([0, 2035, -4, 1_500_000], np.int64), size=(10, 11, 12))
    warped = fixed.copy()
    warped[:3] = 0
    d = M.dice_per_label(fixed, fixed, warped)
    assert sorted(d) == [-4, 2035, 1_500_000]
    for l, v in d.items():
        f, w = fixed == l, warped == l
        assert v == pytest.approx(2 * (f & w).sum() / (f.sum() + w.sum()))


# ------------------------------------------------------------------------------------- DSC30
def test_dsc30_matches_percentile(rng):
    vals = rng.uniform(0.2, 0.9, size=int(rng.integers(5, 40)))
    assert M.dsc30(vals) == pytest.approx(np.percentile(vals, 30))
    assert M.dsc30(list(vals)) == pytest.approx(np.quantile(vals, 0.3))
    with pytest.raises(PddnetError, match="dsc30"):
        M.dsc30([])


# ------------------------------------------------------------------------------------- latency
def test_latency_stats(rng):
    s = rng.uniform(0.01, 0.05, size=50)
    st = M.latency_stats(s, warmup=5)
    used = s[5:] * 1000
    assert st["n"] == 45 and st["warmup"] == 5
    for k, q in (("p50_ms", 50), ("p95_ms", 95), ("p99_ms", 99)):
        assert st[k] == pytest.approx(np.percentile(used, q))
    assert st["mean_ms"] == pytest.approx(used.mean())
    assert st["min_ms"] == pytest.approx(used.min()) and st["max_ms"] == pytest.approx(used.max())
    json.dumps(st)
    with pytest.raises(PddnetError, match="latency_stats"):
        M.latency_stats(s[:3], warmup=3)
    with pytest.raises(PddnetError, match="latency_stats"):
        M.latency_stats([0.1, float("nan")])
    with pytest.raises(PddnetError, match="latency_stats"):
        M.latency_stats(s, warmup=-1)


# ------------------------------------------------------------------------------------- inputs
def test_label_inputs_validated(rng):
    a = _random_labels(rng)
    with pytest.raises(PddnetError, match=r"dice_per_label.*shape"):
        M.dice_per_label(a, a, a[:-1])
    with pytest.raises(PddnetError, match=r"dice_per_label.*dtype.*float"):
        M.dice_per_label(a, a, a.astype(np.float32))
    with pytest.raises(PddnetError, match=r"mean_dice.*3-D"):
        M.mean_dice(a[0], a[0], a[0])
    with pytest.raises(PddnetError, match=r"numpy array"):
        M.dice_per_label(a.tolist(), a, a)
    with pytest.raises(PddnetError, match=r"labels"):
        M.dice_per_label(a, a, a, labels=[1.5, 2.0])
