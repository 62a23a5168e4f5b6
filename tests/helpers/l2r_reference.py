"""An independent implementation of the official Learn2Reg evaluation's definitions, for tests.

Written from ``MDL-UzL/L2R`` ``evaluation/evaluation.py`` and ``utils.py`` (read, not copied):
file look-up by name, fields read with nibabel's ``get_fdata``, label maps found by replacing
``images`` with ``labels`` in the json's paths, labels warped by nearest neighbour with zero
outside the grid, Dice per label (NaN where absent, ``nanmean`` per case), SDlogJ with the
``+3`` offset, ``num_foldings``, and the aggregates over cases. None of pddnet's code is used,
except HD95, which comes from :func:`pddnet.metrics.hd95_per_label` applied to the map warped
here (its surface definition is tested in tests/metrics/test_metrics.py).
"""

from __future__ import annotations

import math
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage


def ref_warp(moving: np.ndarray, disp: np.ndarray) -> np.ndarray:
    """Nearest neighbour, zero outside: the sample point c = x + u(x) counts only where
    0 <= c <= n - 1 on every axis (scipy's 'constant' mode); it is rounded half up."""
    c = np.indices(disp.shape[:3], dtype=np.float64) + np.moveaxis(disp.astype(np.float64), -1, 0)
    inside = np.ones(disp.shape[:3], bool)
    idx = []
    for a in range(3):
        inside &= (c[a] >= 0) & (c[a] <= moving.shape[a] - 1)
        idx.append(np.clip(np.floor(c[a] + 0.5).astype(np.int64), 0, moving.shape[a] - 1))
    return np.where(inside, moving[tuple(idx)], 0).astype(moving.dtype)


def official_warp_literal(moving: np.ndarray, disp: np.ndarray) -> np.ndarray:
    """The official line itself, on float64 maps as nibabel's get_fdata gives them."""
    D, H, W = disp.shape[:3]
    identity = np.meshgrid(np.arange(D), np.arange(H), np.arange(W), indexing="ij")
    return ndimage.map_coordinates(moving.astype(np.float64),
                                   identity + disp.astype(np.float64).transpose(3, 0, 1, 2),
                                   order=0)


def ref_dice(fixed, moving, warped, labels) -> list[float]:
    out = []
    for lab in labels:
        f, w = fixed == lab, warped == lab
        if not f.any() or not (moving == lab).any():
            out.append(math.nan)
        else:
            out.append(2.0 * np.logical_and(f, w).sum() / (f.sum() + w.sum()))
    return out


def ref_jacobian(disp) -> np.ndarray:
    u = disp.astype(np.float64)
    jac = np.empty(u.shape[:3] + (3, 3))
    for comp in range(3):
        grads = np.gradient(u[..., comp], axis=(0, 1, 2))  # central differences inside
        for axis in range(3):
            jac[..., comp, axis] = grads[axis] + (comp == axis)
    return np.linalg.det(jac[2:-2, 2:-2, 2:-2])


def ref_field_metrics(disp) -> dict:
    j = ref_jacobian(disp)
    shifted = np.clip(j + 3.0, 1e-9, 1e9)
    return {"sdlogj": float(np.log(shifted).std()),
            "num_foldings": float((shifted <= 0).sum()),
            "folding_voxels": int((j <= 0).sum()),
            "folding_percent": 100.0 * float((j <= 0).sum()) / j.size}


def disp_file(sub: Path, fixed: str, moving: str) -> Path:
    """The file the current evaluation reads: the long name, or the short one for a fixed
    0000 / moving 0001 pair; ``.npz`` is looked for before ``.nii.gz``."""
    fs, fm, ms, mm = fixed[-16:-12], fixed[-11:-7], moving[-16:-12], moving[-11:-7]
    names = [f"disp_{fs}_{ms}"] if (fm, mm) == ("0000", "0001") else []
    names.append(f"disp_{fs}_{fm}_{ms}_{mm}")
    for n in names:
        for ext in (".npz", ".nii.gz"):
            if (sub / (n + ext)).is_file():
                return sub / (n + ext)
    raise AssertionError(f"missing {names[-1]} in {sub}")


def score_submission(root: Path, pairs: list[dict], sub: Path, labels: list[int]) -> dict:
    """Per case ``{dice, hd95, sdlogj, num_foldings}`` and the aggregates, as evaluation.py."""
    from pddnet.metrics import hd95_per_label

    cases = []
    for p in pairs:
        disp = nib.load(str(disp_file(sub, p["fixed"], p["moving"]))).get_fdata()
        fixed = nib.load(str(root / p["fixed"].replace("images", "labels"))).get_fdata()
        moving = nib.load(str(root / p["moving"].replace("images", "labels"))).get_fdata()
        assert disp.shape == fixed.shape + (3,)
        warped = ref_warp(moving, disp)
        assert np.array_equal(warped, official_warp_literal(moving, disp))
        fm = ref_field_metrics(disp)
        hd = hd95_per_label(fixed.astype(np.int64), moving.astype(np.int64),
                            warped.astype(np.int64), labels=labels)
        cases.append({"dice": float(np.nanmean(ref_dice(fixed, moving, warped, labels))),
                      "hd95": float(np.nanmean([hd[lab] for lab in labels])),
                      "sdlogj": fm["sdlogj"], "num_foldings": fm["num_foldings"],
                      "folding_percent": fm["folding_percent"],
                      "outside": _outside_fraction(disp)})
    agg = {}
    for key, q in (("dice", 0.3), ("hd95", 0.3), ("sdlogj", 0.7)):
        v = np.array([c[key] for c in cases])
        agg[key] = {"mean": float(v.mean()), "std": float(v.std()), "30": float(np.quantile(v, q))}
    return {"cases": cases, "aggregates": agg}


def _outside_fraction(disp) -> float:
    c = np.indices(disp.shape[:3]) + np.moveaxis(disp, -1, 0)
    out = np.zeros(disp.shape[:3], bool)
    for a in range(3):
        out |= (c[a] < 0) | (c[a] > disp.shape[a] - 1)
    return float(out.mean())
