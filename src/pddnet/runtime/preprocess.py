"""Pre-processing: NIfTI volumes in any orientation and spacing -> the model's input arrays.

For the fixed scan (:func:`prepare_fixed`):

1. validate it (3D, finite, non-empty, plausible spacing, not constant);
2. reorient it to the closest canonical orientation (RAS+, :func:`pddnet.data.io.to_canonical`);
3. define the *model grid*: ``image_shape`` voxels covering the fixed scan's field of view
   (voxel faces aligned, ``align_corners=False``), in the canonical axes; its spacing must be
   within ``spacing_tolerance`` (relative, per axis) of the spacing the model was trained at;
4. resample the scan onto it (trilinear) and normalise: ``clip(HU, lower, upper) / scale``.

For a moving scan (:func:`prepare_moving`): validate, reorient, and resample it onto the same
model grid -- when it shares the fixed scan's grid with exactly the same map as the fixed scan,
otherwise in world coordinates through the affines (one interpolation from the moving scan's
own voxels; outside its field of view the border values are used).

Label maps are validated against their image (same shape and affine) and the model's label
count; they are not resampled here (post-processing warps them on the fixed grid).

Every step appends a human-readable line to ``notes``. Inputs are paths or
:class:`pddnet.data.io.Volume` objects; output arrays are ``(1, 1, I, J, K)`` float32.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import nibabel as nib
import numpy as np

from pddnet.data import io as dio
from pddnet.data.io import Volume, load_nifti, to_canonical
from pddnet.errors import PddnetError
from pddnet.graph.model import ModelInfo
from pddnet.runtime.resample import resample, resize_map

DEFAULT_SPACING_TOLERANCE = 0.30
AFFINE_ATOL_MM = 1e-3

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
def as_volume(x: VolumeLike, *, kind: str, role: str) -> Volume:
    """Load a path or validate an in-memory :class:`Volume` (``kind`` "image" or "label").

    Validation is :mod:`pddnet.data.io`'s (3D, non-empty, spacing in (0, 20] mm, finite image,
    integer labels in [0, 255]); messages are prefixed with ``role`` for in-memory volumes.
    """
    if isinstance(x, Volume):
        try:
            return dio._validated_volume(x.array, x.affine, x.path, kind)
        except PddnetError as exc:
            raise PddnetError(f"{role}: {exc}") from None
    if isinstance(x, (str, os.PathLike)):
        return load_nifti(x, kind=kind)
    raise PddnetError(f"{role}: expected a NIfTI path or a pddnet.data.io.Volume, received "
                      f"{type(x).__name__}")


def prepare_fixed(fixed: VolumeLike, info: ModelInfo, *, labels: VolumeLike | None = None,
                  spacing_tolerance: float = DEFAULT_SPACING_TOLERANCE) -> PreparedFixed:
    """Validate, reorient and resample the fixed scan onto the model grid (module docstring)."""
    if not spacing_tolerance > 0:
        raise PddnetError(f"spacing_tolerance must be > 0, got {spacing_tolerance!r}")
    vol = as_volume(fixed, kind="image", role="fixed scan")
    notes: list[str] = []
    _check_content(vol, "fixed", info, notes)
    canon = _reorient(vol, "fixed", notes)
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
    lab = check_labels(labels, vol, info, role="fixed labels", notes=notes)
    notes.append(_intensity_note(info))
    return PreparedFixed(vol, canon.affine, canon.shape, grid_shape, grid_affine,
                         _normalise(arr, info), lab, notes)


def prepare_moving(moving: VolumeLike, fixed: PreparedFixed, info: ModelInfo, *,
                   labels: VolumeLike | None = None) -> PreparedMoving:
    """Validate, reorient and resample a moving scan onto ``fixed``'s model grid."""
    vol = as_volume(moving, kind="image", role="moving scan")
    notes: list[str] = []
    _check_content(vol, "moving", info, notes)
    canon = _reorient(vol, "moving", notes)
    same = canon.shape == fixed.canonical_shape and np.allclose(
        canon.affine, fixed.canonical_affine, atol=AFFINE_ATOL_MM)
    if same:
        vmap = resize_map(canon.shape, fixed.grid_shape)
        notes.append(f"moving: same grid as the fixed scan; "
                     f"{_resample_note(canon, fixed.grid_shape, fixed.grid_affine)}")
    else:
        vmap = np.linalg.inv(canon.affine) @ fixed.grid_affine
        inside = _overlap(vmap, fixed.grid_shape, canon.shape)
        if inside == 0.0:
            raise PddnetError(
                f"moving scan{_of(vol)}: it does not overlap the fixed scan in world coordinates "
                "(no voxel of the fixed field of view falls inside it); check both affines "
                "(sform/qform) -- are they in the same scanner space?")
        notes.append(
            f"moving: grid differs from the fixed scan ({_grid_str(canon.shape, canon.affine)} vs "
            f"{_grid_str(fixed.canonical_shape, fixed.canonical_affine)}); resampled in world "
            f"coordinates onto the fixed scan's field of view, {_fmt_shape(fixed.grid_shape)} @ "
            f"{_fmt_mm(fixed.grid_spacing)} (trilinear; border values outside the moving scan)")
        if inside < 0.5:
            notes.append(f"moving: warning: only {100 * inside:.0f}% of the fixed field of view "
                         "lies inside the moving scan")
    arr = _to_grid(canon.array, fixed.grid_shape, vmap)
    lab = check_labels(labels, vol, info, role="moving labels", notes=notes)
    return PreparedMoving(vol, _normalise(arr, info), lab, notes)


def check_labels(labels: VolumeLike | None, image: Volume, info: ModelInfo, *, role: str,
                 notes: list[str] | None = None) -> Volume | None:
    """Validate a label map against its image and the model (``None`` passes through)."""
    if labels is None:
        return None
    lab = as_volume(labels, kind="label", role=role)
    if lab.shape != image.shape or not np.allclose(lab.affine, image.affine,
                                                   atol=AFFINE_ATOL_MM):
        raise PddnetError(
            f"{role}{_of(lab)}: grid {_grid_str(lab.shape, lab.affine)} differs from its image's "
            f"{_grid_str(image.shape, image.affine)}; a label map must have the shape and affine "
            "of the scan it labels")
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


def _check_content(vol: Volume, role: str, info: ModelInfo, notes: list[str]) -> None:
    lo, hi = float(vol.array.min()), float(vol.array.max())
    if lo == hi:
        raise PddnetError(f"{role} scan{_of(vol)}: the image is constant (every voxel is "
                          f"{lo:g}); there is nothing to register -- is it the right file?")
    if hi - lo < 10.0:
        notes.append(f"{role}: warning: intensities span only [{lo:g}, {hi:g}]; the model "
                     "expects CT in Hounsfield units")
    elif hi <= info.intensity["lower"] or lo >= info.intensity["upper"]:
        notes.append(f"{role}: warning: intensities [{lo:g}, {hi:g}] lie outside the model's "
                     f"window [{info.intensity['lower']:g}, {info.intensity['upper']:g}] HU")


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
    it = info.intensity
    out = np.clip(arr, it["lower"], it["upper"]).astype(np.float32, copy=False)
    out /= np.float32(it["scale"])
    return out.reshape((1, 1) + out.shape)


def _intensity_note(info: ModelInfo) -> str:
    it = info.intensity
    return (f"intensity: clipped to [{it['lower']:g}, {it['upper']:g}] HU and divided by "
            f"{it['scale']:g} (the model's normalisation)")


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
