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
plain Python floats including NaN/inf; :func:`pddnet._files.jsonable` turns non-finite values into
``None`` when (and only when) writing JSON.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from pddnet.errors import PddnetError

__all__ = [
    "warp_labels",
    "dice_per_label",
    "mean_dice",
    "dsc30",
    "hd95_per_label",
    "mean_hd95",
    "jacobian_determinant",
    "sdlogj",
    "folding_percent",
    "folding_counts",
    "aggregate",
    "pair_metrics",
    "latency_stats",
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
# the label warp of the official evaluation
# --------------------------------------------------------------------------------------------
_WARP_CHUNK = 16   # slabs along axis 0, to bound the float64 coordinate arrays


def warp_labels(moving_labels: np.ndarray, disp: np.ndarray,
                voxel_map: np.ndarray | None = None) -> np.ndarray:
    """Warp a label map for metrics exactly as the Learn2Reg evaluation does.

    ``evaluation.py`` of ``MDL-UzL/L2R`` computes
    ``map_coordinates(moving_seg, identity + disp.transpose(3, 0, 1, 2), order=0)``: nearest
    neighbour, scipy's default ``mode='constant', cval=0``. So ``warped(x)`` is
    ``moving[round(x + u(x))]`` where ``x + u(x)`` lies inside the grid along every axis
    (``0 <= c <= n - 1``; scipy rounds ``c`` to ``floor(c + 0.5)``) and **0 (background)
    wherever the sample point lies outside the grid**, even by a fraction of a voxel. This
    differs from a border-clamped warp (which repeats the edge label): a field that pulls
    from beyond the moving scan's edge loses those labels here, and so would in the
    leaderboard's numbers.

    ``disp`` is ``(i, j, k, 3)`` in voxels, channel ``a`` along array axis ``a``, on the fixed
    grid; coordinates are formed in float64 from it (the official code loads fields with
    ``get_fdata``), so a float32 field gives the same sample points as its NIfTI file there.
    ``voxel_map`` (4x4, optional): maps fixed-grid voxel coordinates to ``moving_labels``'
    voxel coordinates when the two grids differ (the official evaluation assumes they are the
    same; pddnet's runtime resamples). Returns an array of ``disp.shape[:3]`` with
    ``moving_labels``' dtype. Done in slabs of :data:`_WARP_CHUNK` along axis 0 (each point is
    independent, so the result equals the one-call result exactly).
    """
    from scipy.ndimage import map_coordinates

    func = "warp_labels"
    if not isinstance(moving_labels, np.ndarray) or moving_labels.ndim != 3:
        raise _fail(func, "moving_labels", "a 3-D label map (numpy array)",
                    f"{type(moving_labels).__name__} of shape "
                    f"{getattr(moving_labels, 'shape', None)}")
    if not (np.issubdtype(moving_labels.dtype, np.integer) or moving_labels.dtype == np.bool_):
        raise _fail(func, "moving_labels dtype", "an integer label map", str(moving_labels.dtype),
                    "Load label maps as integers (e.g. np.asarray(img.dataobj, np.int32)).")
    if not isinstance(disp, np.ndarray) or disp.ndim != 4 or disp.shape[-1] != 3:
        raise _fail(func, "disp shape", "(i, j, k, 3) in voxels, channel last",
                    str(getattr(disp, "shape", type(disp).__name__)))
    if not np.issubdtype(disp.dtype, np.floating) or not np.isfinite(disp).all():
        raise _fail(func, "disp values", "a finite floating-point field",
                    f"{disp.dtype} with {int(np.count_nonzero(~np.isfinite(disp)))} "
                    "non-finite entries" if np.issubdtype(disp.dtype, np.floating)
                    else str(disp.dtype))
    if voxel_map is None and moving_labels.shape != disp.shape[:3]:
        raise _fail(func, "moving_labels shape", f"{disp.shape[:3]} (the grid of disp)",
                    str(moving_labels.shape),
                    "Give voxel_map (fixed voxels -> moving voxels) for a moving map on "
                    "another grid.")
    src = moving_labels.view(np.uint8) if moving_labels.dtype == np.bool_ else moving_labels
    m = None if voxel_map is None else np.asarray(voxel_map, np.float64)
    if m is not None and m.shape != (4, 4):
        raise _fail(func, "voxel_map", "a 4x4 matrix", str(m.shape))
    n0, n1, n2 = disp.shape[:3]
    out = np.empty((n0, n1, n2), src.dtype)
    jj, kk = np.meshgrid(np.arange(n1, dtype=np.float64), np.arange(n2, dtype=np.float64),
                         indexing="ij")
    for i0 in range(0, n0, _WARP_CHUNK):
        i1 = min(i0 + _WARP_CHUNK, n0)
        u = disp[i0:i1].astype(np.float64)
        coords = np.empty((3,) + u.shape[:3], np.float64)
        coords[0] = np.arange(i0, i1, dtype=np.float64)[:, None, None] + u[..., 0]
        coords[1] = jj + u[..., 1]
        coords[2] = kk + u[..., 2]
        if m is not None:
            coords = np.einsum("ab,b...->a...", m[:3, :3], coords) + \
                m[:3, 3].reshape(3, 1, 1, 1)
        map_coordinates(src, coords, output=out[i0:i1], order=0, mode="constant", cval=0)
    return out.view(np.bool_) if moving_labels.dtype == np.bool_ else out


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
# HD95 (surface distances, surfel-area weighted)
# --------------------------------------------------------------------------------------------
# Surface elements ("surfels") live on the corner grid between voxels: the corner with index c
# (0..n along an axis of n voxels) touches voxels c-1 and c. Its 2x2x2 neighbourhood gives an
# 8-bit code; bit 4a+2b+c is set when the voxel at offset (a, b, c) in {0,1}^3 from the corner's
# lower voxel is inside. Corners whose code is neither 0 nor 255 are surface corners; each is
# weighted by the area of the marching-cubes surface (vertices at edge midpoints) inside its
# cube, as in DeepMind's surface-distance (whose table lists, per code, the area vectors of the
# triangles). We do not ship their table: it is rebuilt below from the geometry, by rules that
# reproduce its values for all 256 codes and any spacing (checked against the published
# table during development):
#   * a code and its complement share the same triangles (the classic 15-case marching cubes
#     symmetry); we build the one with fewer inside corners (for 4, the smaller code);
#   * inside corners are grouped into components connected by cube edges (diagonal corners of
#     an ambiguous face are kept apart); each component is enclosed by one polygon through the
#     midpoints of its crossing edges, ordered by walking across the cube's faces;
#   * each polygon is triangulated with its largest-area triangulation (for the non-planar
#     pentagons and hexagons this is the one folding along the polygon's crease); planar
#     polygons are unaffected.
# Spacing enters as in surface-distance: a triangle's area vector n scales to
# (n0 s1 s2, n1 s0 s2, n2 s0 s1).

_CORNERS = [(a, b, c) for a in (0, 1) for b in (0, 1) for c in (0, 1)]
_CUBE_EDGES = [(p, q) for p in _CORNERS for q in _CORNERS
               if p < q and sum(abs(x - y) for x, y in zip(p, q)) == 1]


def _corner_components(inside: list[tuple[int, int, int]]) -> list[set]:
    comps: list[set] = []
    todo = set(inside)
    while todo:
        comp = {todo.pop()}
        grow = list(comp)
        while grow:
            x = grow.pop()
            for p, q in _CUBE_EDGES:
                y = q if p == x else p if q == x else None
                if y is not None and y in todo:
                    todo.discard(y)
                    comp.add(y)
                    grow.append(y)
        comps.append(comp)
    return comps


def _component_polygon(comp: set) -> np.ndarray:
    """Edge-midpoint polygon around one component, vertices in cyclic order, shape (m, 3)."""
    crossing = [(p, q) for p, q in _CUBE_EDGES if (p in comp) != (q in comp)]
    nbrs: dict = {e: [] for e in crossing}
    for axis in range(3):
        for side in (0, 1):
            on_face = [e for e in crossing if e[0][axis] == side and e[1][axis] == side]
            if len(on_face) == 2:  # a component crosses a face in at most one segment
                nbrs[on_face[0]].append(on_face[1])
                nbrs[on_face[1]].append(on_face[0])
    ring = [crossing[0]]
    prev = None
    while True:
        nxt = [e for e in nbrs[ring[-1]] if e != prev][0]
        if nxt == ring[0]:
            break
        prev = ring[-1]
        ring.append(nxt)
    return np.array([[(p[i] + q[i]) / 2.0 for i in range(3)] for p, q in ring])


def _triangulations(idx: tuple[int, ...]):
    """All triangulations of the polygon with vertex indices idx (in order)."""
    if len(idx) < 3:
        yield []
        return
    first, last = idx[0], idx[-1]
    for k in range(1, len(idx) - 1):
        for left in _triangulations(idx[:k + 1]):
            for right in _triangulations(idx[k:]):
                yield left + right + [(first, idx[k], last)]


def _area_vectors(poly: np.ndarray, tris) -> np.ndarray:
    return np.array([np.cross(poly[j] - poly[i], poly[k] - poly[i]) / 2.0 for i, j, k in tris])


@functools.lru_cache(maxsize=1)
def _surfel_area_vectors() -> tuple[np.ndarray, ...]:
    """Per neighbour code (our bit order), the (t, 3) area vectors of its surface triangles."""
    def canonical(code: int) -> int:  # a code and its complement share their triangles
        n_in = bin(code).count("1")
        return 255 - code if n_in > 4 or (n_in == 4 and code > 255 - code) else code

    built: dict[int, np.ndarray] = {}
    for code in sorted({canonical(c) for c in range(256)}):
        inside = [cn for bit, cn in enumerate(_CORNERS) if code >> bit & 1]
        vecs = [np.zeros((0, 3))]
        for comp in _corner_components(inside):
            poly = _component_polygon(comp)
            best = max((_area_vectors(poly, t) for t in _triangulations(tuple(range(len(poly))))),
                       key=lambda v: float(np.linalg.norm(v, axis=1).sum()))
            vecs.append(best)
        built[code] = np.concatenate(vecs)
    return tuple(built[canonical(c)] for c in range(256))


@functools.lru_cache(maxsize=16)
def _surfel_area_table(spacing: tuple[float, float, float]) -> np.ndarray:
    """Surface area (in spacing units squared) of each of the 256 neighbour codes."""
    s0, s1, s2 = spacing
    scale = np.array([s1 * s2, s0 * s2, s0 * s1])
    return np.array([np.linalg.norm(v * scale, axis=1).sum() if len(v) else 0.0
                     for v in _surfel_area_vectors()])


def _neighbour_codes(mask: np.ndarray) -> np.ndarray:
    """8-bit neighbourhood code at every corner of the voxel grid, shape mask.shape + 1."""
    padded = np.zeros(tuple(n + 2 for n in mask.shape), np.uint8)
    padded[1:-1, 1:-1, 1:-1] = mask
    n0, n1, n2 = (n + 1 for n in mask.shape)
    code = np.zeros((n0, n1, n2), np.uint8)
    for bit, (a, b, c) in enumerate(_CORNERS):
        code |= padded[a:a + n0, b:b + n1, c:c + n2] << np.uint8(bit)
    return code


def _robust_hausdorff(dist: np.ndarray, area: np.ndarray, percent: float) -> float:
    """Area-weighted percentile as surface-distance's ``compute_robust_hausdorff``: sort by
    (distance, area), take the first surfel whose cumulative area fraction reaches percent."""
    if dist.size == 0:
        return math.inf
    order = np.lexsort((area, dist))
    d, a = dist[order], area[order]
    cum = np.cumsum(a) / np.sum(a)
    idx = int(np.searchsorted(cum, percent / 100.0))
    return float(d[min(idx, d.size - 1)])


def _surface_hd(gt: np.ndarray, pred: np.ndarray, spacing: tuple[float, float, float],
                percent: float) -> float:
    """Robust Hausdorff distance of two boolean masks already cropped to their joint box."""
    from scipy.ndimage import distance_transform_edt

    full = np.uint8(255)
    code_gt, code_pred = _neighbour_codes(gt), _neighbour_codes(pred)
    border_gt = (code_gt != 0) & (code_gt != full)
    border_pred = (code_pred != 0) & (code_pred != full)
    if not border_gt.any() or not border_pred.any():
        return math.inf  # one mask is empty: surface-distance reports infinite distances
    table = _surfel_area_table(spacing)
    dist_to_pred = distance_transform_edt(~border_pred, sampling=spacing)[border_gt]
    dist_to_gt = distance_transform_edt(~border_gt, sampling=spacing)[border_pred]
    return max(_robust_hausdorff(dist_to_pred, table[code_gt[border_gt]], percent),
               _robust_hausdorff(dist_to_gt, table[code_pred[border_pred]], percent))


def _bounding_boxes(arr: np.ndarray, labels: list[int]) -> dict[int, tuple[slice, ...] | None]:
    """Bounding box of every requested label (None where absent), in one pass if possible."""
    if labels and _use_bincount(arr) and min(labels) > 0:
        from scipy.ndimage import find_objects

        objs = find_objects(arr.view(np.uint8) if arr.dtype == np.bool_ else arr,
                            max_label=max(labels))
        return {l: objs[l - 1] for l in labels}
    out: dict[int, tuple[slice, ...] | None] = {}
    for l in labels:
        idx = np.nonzero(arr == l)
        out[l] = tuple(slice(int(i.min()), int(i.max()) + 1) for i in idx) if idx[0].size \
            else None
    return out


def _check_spacing(func: str, spacing: Any) -> tuple[float, float, float]:
    try:
        sp = tuple(float(v) for v in spacing)
    except (TypeError, ValueError):
        raise _fail(func, "spacing", "three positive voxel sizes (i, j, k)", repr(spacing))
    if len(sp) != 3 or not all(math.isfinite(v) and v > 0 for v in sp):
        raise _fail(func, "spacing", "three positive finite voxel sizes (i, j, k)", repr(spacing))
    return sp  # type: ignore[return-value]


def _hd95_impl(func: str, fixed_labels: Any, moving_labels: Any, warped_labels: Any,
               labels: Any, spacing: Any) -> dict[int, float]:
    fixed, moving, warped = _check_label_maps(func, fixed_labels=fixed_labels,
                                              moving_labels=moving_labels,
                                              warped_labels=warped_labels)
    labs = _check_labels(func, labels, (fixed, moving))
    sp = _check_spacing(func, spacing)
    if not labs:
        return {}
    n_fix = _counts(fixed, labs)
    n_mov = _counts(moving, labs)
    box_f = _bounding_boxes(fixed, labs)
    box_w = _bounding_boxes(warped, labs)
    out: dict[int, float] = {}
    for l, nf, nm in zip(labs, n_fix, n_mov):
        if nf == 0 or nm == 0:
            out[l] = math.nan
            continue
        bf, bw = box_f[l], box_w[l]
        if bw is None:
            out[l] = math.inf  # the warp lost the label: no predicted surface at all
            continue
        # joint box of both masks: every surface point and every nearest partner lies in it,
        # so distance transforms on the crop are exact (no extra margin is needed)
        box = tuple(slice(min(a.start, b.start), max(a.stop, b.stop)) for a, b in zip(bf, bw))
        out[l] = _surface_hd(fixed[box] == l, warped[box] == l, sp, 95.0)
    return out


def hd95_per_label(fixed_labels: np.ndarray, moving_labels: np.ndarray,
                   warped_labels: np.ndarray, labels: Iterable[int] | None = None,
                   spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> dict[int, float]:
    """Robust (95th percentile) Hausdorff distance between fixed and warped label surfaces.

    Follows Learn2Reg ``compute_hd95`` (``MDL-UzL/L2R`` ``evaluation/utils.py``): NaN for a
    label absent from ``fixed_labels`` or the original ``moving_labels``; otherwise
    ``compute_robust_hausdorff(compute_surface_distances(fixed == l, warped == l, spacing), 95)``
    of DeepMind's ``surface-distance`` (``surface_distance/metrics.py``), re-implemented:

    * surface points are the corners of the voxel grid whose 2x2x2 neighbourhood is mixed;
      each carries the marching-cubes area of its neighbourhood (see the table notes above);
    * distances are Euclidean distance transforms (``scipy.ndimage.distance_transform_edt``
      with ``sampling=spacing``) from each surface to the other's surface points;
    * for each direction, surfels are sorted by distance and the distance at which the
      cumulative surfel area first reaches 95 % is taken; the result is the larger of the two
      directions (so it is symmetric in fixed and warped).

    Learn2Reg calls it with ``spacing = np.ones(3)``, i.e. in voxels; pass ``spacing`` (the
    fixed image's voxel size, array-axis order) for millimetres. ``inf`` when the warped map
    lost the label entirely (as the official code does). The work is cropped to each label's
    joint bounding box in fixed and warped, which leaves the distances exact.
    """
    return _hd95_impl("hd95_per_label", fixed_labels, moving_labels, warped_labels, labels,
                      spacing)


def mean_hd95(fixed_labels: np.ndarray, moving_labels: np.ndarray, warped_labels: np.ndarray,
              labels: Iterable[int] | None = None,
              spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> float:
    """Mean of :func:`hd95_per_label` over labels, NaN skipped (``np.nanmean``, as Learn2Reg);
    ``inf`` if any label was lost by the warp; NaN when no label is present in both maps."""
    return _nanmean(_hd95_impl("mean_hd95", fixed_labels, moving_labels, warped_labels, labels,
                               spacing).values())


# --------------------------------------------------------------------------------------------
# Jacobian determinant, SDlogJ, folding
# --------------------------------------------------------------------------------------------
_JAC_CROP = 2      # Learn2Reg crops 2 voxels at every border (jacobian[..., 2:-2, 2:-2, 2:-2])
_JAC_CHUNK = 16    # output slabs along axis 0, to bound float64 temporaries


def _jacobian_impl(func: str, disp: Any) -> np.ndarray:
    d = _check_disp(func, disp)
    n0, n1, n2 = d.shape[:3]
    c = _JAC_CROP
    out = np.empty((n0 - 2 * c, n1 - 2 * c, n2 - 2 * c), np.float64)
    ys, zs = slice(c, n1 - c), slice(c, n2 - c)
    for i0 in range(c, n0 - c, _JAC_CHUNK):
        i1 = min(i0 + _JAC_CHUNK, n0 - c)
        u = d[i0 - 1:i1 + 1].astype(np.float64)          # slab plus one row each side
        core = slice(1, 1 + i1 - i0)
        # J[comp][axis] = d(x_comp + u_comp)/dx_axis, central differences (-1/2, 0, +1/2)
        grads = (
            0.5 * (u[2:, ys, zs] - u[:-2, ys, zs]),                    # along i
            0.5 * (u[core, c + 1:n1 - c + 1, zs] - u[core, c - 1:n1 - c - 1, zs]),   # along j
            0.5 * (u[core, ys, c + 1:n2 - c + 1] - u[core, ys, c - 1:n2 - c - 1]),   # along k
        )
        J = [[grads[a][..., comp] + (1.0 if a == comp else 0.0) for a in range(3)]
             for comp in range(3)]
        out[i0 - c:i1 - c] = (
            J[0][0] * (J[1][1] * J[2][2] - J[1][2] * J[2][1])
            - J[0][1] * (J[1][0] * J[2][2] - J[1][2] * J[2][0])
            + J[0][2] * (J[1][0] * J[2][1] - J[1][1] * J[2][0])
        )
    return out


def jacobian_determinant(disp: np.ndarray) -> np.ndarray:
    """Jacobian determinant of the transform ``x -> x + u(x)``, Learn2Reg style.

    Follows ``jacobian_determinant`` of ``MDL-UzL/L2R`` ``evaluation/utils.py`` (which takes
    the channel-first ``(1, 3, i, j, k)`` transpose of the same ``(i, j, k, 3)`` field):
    ``du_c/dx_a`` by the central difference ``(u[x+1] - u[x-1]) / 2`` along array axis ``a``
    (their ``[-0.5, 0, 0.5]`` correlation), plus the identity, determinant of the 3x3 matrix,
    and the result cropped by 2 voxels at every border, so the output has shape
    ``(i-4, j-4, k-4)`` and their zero padding never enters. Computed in float64 (they load
    fields with nibabel's ``get_fdata``) in slabs, fully vectorised. ``disp`` is in voxels,
    channel ``a`` along array axis ``a`` (``docs/conventions.md``).
    """
    return _jacobian_impl("jacobian_determinant", disp)


def sdlogj(disp: np.ndarray) -> float:
    """SDlogJ exactly as the Learn2Reg evaluation computes it (``evaluation.py``, metric
    ``sdlogj``): ``std(log(clip(J + 3, 1e-9, 1e9)))`` over the cropped
    :func:`jacobian_determinant` ``J``, population standard deviation (numpy ``.std()``).

    Note the ``+ 3`` offset, which the official code applies before the clip and the log
    (so it is *not* the textbook ``std(log J)``: it damps the spread and never hits the clip
    for ``J > -3``); we reproduce it so that our numbers compare with the leaderboard. For an
    affine field ``J`` is constant and SDlogJ is 0.
    """
    jac = _jacobian_impl("sdlogj", disp)
    return float(np.log(np.clip(jac + 3.0, 1e-9, 1e9)).std())


def folding_percent(disp: np.ndarray) -> float:
    """Percentage of voxels of the cropped :func:`jacobian_determinant` that are ``<= 0``.

    The raw determinant is counted, **without** the official ``+ 3`` offset: this is the
    folding measure people mean (a voxel where the transform turns space inside out). The
    official count is in :func:`folding_counts`.
    """
    jac = _jacobian_impl("folding_percent", disp)
    return float(100.0 * np.count_nonzero(jac <= 0) / jac.size)


def _folding(jac: np.ndarray) -> dict[str, float | int]:
    official = np.clip(jac + 3.0, 1e-9, 1e9)
    raw = int(np.count_nonzero(jac <= 0))
    return {
        "num_foldings": float(np.count_nonzero(official <= 0)),
        "folding_voxels": raw,
        "folding_percent": float(100.0 * raw / jac.size),
    }


def folding_counts(disp: np.ndarray) -> dict[str, float | int]:
    """Folding as the official evaluation reports it, and as it is meant.

    * ``num_foldings``: the official ``num_foldings`` of ``evaluation.py``, reproduced
      exactly: ``(clip(J + 3, 1e-9, 1e9) <= 0).sum()`` as a float. Because the count is taken
      *after* the ``+ 3`` offset and the clip to ``>= 1e-9``, it is 0 for every field (a
      leaderboard 0 says nothing about folding); we report it so that numbers compare.
    * ``folding_voxels`` and ``folding_percent``: the voxels of the cropped Jacobian
      determinant with ``J <= 0`` (no offset), as a count and as a percentage.
    """
    return _folding(_jacobian_impl("folding_counts", disp))


#: the official aggregate ``'30'`` takes this quantile over cases: 0.3 for Dice and HD95,
#: 0.7 for SDlogJ and TRE (``evaluation.py``)
AGGREGATE_QUANTILE = {"dice": 0.3, "hd95": 0.3, "sdlogj": 0.7, "tre": 0.7}


def aggregate(per_case: Iterable[float], metric: str) -> dict[str, float]:
    """The official aggregate of one metric over cases (``aggregated_results`` of
    ``evaluation.py``): ``mean`` and ``std`` (population) of the per-case values, *not*
    NaN-skipping (one NaN case makes them NaN, one ``inf`` HD95 makes the mean ``inf``), and
    ``"30"``: ``np.quantile`` at 0.3 for ``dice`` and ``hd95`` (DSC30 is the ``"30"`` of
    ``dice``) and at 0.7 for ``sdlogj`` and ``tre``."""
    func = "aggregate"
    if metric not in AGGREGATE_QUANTILE:
        raise _fail(func, "metric", f"one of {', '.join(AGGREGATE_QUANTILE)}", repr(metric))
    try:
        arr = np.asarray(list(per_case), np.float64)
    except (TypeError, ValueError):
        raise _fail(func, "per_case", "a sequence of floats", type(per_case).__name__)
    if arr.ndim != 1 or arr.size == 0:
        raise _fail(func, "per_case", "a non-empty 1-D sequence of per-case values",
                    f"shape {arr.shape}")
    with np.errstate(invalid="ignore"):
        return {"mean": float(arr.mean()), "std": float(arr.std()),
                "30": float(np.quantile(arr, AGGREGATE_QUANTILE[metric]))}


# --------------------------------------------------------------------------------------------
# bundle
# --------------------------------------------------------------------------------------------
def pair_metrics(fixed_labels: np.ndarray, moving_labels: np.ndarray, warped_labels: np.ndarray,
                 disp: np.ndarray, labels: Iterable[int] | None = None,
                 spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> dict[str, Any]:
    """All Learn2Reg metrics of one registered pair.

    ``warped_labels`` must come from :func:`warp_labels` for the numbers to be the official
    ones. Returns ``{"labels": [...], "dice_mean", "dice_per_label": {label: dice},
    "hd95_mean", "hd95_per_label": {label: hd95}, "sdlogj", "num_foldings",
    "folding_voxels", "folding_percent"}`` (:func:`folding_counts`) with plain
    Python ints/floats. NaN (absent labels) and ``inf`` (lost labels) are kept; ``json.dumps``
    accepts the dict as is (int keys become strings, NaN/inf become ``NaN``/``Infinity``),
    and ``json.dumps(jsonable(result))`` gives strict JSON with ``null`` for them. ``disp``
    must be on the fixed grid: ``disp.shape[:3] == fixed_labels.shape``. ``spacing`` only
    affects HD95 (voxels by default, as in Learn2Reg).
    """
    func = "pair_metrics"
    fixed, moving, warped = _check_label_maps(func, fixed_labels=fixed_labels,
                                              moving_labels=moving_labels,
                                              warped_labels=warped_labels)
    d = _check_disp(func, disp)
    if d.shape[:3] != fixed.shape:
        raise _fail(func, "disp shape", f"{fixed.shape + (3,)} (the fixed grid plus 3 channels)",
                    str(d.shape))
    labs = _check_labels(func, labels, (fixed, moving))
    dice = _dice_impl(func, fixed, moving, warped, labs)
    hd = _hd95_impl(func, fixed, moving, warped, labs, spacing)
    jac = _jacobian_impl(func, d)
    return {
        "labels": labs,
        "dice_mean": _nanmean(dice.values()),
        "dice_per_label": dice,
        "hd95_mean": _nanmean(hd.values()),
        "hd95_per_label": hd,
        "sdlogj": float(np.log(np.clip(jac + 3.0, 1e-9, 1e9)).std()),
        **_folding(jac),
    }


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
