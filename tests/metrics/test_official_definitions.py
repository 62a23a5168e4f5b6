"""pddnet.metrics against an independent implementation of the official Learn2Reg definitions.

The official evaluation (``MDL-UzL/L2R`` ``evaluation/evaluation.py`` and ``utils.py``) warps
the moving label map with ``map_coordinates(moving, identity + disp, order=0)`` (nearest,
scipy's default ``mode='constant', cval=0``: zero outside the grid), scores Dice per label with
NaN for labels absent from fixed or moving, SDlogJ as ``std(log(clip(J + 3, 1e-9, 1e9)))`` on
the Jacobian cropped by 2 voxels, ``num_foldings`` as the count of ``clip(J + 3, ...) <= 0``,
and aggregates cases by ``mean``, ``std`` and ``np.quantile`` at 0.3 (Dice, HD95) or 0.7
(SDlogJ). The reference (tests/helpers/l2r_reference.py) is written from those definitions without
pddnet's code: the
warp as an explicit rule (inside ``0 <= c <= n - 1`` on every axis, index ``floor(c + 0.5)``),
checked once against the literal official call, Dice by boolean masks, the Jacobian by
``np.gradient`` and ``np.linalg.det``.

Fields are fresh random draws each run (the seed is printed) that reach outside the grid by
several voxels, plus points exactly on the grid's edge, just outside it and on rounding ties.

Not tested here: HD95 against an independent surface-distance implementation (its surfel table
is tested in tests/metrics/test_metrics.py; here HD95 is only checked to be computed on the
official warp), TRE (landmark tasks), masked evaluation (LungCT).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from helpers.l2r_reference import official_warp_literal, ref_dice, ref_field_metrics, ref_warp
from pddnet import metrics as M
from pddnet.errors import PddnetError


@pytest.fixture
def rng():
    seed = int(np.random.SeedSequence().entropy % (2**32))
    print(f"random seed {seed}")
    return np.random.default_rng(seed)


def smooth_labels(rng, shape, n_labels):
    f = ndimage.gaussian_filter(rng.normal(size=shape), 2.0)
    return np.digitize(f, np.quantile(f, np.linspace(0.35, 0.95, n_labels))).astype(np.uint8)


def reaching_field(rng, shape, amp=4.0, shift=None):
    """A smooth random field plus a constant shift: many sample points land outside."""
    u = np.stack([ndimage.gaussian_filter(rng.normal(size=shape), 2.5) for _ in range(3)], -1)
    u *= amp / (np.abs(u).max() + 1e-12)
    shift = rng.uniform(-3.0, 3.0, 3) if shift is None else np.asarray(shift)
    return (u + shift).astype(np.float32)


# ----------------------------------------------------------------------------------- tests
def test_warp_matches_reference_with_points_outside(rng):
    shape = tuple(int(n) for n in rng.integers(14, 22, 3))
    moving = smooth_labels(rng, shape, 5)
    for _ in range(3):
        disp = reaching_field(rng, shape)
        ours = M.warp_labels(moving, disp)
        ref = ref_warp(moving, disp)
        assert ours.dtype == moving.dtype and ours.shape == shape
        np.testing.assert_array_equal(ours, ref)
        np.testing.assert_array_equal(ours, official_warp_literal(moving, disp))
        # points outside do happen, and there the label is background
        c = np.indices(shape) + np.moveaxis(disp.astype(np.float64), -1, 0)
        outside = np.zeros(shape, bool)
        for a in range(3):
            outside |= (c[a] < 0) | (c[a] > shape[a] - 1)
        assert outside.sum() > 0.05 * outside.size
        assert not ours[outside].any()


def test_warp_edges_and_ties(rng):
    """Exactly on the last voxel is inside; a hair beyond either edge is outside; a .5 tie
    rounds up (floor(c + 0.5))."""
    shape = (6, 5, 7)
    moving = rng.integers(1, 200, shape).astype(np.int32)
    disp = np.zeros(shape + (3,), np.float64)
    disp[0, 0, 0] = (-1e-9, 0, 0)                 # just below 0 -> outside
    disp[5, 0, 0] = (0.0, 0, 0)                   # on the last index -> inside
    disp[4, 1, 1] = (1.0 + 1e-9, 0, 0)            # just beyond n - 1 -> outside
    disp[1, 1, 1] = (0.5, 0, 0)                   # tie: 1.5 -> index 2
    disp[2, 2, 2] = (0.0, -0.5, 0.0)              # tie: 1.5 -> index 2
    disp[3, 3, 3] = (0.0, 0.0, 3.0)               # 6.0 on axis 2 (n = 7): inside
    ours = M.warp_labels(moving, disp)
    np.testing.assert_array_equal(ours, ref_warp(moving, disp))
    np.testing.assert_array_equal(ours, official_warp_literal(moving, disp))
    assert ours[0, 0, 0] == 0 and ours[4, 1, 1] == 0
    assert ours[5, 0, 0] == moving[5, 0, 0]
    assert ours[1, 1, 1] == moving[2, 1, 1] and ours[2, 2, 2] == moving[2, 2, 2]
    assert ours[3, 3, 3] == moving[3, 3, 6]


def test_zero_outside_changes_dice_by_the_expected_amount():
    """A label slab touching the grid's edge, pulled 3 voxels inward: the official warp leaves
    background where the sample falls outside, so Dice is 2*2/(5+5) = 0.4 where a
    border-clamped warp (repeating the edge) would give 2*5/(5+8)."""
    shape = (20, 6, 7)
    slab = np.zeros(shape, np.uint8)
    slab[:5] = 1
    disp = np.zeros(shape + (3,), np.float32)
    disp[..., 0] = -3.0
    warped = M.warp_labels(slab, disp)
    assert warped[:3].max() == 0 and warped[3:8].min() == 1 and warped[8:].max() == 0
    assert M.mean_dice(slab, slab, warped) == pytest.approx(0.4, abs=1e-15)


def test_pair_metrics_equal_the_reference(rng):
    shape = tuple(int(n) for n in rng.integers(16, 24, 3))
    labels = list(range(1, 8))                    # label 7 is absent: NaN, skipped
    for _ in range(3):
        fixed = smooth_labels(rng, shape, 5)
        moving = smooth_labels(rng, shape, 6)
        moving[moving == 6] = 0
        disp = reaching_field(rng, shape, amp=float(rng.uniform(2, 7)))
        warped = M.warp_labels(moving, disp)
        pm = M.pair_metrics(fixed, moving, warped, disp, labels=labels)
        ref = ref_dice(fixed, moving, ref_warp(moving, disp), labels)
        assert [pm["dice_per_label"][lab] for lab in labels] == pytest.approx(ref, nan_ok=True,
                                                                             abs=1e-15)
        assert pm["dice_mean"] == pytest.approx(float(np.nanmean(ref)), abs=1e-15)
        rf = ref_field_metrics(disp)
        assert pm["sdlogj"] == pytest.approx(rf["sdlogj"], rel=1e-12)
        assert pm["num_foldings"] == rf["num_foldings"] == 0.0
        assert pm["folding_voxels"] == rf["folding_voxels"]
        assert pm["folding_percent"] == pytest.approx(rf["folding_percent"], rel=1e-12)
        assert M.folding_counts(disp) == {k: pm[k] for k in
                                          ("num_foldings", "folding_voxels", "folding_percent")}
        # HD95 is computed on the official warp (its surface definition: test_metrics.py)
        assert pm["hd95_per_label"] == M.hd95_per_label(fixed, moving, ref_warp(moving, disp),
                                                        labels=labels)


def test_folding_fields_count_raw_determinants(rng):
    """A field that folds: the official count stays 0 (offset and clip come first), the raw
    count and percentage see the folds."""
    shape = (18, 16, 20)
    disp = reaching_field(rng, shape, amp=25.0, shift=(0, 0, 0)).astype(np.float64)
    rf = ref_field_metrics(disp)
    got = M.folding_counts(disp)
    assert rf["folding_voxels"] > 0
    assert got == {"num_foldings": 0.0, "folding_voxels": rf["folding_voxels"],
                   "folding_percent": pytest.approx(rf["folding_percent"], rel=1e-12)}


def test_aggregates_follow_the_official_quantiles(rng):
    vals = rng.uniform(0, 1, int(rng.integers(3, 30)))
    for metric, q in (("dice", 0.3), ("hd95", 0.3), ("sdlogj", 0.7), ("tre", 0.7)):
        agg = M.aggregate(vals, metric)
        assert agg == {"mean": pytest.approx(float(np.mean(vals)), rel=1e-14),
                       "std": pytest.approx(float(np.std(vals)), rel=1e-12),
                       "30": pytest.approx(float(np.quantile(vals, q)), rel=1e-14)}
    assert M.aggregate(vals, "dice")["30"] == pytest.approx(M.dsc30(vals), rel=1e-14)
    with_nan = M.aggregate([0.5, math.nan], "dice")
    assert math.isnan(with_nan["mean"]) and math.isnan(with_nan["30"])   # not skipped
    with pytest.raises(PddnetError, match=r"aggregate.*metric"):
        M.aggregate(vals, "jaccard")
    with pytest.raises(PddnetError, match=r"aggregate.*non-empty"):
        M.aggregate([], "dice")


def test_warp_labels_validates_inputs(rng):
    lab = rng.integers(0, 3, (6, 6, 6)).astype(np.uint8)
    disp = np.zeros((6, 6, 6, 3), np.float32)
    with pytest.raises(PddnetError, match=r"warp_labels.*integer"):
        M.warp_labels(lab.astype(np.float32), disp)
    with pytest.raises(PddnetError, match=r"warp_labels.*disp shape"):
        M.warp_labels(lab, disp[..., :2])
    bad = disp.copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(PddnetError, match=r"warp_labels.*finite"):
        M.warp_labels(lab, bad)
    with pytest.raises(PddnetError, match=r"warp_labels.*voxel_map"):
        M.warp_labels(lab[:5], disp)
    # another grid through a voxel map: the identity map is the plain warp
    np.testing.assert_array_equal(M.warp_labels(lab, disp + 1.5, voxel_map=np.eye(4)),
                                  M.warp_labels(lab, disp + 1.5))
