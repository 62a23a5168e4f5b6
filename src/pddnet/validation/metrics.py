"""Registration metrics as the official Learn2Reg evaluation defines them (numpy + scipy only).

Every definition here was written from the public Learn2Reg evaluation code
(``MDL-UzL/L2R``: ``evaluation/evaluation.py`` and ``evaluation/utils.py``) and from the
DeepMind ``surface-distance`` package that it calls (``surface_distance/metrics.py``),
re-implemented independently; each function's docstring says which definition it follows
and where we deliberately do something else.

Conventions (``docs/conventions.md``): label maps are integer ``(i, j, k)`` arrays with
0 = background; displacement fields are ``(i, j, k, 3)`` in voxels, channel ``a`` is the
displacement along array axis ``a`` (the Learn2Reg ``disp_*.nii.gz`` layout; their Jacobian
code takes the channel-first transpose ``(1, 3, i, j, k)`` of the same field, which we handle
internally).

NaN and infinity: a label absent from the fixed or the original moving map gives NaN for that
label (skipped by the means, as ``np.nanmean`` does in the official code); HD95 is ``inf``
when the warped map lost a label completely (as in the official code). Metric dicts hold
plain Python floats including NaN/inf; :func:`jsonable` turns non-finite values into
``None`` when (and only when) writing JSON.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from pddnet.errors import PddnetError

__all__ = [
    "dice_per_label",
    "mean_dice",
    "dsc30",
    "latency_stats",
    "jsonable",
]


# --------------------------------------------------------------------------------------------
# input validation
# --------------------------------------------------------------------------------------------
def _fail(func: str, what: str, expected: str, received: str, hint: str = "") -> PddnetError:
    msg = f"{func}: {what}: expected {expected}, received {received}."
    if hint:
        msg += f" {hint}"
    return PddnetError(msg)


def _check_label_maps(func: str, **maps: Any) -> list[np.ndarray]:
    """Each map must be a 3-D integer (or bool) numpy array; all shapes equal."""
    out = []
    shape = None
    first = None
    for name, arr in maps.items():
        if not isinstance(arr, np.ndarray):
            raise _fail(func, f"{name}", "a numpy array", type(arr).__name__)
        if arr.ndim != 3:
            raise _fail(func, f"{name} dimensions", "a 3-D label map (i, j, k)",
                        f"shape {arr.shape}")
        if not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_):
            raise _fail(func, f"{name} dtype", "an integer label map", str(arr.dtype),
                        "Load label maps as integers (e.g. np.asarray(img.dataobj, np.int32)).")
        if shape is None:
            shape, first = arr.shape, name
        elif arr.shape != shape:
            raise _fail(func, f"{name} shape", f"{shape} (the shape of {first})", str(arr.shape),
                        "All label maps must be on the fixed image's grid.")
        out.append(arr)
    return out


def _check_labels(func: str, labels: Any, default_maps: Sequence[np.ndarray]) -> list[int]:
    """Explicit labels -> sorted unique ints; None -> non-zero labels of the given maps."""
    if labels is None:
        found: set[int] = set()
        for m in default_maps:
            found.update(int(v) for v in _present_labels(m))
        found.discard(0)
        return sorted(found)
    try:
        arr = np.asarray(list(labels) if not isinstance(labels, np.ndarray) else labels)
    except TypeError:
        raise _fail(func, "labels", "an iterable of integers or None", type(labels).__name__)
    if arr.ndim != 1 or (arr.size and not (np.issubdtype(arr.dtype, np.integer)
                                           or arr.dtype == np.bool_)):
        raise _fail(func, "labels", "a 1-D sequence of integers or None",
                    f"{arr.dtype} array of shape {arr.shape}")
    return sorted({int(v) for v in arr})


def _check_disp(func: str, disp: Any, name: str = "disp") -> np.ndarray:
    if not isinstance(disp, np.ndarray):
        raise _fail(func, name, "a numpy array", type(disp).__name__)
    if disp.ndim != 4 or disp.shape[-1] != 3:
        raise _fail(func, f"{name} shape", "(i, j, k, 3) in voxels, channel last",
                    str(disp.shape),
                    "A channel-first (3, i, j, k) field must be moved with np.moveaxis(d, 0, -1).")
    if not np.issubdtype(disp.dtype, np.floating):
        raise _fail(func, f"{name} dtype", "a floating-point field", str(disp.dtype))
    if min(disp.shape[:3]) < 5:
        raise _fail(func, f"{name} shape", "at least 5 voxels along each spatial axis "
                    "(the Learn2Reg Jacobian crops 2 voxels at every border)", str(disp.shape))
    if not np.isfinite(disp).all():
        raise _fail(func, f"{name} values", "finite numbers",
                    f"{int(np.count_nonzero(~np.isfinite(disp)))} NaN/inf entries")
    return disp


# --------------------------------------------------------------------------------------------
# label counting helpers
# --------------------------------------------------------------------------------------------
_BINCOUNT_MAX = 1 << 20  # labels up to ~1M use np.bincount; anything else falls back to unique


def _use_bincount(*arrs: np.ndarray) -> bool:
    for a in arrs:
        if a.size and (int(a.min()) < 0 or int(a.max()) >= _BINCOUNT_MAX):
            return False
    return True


def _present_labels(arr: np.ndarray) -> np.ndarray:
    if arr.dtype == np.bool_:
        arr = arr.view(np.uint8)
    if _use_bincount(arr):
        return np.flatnonzero(np.bincount(arr.ravel()))
    return np.unique(arr)


def _counts(arr: np.ndarray, labels: list[int]) -> np.ndarray:
    """Number of voxels of each label in ``labels`` (int64 array aligned with labels)."""
    if arr.dtype == np.bool_:
        arr = arr.view(np.uint8)
    if not labels:
        return np.zeros(0, np.int64)
    if _use_bincount(arr):
        bc = np.bincount(arr.ravel())
        return np.array([bc[l] if 0 <= l < bc.size else 0 for l in labels], np.int64)
    vals, cnt = np.unique(arr, return_counts=True)
    lut = dict(zip(vals.tolist(), cnt.tolist()))
    return np.array([lut.get(l, 0) for l in labels], np.int64)


# --------------------------------------------------------------------------------------------
# Dice
# --------------------------------------------------------------------------------------------
def dice_per_label(fixed_labels: np.ndarray, moving_labels: np.ndarray,
                   warped_labels: np.ndarray, labels: Iterable[int] | None = None
                   ) -> dict[int, float]:
    """Dice overlap of the fixed and the warped moving label map, per label.

    Follows Learn2Reg ``compute_dice`` (``MDL-UzL/L2R`` ``evaluation/utils.py``): for each
    label ``l``, NaN if ``l`` is absent from ``fixed_labels`` or from the *original*
    ``moving_labels``; otherwise ``2 |F_l ∩ W_l| / (|F_l| + |W_l|)`` (the
    ``compute_dice_coefficient`` of ``surface-distance``) with ``F_l = fixed == l`` and
    ``W_l = warped == l``. A label the warp lost completely scores 0, not NaN.

    ``labels`` defaults to every non-zero label present in ``fixed_labels`` or
    ``moving_labels`` (the official code takes the list from the task's config instead;
    pass it explicitly to match a task exactly). Returns ``{label: dice}`` sorted by label,
    plain Python ints and floats.
    """
    return _dice_impl("dice_per_label", fixed_labels, moving_labels, warped_labels, labels)


def _dice_impl(func: str, fixed_labels: Any, moving_labels: Any, warped_labels: Any,
               labels: Any) -> dict[int, float]:
    fixed, moving, warped = _check_label_maps(func, fixed_labels=fixed_labels,
                                              moving_labels=moving_labels,
                                              warped_labels=warped_labels)
    labs = _check_labels(func, labels, (fixed, moving))
    if not labs:
        return {}
    n_fix = _counts(fixed, labs)
    n_mov = _counts(moving, labs)
    n_war = _counts(warped, labs)
    # |F_l ∩ W_l| for every l at once: the voxels where both maps agree, counted by label
    agree = fixed[fixed == warped]
    n_int = _counts(agree, labs)
    out: dict[int, float] = {}
    for l, f, m, w, i in zip(labs, n_fix, n_mov, n_war, n_int):
        if f == 0 or m == 0:
            out[l] = math.nan
        else:
            out[l] = float(2.0 * i / (f + w))
    return out


def _nanmean(values: Iterable[float]) -> float:
    """``np.nanmean`` without the all-NaN RuntimeWarning (returns NaN then)."""
    arr = np.asarray(list(values), np.float64)
    arr = arr[~np.isnan(arr)]
    return float(arr.mean()) if arr.size else math.nan


def mean_dice(fixed_labels: np.ndarray, moving_labels: np.ndarray,
              warped_labels: np.ndarray, labels: Iterable[int] | None = None) -> float:
    """Mean of :func:`dice_per_label` over labels, NaN labels skipped (``np.nanmean``, as in
    Learn2Reg ``compute_dice``). NaN when no label is present in both fixed and moving."""
    return _nanmean(_dice_impl("mean_dice", fixed_labels, moving_labels, warped_labels,
                               labels).values())


def dsc30(per_case_mean_dice: Iterable[float]) -> float:
    """DSC30: the 30th percentile over cases of the per-case mean Dice.

    Learn2Reg aggregates every metric over cases as ``np.quantile(values, .3)`` (``'30'`` in
    ``evaluation.py``'s aggregates; numpy's default linear interpolation). As in the official
    code a NaN case is not skipped: it makes the result NaN. Raises on an empty input.
    """
    func = "dsc30"
    try:
        arr = np.asarray(list(per_case_mean_dice), np.float64)
    except (TypeError, ValueError):
        raise _fail(func, "per_case_mean_dice", "a sequence of floats",
                    type(per_case_mean_dice).__name__)
    if arr.ndim != 1 or arr.size == 0:
        raise _fail(func, "per_case_mean_dice", "a non-empty 1-D sequence of per-case means",
                    f"shape {arr.shape}")
    return float(np.percentile(arr, 30.0))


# --------------------------------------------------------------------------------------------
# latency
# --------------------------------------------------------------------------------------------
def latency_stats(samples_seconds: Iterable[float], warmup: int = 0) -> dict[str, float | int]:
    """Latency summary for benchmark reports.

    Drops the first ``warmup`` samples, then returns ``p50``, ``p95``, ``p99`` (``np.percentile``,
    linear interpolation), ``mean``, ``min``, ``max`` in milliseconds, plus ``n`` (samples used)
    and ``warmup``. Input is in seconds.
    """
    func = "latency_stats"
    if isinstance(warmup, bool) or not isinstance(warmup, (int, np.integer)) or warmup < 0:
        raise _fail(func, "warmup", "a non-negative integer", repr(warmup))
    try:
        arr = np.asarray(list(samples_seconds), np.float64)
    except (TypeError, ValueError):
        raise _fail(func, "samples_seconds", "a sequence of durations in seconds",
                    type(samples_seconds).__name__)
    if arr.ndim != 1:
        raise _fail(func, "samples_seconds", "a 1-D sequence", f"shape {arr.shape}")
    if not np.isfinite(arr).all() or (arr < 0).any():
        raise _fail(func, "samples_seconds", "finite non-negative durations",
                    f"min {np.nanmin(arr) if arr.size else 'n/a'}, "
                    f"{int(np.count_nonzero(~np.isfinite(arr)))} non-finite")
    used = arr[int(warmup):] * 1000.0
    if used.size == 0:
        raise _fail(func, "samples_seconds", f"more than warmup={int(warmup)} samples",
                    f"{arr.size} samples", "Record more iterations or lower warmup.")
    p50, p95, p99 = np.percentile(used, [50.0, 95.0, 99.0])
    return {
        "n": int(used.size),
        "warmup": int(warmup),
        "p50_ms": float(p50),
        "p95_ms": float(p95),
        "p99_ms": float(p99),
        "mean_ms": float(used.mean()),
        "min_ms": float(used.min()),
        "max_ms": float(used.max()),
    }


# --------------------------------------------------------------------------------------------
# serialisation
# --------------------------------------------------------------------------------------------
def jsonable(obj: Any) -> Any:
    """Deep-copy ``obj`` into strict-JSON-safe types: NaN/inf -> ``None``, numpy scalars and
    arrays -> Python numbers and lists, dict keys -> ``str``. Use when writing a report;
    metric functions themselves keep NaN/inf so that means and checks stay honest."""
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        v = float(obj)
        return v if math.isfinite(v) else None
    return obj
