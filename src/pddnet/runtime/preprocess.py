"""Pre-processing: NIfTI volumes in any orientation and spacing -> the model's input arrays.

For the fixed scan (:func:`prepare_fixed`):

1. validate it (3D, finite, non-empty, plausible spacing, not constant);
2. reorient it to the closest canonical orientation (RAS+, :func:`pddnet.data.io.to_canonical`);
3. define the *model grid*: ``image_shape`` voxels covering the fixed scan's field of view
   (voxel faces aligned, ``align_corners=False``), in the canonical axes; its spacing must be
   within ``spacing_tolerance`` (relative, per axis) of the spacing the model was trained at;
4. resample the scan onto it (trilinear) and normalise its intensities on the model grid with
   the model's contract (:func:`pddnet.spec.config.normalise_intensity`, the function training
   used: ``ct`` ``clip(HU, lower, upper) / scale``, or ``mr`` a z-score within the foreground).
   A ``ct`` model given an image that is clearly not in HU gets a warning note (and the hint to
   use an ``mr`` model).

For a moving scan (:func:`prepare_moving`): validate, reorient, and resample it onto the same
model grid -- when it shares the fixed scan's grid with exactly the same map as the fixed scan,
otherwise in world coordinates through the affines (one interpolation from the moving scan's
own voxels; outside its field of view the border values are used).

Label maps are validated against their image (same shape and affine) and the model's label
count; they are not resampled here (post-processing warps them on the fixed grid).

Every step appends a human-readable line to ``notes``, and so do findings that are resolved
rather than refused: an oblique scan (voxel axes more than ``OBLIQUE_TOLERANCE_DEG`` off the
world axes) and a header whose sform and qform disagree (found by
:func:`pddnet.data.io.load_nifti`, kept in ``Volume.notes``). Inputs are paths or
:class:`pddnet.data.io.Volume` objects; paths are read with a voxel budget (``max_voxels``,
default :data:`pddnet.data.io.DEFAULT_MAX_VOXELS`); output arrays are ``(1, 1, I, J, K)``
float32.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import nibabel as nib
import numpy as np

from pddnet.data import io as dio
from pddnet.data.io import DEFAULT_MAX_VOXELS, Volume, load_nifti, to_canonical
from pddnet.errors import PddnetError
from pddnet.graph.model import ModelInfo
from pddnet.runtime.resample import resample, resize_map
from pddnet.spec.config import normalise_intensity

DEFAULT_SPACING_TOLERANCE = 0.30
AFFINE_ATOL_MM = 1e-3
#: A scan is *oblique* when one of its voxel axes is more than this many degrees off the nearest
#: world (RAS) axis; a note then says so and what pddnet did with it.
OBLIQUE_TOLERANCE_DEG = 0.01

VolumeLike = Volume | str | os.PathLike


@dataclass
class PreparedFixed:
    """The fixed scan, ready for the model, and what is needed to map results back.

    Attributes:
        volume: the scan as given (original orientation), validated, float32 HU.
        canonical_affine, canonical_shape: the RAS+ reoriented grid.
        grid_affine: voxel -> world affine of the model grid ``info.image_shape``.
        array: ``(1, 1, I, J, K)`` float32 normalised intensities on the model grid.
        labels: validated fixed label map on ``volume``'s grid (uint8), if given.
    """

    volume: Volume
    canonical_affine: np.ndarray
    canonical_shape: tuple[int, int, int]
    grid_shape: tuple[int, int, int]
    grid_affine: np.ndarray
    array: np.ndarray
    labels: Volume | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def grid_spacing(self) -> tuple[float, float, float]:
        return _spacing(self.grid_affine)

    def original_to_canonical(self) -> np.ndarray:
        """4x4 voxel map from the original fixed grid to the canonical one (a signed
        permutation plus a shift: reorientation only transposes and flips)."""
        m = np.linalg.inv(self.canonical_affine) @ self.volume.affine
        r = np.round(m)
        if not np.allclose(m, r, atol=1e-4):
            raise PddnetError("internal error: reorientation is not a signed permutation")
        return r


@dataclass
class PreparedMoving:
    """A moving scan on the model grid: ``array`` ``(1, 1, I, J, K)`` float32 normalised;
    ``volume``/``labels`` as given (validated), for warping on the fixed grid later."""

    volume: Volume
    array: np.ndarray
    labels: Volume | None = None
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
def as_volume(x: VolumeLike, *, kind: str, role: str,
              max_voxels: int | None = DEFAULT_MAX_VOXELS) -> Volume:
    """Load a path or validate an in-memory :class:`Volume` (``kind`` "image" or "label").

    Validation is :mod:`pddnet.data.io`'s (3D, non-empty, spacing in (0, 20] mm, finite image,
    invertible affine, integer labels in [0, 255]; for paths also the gzip integrity and the
    ``max_voxels`` budget); messages are prefixed with ``role`` for in-memory volumes.
    """
    if isinstance(x, Volume):
        try:
            return dio._validated_volume(x.array, x.affine, x.path, kind, notes=x.notes)
        except PddnetError as exc:
            raise PddnetError(f"{role}: {exc}") from None
    if isinstance(x, (str, os.PathLike)):
        return load_nifti(x, kind=kind, max_voxels=max_voxels)
    raise PddnetError(f"{role}: expected a NIfTI path or a pddnet.data.io.Volume, received "
                      f"{type(x).__name__}")


def prepare_fixed(fixed: VolumeLike, info: ModelInfo, *, labels: VolumeLike | None = None,
                  spacing_tolerance: float = DEFAULT_SPACING_TOLERANCE,
                  max_voxels: int | None = DEFAULT_MAX_VOXELS) -> PreparedFixed:
    """Validate, reorient and resample the fixed scan onto the model grid (module docstring).

    ``max_voxels`` is the budget for reading paths (:func:`pddnet.data.io.load_nifti`)."""
    if not spacing_tolerance > 0:
        raise PddnetError(f"spacing_tolerance must be > 0, got {spacing_tolerance!r}")
    vol = as_volume(fixed, kind="image", role="fixed scan", max_voxels=max_voxels)
    notes: list[str] = [f"fixed: {n}" for n in vol.notes]
    _check_content(vol, "fixed", info, notes)
    canon = _reorient(vol, "fixed", notes)
    angle = _obliquity_deg(vol.affine)
    if angle > OBLIQUE_TOLERANCE_DEG:
        notes.append(
            f"fixed: oblique scan (voxel axes up to {_fmt_deg(angle)} deg off the nearest RAS "
            "axes); the model grid follows the scan's own voxel axes (reordered to the closest "
            "RAS axes, not rotated), so the scan is not resampled to world axes")
    grid_shape = tuple(int(n) for n in info.image_shape)
    vmap = resize_map(canon.shape, grid_shape)
    grid_affine = canon.affine @ vmap
    if info.spacing_mm is None:
        notes.append("model: warning: its metadata records no training spacing; the input "
                     "spacing was not checked")
    else:
        _check_spacing(_spacing(grid_affine), info, canon, spacing_tolerance)
    arr = _to_grid(canon.array, grid_shape, vmap)
    notes.append(f"fixed: {_resample_note(canon, grid_shape, grid_affine)}")
    lab = check_labels(labels, vol, info, role="fixed labels", notes=notes,
                       max_voxels=max_voxels)
    notes.append(_intensity_note(info))
    return PreparedFixed(vol, canon.affine, canon.shape, grid_shape, grid_affine,
                         _normalise(arr, info), lab, notes)


def prepare_moving(moving: VolumeLike, fixed: PreparedFixed, info: ModelInfo, *,
                   labels: VolumeLike | None = None,
                   max_voxels: int | None = DEFAULT_MAX_VOXELS) -> PreparedMoving:
    """Validate, reorient and resample a moving scan onto ``fixed``'s model grid.

    ``max_voxels`` is the budget for reading paths (:func:`pddnet.data.io.load_nifti`)."""
    vol = as_volume(moving, kind="image", role="moving scan", max_voxels=max_voxels)
    notes: list[str] = [f"moving: {n}" for n in vol.notes]
    _check_content(vol, "moving", info, notes)
    angle = _obliquity_deg(vol.affine)
    oblique = (f"moving: oblique scan (voxel axes up to {_fmt_deg(angle)} deg off the nearest RAS "
               "axes); " if angle > OBLIQUE_TOLERANCE_DEG else "")
    canon = _reorient(vol, "moving", notes)
    same = canon.shape == fixed.canonical_shape and np.allclose(
        canon.affine, fixed.canonical_affine, atol=AFFINE_ATOL_MM)
    if same:
        vmap = resize_map(canon.shape, fixed.grid_shape)
        notes.append(f"moving: same grid as the fixed scan; "
                     f"{_resample_note(canon, fixed.grid_shape, fixed.grid_affine)}")
        if oblique:
            notes.append(oblique + "on the fixed scan's grid, so resampled like it, along its "
                         "own voxel axes")
    else:
        vmap = np.linalg.inv(canon.affine) @ fixed.grid_affine
        inside = _overlap(vmap, fixed.grid_shape, canon.shape)
        if inside == 0.0:
            raise PddnetError(
                f"moving scan{_of(vol)}: it does not overlap the fixed scan in world coordinates "
                "(no voxel of the fixed field of view falls inside it); check both affines "
                "(sform/qform) -- are they in the same scanner space?")
        mine, theirs = _grid_pair(canon.shape, canon.affine, fixed.canonical_shape,
                                  fixed.canonical_affine)
        notes.append(
            f"moving: grid differs from the fixed scan ({mine} vs {theirs}); resampled in world "
            f"coordinates onto the fixed scan's field of view, {_fmt_shape(fixed.grid_shape)} @ "
            f"{_fmt_mm(fixed.grid_spacing)} (trilinear; border values outside the moving scan)")
        if oblique:
            notes.append(oblique + "resampled to the model grid with its full affine (rotation "
                         "included)")
        if inside < 0.5:
            notes.append(f"moving: warning: only {100 * inside:.0f}% of the fixed field of view "
                         "lies inside the moving scan")
    arr = _to_grid(canon.array, fixed.grid_shape, vmap)
    lab = check_labels(labels, vol, info, role="moving labels", notes=notes,
                       max_voxels=max_voxels)
    return PreparedMoving(vol, _normalise(arr, info), lab, notes)


def check_labels(labels: VolumeLike | None, image: Volume, info: ModelInfo, *, role: str,
                 notes: list[str] | None = None,
                 max_voxels: int | None = DEFAULT_MAX_VOXELS) -> Volume | None:
    """Validate a label map against its image and the model (``None`` passes through)."""
    if labels is None:
        return None
    lab = as_volume(labels, kind="label", role=role, max_voxels=max_voxels)
    if lab.shape != image.shape or not np.allclose(lab.affine, image.affine,
                                                   atol=AFFINE_ATOL_MM):
        img_grid, lab_grid = _grid_pair(image.shape, image.affine, lab.shape, lab.affine)
        gap = ""
        if lab.shape == image.shape:
            far = dio._corner_gap(lab.affine, image.affine, lab.shape)
            gap = f"; the same voxel lies up to {far:.3g} mm apart in the two"
        raise PddnetError(
            f"{role}{_of(lab)}: its grid differs from its image's (image: {img_grid}; labels: "
            f"{lab_grid}{gap}); a label map must have the shape and affine of the scan it labels "
            "-- pass the label map made on this scan, or resample it onto the scan's grid")
    if notes is not None:
        notes.extend(f"{role}: {n}" for n in lab.notes)
    top = int(lab.array.max())
    if info.num_labels is not None and top > info.num_labels:
        present = np.unique(lab.array)
        raise PddnetError(
            f"{role}{_of(lab)}: holds label values up to {top} "
            f"({', '.join(str(int(v)) for v in present[present > info.num_labels][:8])} "
            f"unexpected), but the model knows labels 0..{info.num_labels}; pass the label map "
            "that matches this model's label set")
    if top == 0 and notes is not None:
        notes.append(f"{role}: warning: the label map is empty (background only)")
    return lab


# --------------------------------------------------------------------------------------------
def _spacing(affine: np.ndarray) -> tuple[float, float, float]:
    s = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
    return (float(s[0]), float(s[1]), float(s[2]))


def _of(vol: Volume) -> str:
    return f" {vol.path}" if vol.path else ""


def _fmt_shape(shape) -> str:
    return "x".join(str(int(n)) for n in shape)


def _fmt_mm(spacing) -> str:
    s = [float(v) for v in spacing]
    if max(s) - min(s) <= 1e-6 * max(s):
        return f"{s[0]:.3g} mm"
    return "x".join(f"{v:.3g}" for v in s) + " mm"


def _grid_str(shape, affine) -> str:
    return f"{_fmt_shape(shape)} @ {_fmt_mm(_spacing(affine))}"


def _codes(affine: np.ndarray) -> str:
    return "".join(c or "?" for c in nib.aff2axcodes(affine))


def _grid_detail(shape, affine, digits: int) -> str:
    """``96x80x128 at 4 mm, RAS, origin (-190.0, -160.0, -250.0)`` with ``digits`` decimals
    for the origin (and more significant digits for the spacing as ``digits`` grows)."""
    sp = _spacing(affine)
    sig = 3 + max(digits - 1, 0)
    if max(sp) - min(sp) <= 1e-6 * max(sp):
        mm = f"{sp[0]:.{sig}g} mm"
    else:
        mm = "x".join(f"{v:.{sig}g}" for v in sp) + " mm"
    origin = ", ".join(f"{float(v):.{digits}f}" for v in np.asarray(affine)[:3, 3])
    angle = _obliquity_deg(affine)
    tilt = f" (axes {_fmt_deg(angle)} deg off)" if angle > OBLIQUE_TOLERANCE_DEG else ""
    return f"{_fmt_shape(shape)} at {mm}, {_codes(affine)}{tilt}, origin ({origin})"


def _grid_pair(shape_a, affine_a, shape_b, affine_b) -> tuple[str, str]:
    """Descriptions of two grids, with enough digits that they differ where the grids do
    (shape, spacing, orientation codes, obliquity, origin); grids that still read alike differ
    by less than that shows (callers add the distance between them)."""
    for digits in (1, 2, 3, 4, 6):
        a = _grid_detail(shape_a, affine_a, digits)
        b = _grid_detail(shape_b, affine_b, digits)
        if a != b:
            return a, b
    return _grid_detail(shape_a, affine_a, 1), _grid_detail(shape_b, affine_b, 1)


def _fmt_deg(angle: float) -> str:
    return f"{angle:.1f}" if angle >= 0.1 else f"{angle:.2g}"


def _obliquity_deg(affine: np.ndarray) -> float:
    """Largest angle (degrees) between a voxel axis of ``affine`` and its nearest world axis."""
    cols = np.abs(np.asarray(affine, np.float64)[:3, :3])
    worst = 0.0
    for c in cols.T:
        k = int(np.argmax(c))
        off = float(np.sqrt(np.sum(np.delete(c, k) ** 2)))
        worst = max(worst, float(np.degrees(np.arctan2(off, c[k]))))
    return worst


def _check_content(vol: Volume, role: str, info: ModelInfo, notes: list[str]) -> None:
    lo, hi = float(vol.array.min()), float(vol.array.max())
    if lo == hi:
        raise PddnetError(f"{role} scan{_of(vol)}: the image is constant (every voxel is "
                          f"{lo:g}); there is nothing to register -- is it the right file?")
    it = info.normalisation
    if it.mode != "ct":
        return
    why = not_hu_reason(vol.array)
    if why:
        notes.append(f"{role}: warning: this image does not look like CT in Hounsfield units "
                     f"({why}), but the model's intensity normalisation is ct (HU window "
                     f"[{it.lower:g}, {it.upper:g}]): it is normalised as if it were HU, which "
                     "is not what the model learnt, and the result will be wrong; for MR or "
                     "other images without an absolute scale use a model trained with `pddnet "
                     "train --intensity mr`, or convert the scan to HU")
    elif hi <= it.lower or lo >= it.upper:
        notes.append(f"{role}: warning: intensities [{lo:g}, {hi:g}] lie outside the model's "
                     f"window [{it.lower:g}, {it.upper:g}] HU")


#: Heuristics of :func:`not_hu_reason`: CT in HU has air at about -1000 and tissue spanning
#: hundreds of HU, so an image whose range is this narrow, whose maximum is this low or whose
#: 1st percentile is this high is not HU.
NOT_HU_MAX_SPAN, NOT_HU_MAX_TOP, NOT_HU_MIN_P1 = 10.0, 100.0, -500.0


def not_hu_reason(image: np.ndarray) -> str:
    """Why ``image`` is clearly not CT in Hounsfield units (``""`` when it may be): a span of
    under :data:`NOT_HU_MAX_SPAN`, a maximum under :data:`NOT_HU_MAX_TOP` (no soft tissue or
    bone), or no air: the 1st percentile above :data:`NOT_HU_MIN_P1`."""
    lo, hi = float(image.min()), float(image.max())
    if hi - lo < NOT_HU_MAX_SPAN:
        return f"its values span only [{lo:g}, {hi:g}]"
    if hi < NOT_HU_MAX_TOP:
        return f"its maximum is {hi:g}, below {NOT_HU_MAX_TOP:g} (soft tissue is 0-100 HU)"
    p1 = float(np.percentile(image, 1))
    if p1 > NOT_HU_MIN_P1:
        return (f"its 1st percentile is {p1:g}, above {NOT_HU_MIN_P1:g}: no air (about "
                "-1000 HU) around the body")
    return ""


def _reorient(vol: Volume, role: str, notes: list[str]) -> Volume:
    before = _codes(vol.affine)
    canon, desc = to_canonical(vol)
    after = _codes(canon.affine)
    if desc == "already canonical":
        notes.append(f"{role}: orientation {before}, no reorientation needed")
    else:
        notes.append(f"{role}: reoriented {before} -> {after} ({desc})")
    return canon


def _check_spacing(grid_spacing, info: ModelInfo, canon: Volume, tol: float) -> None:
    trained = np.asarray(info.spacing_mm, np.float64)
    got = np.asarray(grid_spacing, np.float64)
    rel = np.abs(got - trained) / trained
    if np.all(rel <= tol):
        return
    ax = int(np.argmax(rel))
    fov = np.asarray(canon.shape) * np.asarray(_spacing(canon.affine))
    want = np.asarray(info.image_shape) * trained
    raise PddnetError(
        f"fixed scan{_of(canon)}: on the model grid {_fmt_shape(info.image_shape)} its voxels "
        f"would be {_fmt_mm(got)}, but the model was trained at {_fmt_mm(trained)} (axis {ax} "
        f"differs by {100 * rel[ax]:.0f}%, more than the {100 * tol:.0f}% tolerance). The model "
        f"grid spans the fixed scan's field of view ({_fmt_mm(fov)[:-3]} mm); the model expects "
        f"about {_fmt_mm(want)[:-3]} mm. Crop or pad the scan to that field of view, or raise "
        "the tolerance with --spacing-tolerance (spacing_tolerance= in Python)")


def _to_grid(array: np.ndarray, shape, vmap: np.ndarray) -> np.ndarray:
    return resample(array.astype(np.float32, copy=False), shape, vmap, order=1)


def _normalise(arr: np.ndarray, info: ModelInfo) -> np.ndarray:
    out = normalise_intensity(arr, info.normalisation)
    return out.reshape((1, 1) + out.shape)


def _intensity_note(info: ModelInfo) -> str:
    it = info.normalisation
    return f"intensity: {it.mode}, {it.describe()} (the model's normalisation)"


def _resample_note(canon: Volume, grid_shape, grid_affine) -> str:
    src = _grid_str(canon.shape, canon.affine)
    dst = _grid_str(grid_shape, grid_affine)
    if tuple(canon.shape) == tuple(grid_shape):
        return f"already on the model grid {dst}"
    return f"resampled {src} -> {dst} (trilinear, align_corners=False)"


def _overlap(vmap: np.ndarray, grid_shape, in_shape) -> float:
    """Fraction of a coarse 9^3 sample of the model grid that falls inside the input volume."""
    axes = [np.linspace(0, n - 1, 9) for n in grid_shape]
    pts = np.stack(np.meshgrid(*axes, indexing="ij")).reshape(3, -1)
    src = vmap[:3, :3] @ pts + vmap[:3, 3:4]
    n = np.asarray(in_shape, np.float64).reshape(3, 1)
    return float(np.mean(np.all((src >= -0.5) & (src <= n - 0.5), axis=0)))
