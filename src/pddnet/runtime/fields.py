"""Displacement-field formats: pddnet's voxel fields and ITK/ANTs physical fields; applying one.

Two conventions, one meaning: both say where each point of the fixed grid is found in the
moving image.

**pddnet (voxels).** ``u`` ``(i, j, k, 3)`` float32 on the fixed grid (its affine ``A``, RAS mm),
channel ``a`` in voxels along array axis ``a``; ``warped(x) = moving(A_m^-1 A (x + u(x)))``
(``docs/conventions.md``; the moving image is sampled in world coordinates, so it may be stored
on any grid). Files: ``disp.nii.gz`` (4D, with ``A``) and ``disp.npz`` (the array alone, key
``arr_0``: the Learn2Reg layout; ``A`` is in ``summary.json`` under ``field.affine`` and in
``disp.nii.gz``).

**ITK (physical).** ``v`` ``(i, j, k, 1, 3)`` in a NIfTI with intent NIFTI_INTENT_VECTOR (1007),
on the same grid; vector ``v(p)`` is in millimetres in ITK's LPS world frame and maps the fixed
physical point ``p`` to ``p + v(p)`` in the moving image (``itk::DisplacementFieldTransform``,
what ``antsApplyTransforms``, SimpleITK's ``Resample`` and 3D Slicer use). ITK reads the NIfTI
affine (RAS) as LPS by negating x and y, and reads the vector components as stored.

The two are the same field: with ``L`` the 3x3 part of ``A`` and ``S = diag(-1, -1, 1)``
(RAS <-> LPS), ``p + v = S A (x + u)`` for ``p = S A x``, so ``v = S L u`` and
``u = L^-1 S v``; no interpolation, exact up to float32 rounding.

Applying a field (:func:`warp_with_field`, ``pddnet apply``) is pddnet's own warp
(:func:`pddnet.runtime.resample.warp`): trilinear for images, nearest for label maps, and outside
the image's field of view the value of the nearest border voxel (border clamp), exactly as
``pddnet register`` writes ``warped.nii.gz``/``warped_labels.nii.gz``. SimpleITK/ANTs fill
points outside with a default value (0) instead, so the two agree inside the image only.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from pddnet._files import check_writable
from pddnet.data.io import DEFAULT_MAX_VOXELS, Volume, load_nifti, save_nifti
from pddnet.errors import PddnetError
from pddnet.runtime.postprocess import moving_voxel_map
from pddnet.runtime.resample import warp

#: NIfTI intent codes (nifti1.h)
NIFTI_INTENT_VECTOR = 1007
NIFTI_INTENT_DISPVECT = 1006

#: RAS <-> LPS: ITK's world frame negates NIfTI's x and y
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])

#: Largest deviation from orthogonality (|cos| between two voxel axes) for which ITK reads the
#: NIfTI affine as written; beyond it (a sheared grid, e.g. CT with gantry tilt) ITK's reader
#: falls back to the qform, a rotation, and would place an ITK field on another grid.
ITK_ORTHOGONALITY_TOL = 1e-4

#: Two grids coincide when they place the 8 corner voxels this close (mm).
GRID_ATOL_MM = 1e-3

#: How many points per axis :func:`outside_fraction` checks (a regular subsample).
_OVERLAP_SAMPLES = 32


@dataclass
class Field:
    """A displacement field in pddnet's convention, whatever file it came from.

    ``disp`` ``(i, j, k, 3)`` float32, voxels of its grid along array axes; ``affine`` the grid's
    4x4 voxel -> world (RAS mm) map; ``source`` says which format it was read from.
    """

    disp: np.ndarray
    affine: np.ndarray
    source: str
    path: Path | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(n) for n in self.disp.shape[:3])  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------
# conversions
# ---------------------------------------------------------------------------------------------
def voxels_to_itk(disp: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """pddnet field ``(i, j, k, 3)`` in voxels -> ITK vectors ``(i, j, k, 1, 3)`` float32, mm, LPS
    (``v = S L u``, see the module docstring)."""
    d = _check_disp(disp, "voxels_to_itk")
    return _linear_map(d, RAS_TO_LPS @ np.asarray(affine, np.float64)[:3, :3])[:, :, :, None, :]


def itk_to_voxels(vectors: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """ITK vectors ``(i, j, k, 1, 3)`` or ``(i, j, k, 3)`` (mm, LPS) -> pddnet voxels
    ``(i, j, k, 3)`` float32 (``u = L^-1 S v``)."""
    v = np.asarray(vectors)
    if v.ndim == 5 and v.shape[3] == 1:
        v = v[:, :, :, 0, :]
    v = _check_disp(v, "itk_to_voxels")
    return _linear_map(v, np.linalg.inv(np.asarray(affine, np.float64)[:3, :3]) @ RAS_TO_LPS)


def _linear_map(d: np.ndarray, m: np.ndarray) -> np.ndarray:
    """``out[..., r] = sum_c m[r, c] d[..., c]`` in float32, one component at a time (no
    float64 copy of a paper-size field: 3 x 94 MB would be 3 x 189 MB)."""
    out = np.empty(d.shape, np.float32)
    comps = [np.asarray(d[..., c], np.float32) for c in range(3)]
    for r in range(3):
        acc = out[..., r]
        np.multiply(comps[0], np.float32(m[r, 0]), out=acc)
        for c in (1, 2):
            acc += np.float32(m[r, c]) * comps[c]
    return out


def itk_grid_problem(affine: np.ndarray) -> str | None:
    """Why ITK would not read a NIfTI with ``affine`` on the same grid, or ``None`` if it does.

    ITK represents a grid as origin, spacing and an orthonormal direction matrix; a sheared
    affine (voxel axes not perpendicular) has none, and ITK's NIfTI reader then uses the
    qform (a rotation), not the affine pddnet uses.
    """
    lin = np.asarray(affine, np.float64)[:3, :3]
    cols = lin / np.linalg.norm(lin, axis=0)
    cos = np.abs(cols.T @ cols - np.eye(3)).max()
    if cos <= ITK_ORTHOGONALITY_TOL:
        return None
    return (f"its voxel axes are not perpendicular (a sheared grid, largest |cos| between two "
            f"axes {cos:.2g}), which ITK cannot represent: ITK tools would place the field on "
            "another grid")


def save_itk_field(path: str | os.PathLike, disp: np.ndarray, affine: np.ndarray, *,
                   overwrite: bool = True) -> Path:
    """Write pddnet field ``disp`` (voxels, on the grid of ``affine``) as an ITK displacement
    field NIfTI (``(i, j, k, 1, 3)`` float32, mm, LPS, intent vector), atomically.

    Refuses a sheared grid (:func:`itk_grid_problem`).
    """
    problem = itk_grid_problem(affine)
    if problem is not None:
        raise PddnetError(f"{path}: cannot write an ITK displacement field for this grid: "
                          f"{problem}; use the voxel field (disp.nii.gz) with `pddnet apply`")
    return save_nifti(path, voxels_to_itk(disp, affine), affine, overwrite=overwrite,
                      intent="vector")


def _check_disp(disp: np.ndarray, where: str) -> np.ndarray:
    d = np.asarray(disp)
    if d.ndim != 4 or d.shape[3] != 3 or d.size == 0:
        raise PddnetError(f"{where}: expected a field of shape (i, j, k, 3), got {d.shape}")
    return d


# ---------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------
def load_field(path: str | os.PathLike, *, reference: Volume | None = None,
               max_voxels: int | None = DEFAULT_MAX_VOXELS) -> Field:
    """Read a displacement field in any format pddnet writes or ITK/ANTs write.

    * ``.nii``/``.nii.gz`` of shape ``(i, j, k, 3)``: a pddnet (or Learn2Reg) voxel field, on
      the file's grid (``disp.nii.gz``);
    * ``.nii``/``.nii.gz`` of shape ``(i, j, k, 1, 3)`` with intent vector (1007): an ITK/ANTs
      displacement field (``disp_itk.nii.gz``, ANTs' ``*Warp.nii.gz``), converted to voxels;
    * ``.npz`` holding one array ``(i, j, k, 3)`` (``disp.npz``): a voxel field whose grid is
      ``reference``'s or, without one, the ``field.affine`` of the ``summary.json`` beside it;
      the older two-array layout (``disp``, ``affine``) is read too.

    ``reference`` (the fixed image) must be on the field's grid: same shape, same affine.
    """
    p = Path(path)
    if not p.exists():
        raise PddnetError(f"{p}: no such file; give the path of a displacement field "
                          "(disp.nii.gz, disp.npz, disp_itk.nii.gz or an ITK/ANTs *Warp.nii.gz)")
    if not p.is_file():
        raise PddnetError(f"{p} is not a file; give the path of a displacement field file")
    name = p.name.lower()
    if name.endswith(".npz"):
        field = _load_npz(p, reference)
    elif name.endswith((".nii", ".nii.gz")):
        field = _load_nifti_field(p, max_voxels)
    else:
        raise PddnetError(f"{p}: unknown field format; expected a .nii/.nii.gz (pddnet or ITK) "
                          "or a .npz (pddnet's disp.npz)")
    if not np.all(np.isfinite(field.disp)):
        bad = int(np.count_nonzero(~np.isfinite(field.disp)))
        raise PddnetError(f"{p}: the field holds {bad} NaN/Inf value(s); it cannot be applied")
    _check_affine(field.affine, p)
    if reference is not None:
        check_same_grid(field, reference)
    return field


def check_same_grid(field: Field, reference: Volume) -> None:
    """Refuse a ``reference`` image that is not on ``field``'s grid (shape and affine)."""
    where = field.path or "the field"
    ref = reference.path or "the reference"
    if tuple(reference.shape) != field.shape:
        raise PddnetError(f"{where} is on a {_fmt(field.shape)} grid but {ref} is "
                          f"{_fmt(reference.shape)}; give as --reference the fixed image the "
                          "field was computed for")
    gap = _corner_gap(field.affine, reference.affine, field.shape)
    if gap > GRID_ATOL_MM:
        raise PddnetError(f"{where} and {ref} have the same shape but their affines place the "
                          f"grid up to {gap:.3g} mm apart; give as --reference the fixed image "
                          "the field was computed for")


def _load_nifti_field(p: Path, max_voxels: int | None) -> Field:
    try:
        img = nib.load(str(p))
        shape = tuple(int(n) for n in img.header.get_data_shape())
        intent = int(img.header["intent_code"])
    except Exception as exc:
        raise PddnetError(_one_line(f"{p}: cannot be read as NIfTI ({type(exc).__name__}: "
                                    f"{exc}); is it a complete .nii/.nii.gz file?")) from exc
    if len(shape) == 4 and shape[3] == 3:
        kind = "pddnet voxel field"
    elif len(shape) == 5 and shape[3] == 1 and shape[4] == 3:
        if intent == NIFTI_INTENT_DISPVECT:
            raise PddnetError(f"{p}: a 5D field with intent 'displacement vector' (1006) follows "
                              "another tool's conventions (NiftyReg's, not ITK's); convert it to "
                              "an ITK displacement field (intent vector, 1007) or to voxels")
        if intent != NIFTI_INTENT_VECTOR:
            raise PddnetError(f"{p}: a 5D (i, j, k, 1, 3) field must have the NIfTI intent "
                              f"'vector' (1007) to be read as an ITK displacement field; its "
                              f"intent code is {intent}")
        kind = "ITK displacement field"
    else:
        raise PddnetError(f"{p}: shape {shape} is not a displacement field; expected "
                          "(i, j, k, 3) (pddnet voxel field) or (i, j, k, 1, 3) with intent "
                          "vector (ITK/ANTs, mm, LPS)")
    voxels = int(np.prod(shape[:3]))
    if max_voxels is not None and voxels > max_voxels:
        raise PddnetError(f"{p}: its grid is {_fmt(shape[:3])} voxels, more than the limit of "
                          f"{int(max_voxels):,}; pass --max-voxels N to allow it")
    try:
        data = np.asarray(img.dataobj, dtype=np.float64 if kind.startswith("ITK")
                          else np.float32)
        affine = np.asarray(img.affine, np.float64)
    except MemoryError:
        raise PddnetError(f"{p}: not enough memory to load its {_fmt(shape)} values") from None
    except Exception as exc:
        raise PddnetError(_one_line(f"{p}: cannot be read as NIfTI ({type(exc).__name__}: "
                                    f"{exc}); the file is incomplete or damaged -- copy it "
                                    "again")) from exc
    if kind.startswith("ITK"):
        _check_affine(affine, p)
        problem = itk_grid_problem(affine)
        if problem is not None:
            raise PddnetError(f"{p}: an ITK field on this grid is ambiguous: {problem}")
        disp = itk_to_voxels(data, affine)
    else:
        disp = np.ascontiguousarray(data, np.float32)
    return Field(disp, affine, f"{kind} ({p.name})", p)


def _load_npz(p: Path, reference: Volume | None) -> Field:
    try:
        with np.load(p, allow_pickle=False) as z:
            arrays = {k: np.asarray(z[k]) for k in z.files}
    except Exception as exc:
        raise PddnetError(_one_line(f"{p}: cannot be read as .npz ({type(exc).__name__}: "
                                    f"{exc}); is it a complete numpy archive?")) from exc
    affine = None
    if set(arrays) == {"disp", "affine"}:  # the layout before the one-array disp.npz
        disp, affine = arrays["disp"], arrays["affine"]
    elif len(arrays) == 1:
        (disp,) = arrays.values()
    else:
        raise PddnetError(f"{p}: holds {len(arrays)} arrays ({', '.join(sorted(arrays))}); a "
                          "field .npz holds one array (i, j, k, 3) in voxels")
    if disp.ndim == 4 and disp.shape[0] == 3 and disp.shape[3] != 3:
        raise PddnetError(f"{p}: shape {disp.shape} is the Learn2Reg 2020 half-resolution "
                          "layout (disp_l2r2020.npz), which cannot be applied; use disp.nii.gz "
                          "or disp.npz")
    if disp.ndim != 4 or disp.shape[3] != 3 or disp.dtype.kind not in "fiu":
        raise PddnetError(f"{p}: an array of shape {disp.shape} ({disp.dtype}) is not a "
                          "displacement field; expected (i, j, k, 3) in voxels")
    disp = np.ascontiguousarray(disp, np.float32)
    if affine is None:
        if reference is not None:
            affine = reference.affine
        else:
            affine = _affine_from_summary(p, disp.shape[:3])
    affine = np.asarray(affine, np.float64)
    if affine.shape != (4, 4):
        raise PddnetError(f"{p}: its affine has shape {affine.shape}, not 4x4")
    return Field(disp, affine, f"pddnet voxel field ({p.name})", p)


def _affine_from_summary(p: Path, shape) -> np.ndarray:
    summary = p.parent / "summary.json"
    hint = ("give --reference FIXED (the fixed image the field was computed for), or keep "
            "the summary.json that `pddnet register` wrote beside it")
    if not summary.is_file():
        raise PddnetError(f"{p}: holds the field alone (Learn2Reg layout), without its grid; "
                          f"{hint}")
    try:
        info = json.loads(summary.read_text())["field"]
        affine = np.asarray(info["affine"], np.float64)
        stored_shape = tuple(int(n) for n in info["shape"][:3])
    except Exception as exc:
        raise PddnetError(_one_line(f"{summary}: has no usable field.affine ({type(exc).__name__}: "
                                    f"{exc}); {hint}")) from exc
    if stored_shape != tuple(shape):
        raise PddnetError(f"{p}: its grid {_fmt(shape)} is not the {_fmt(stored_shape)} of "
                          f"{summary}; the two come from different results -- {hint}")
    return affine


def _check_affine(affine: np.ndarray, p: Path) -> None:
    a = np.asarray(affine, np.float64)
    if a.shape != (4, 4) or not np.all(np.isfinite(a)):
        raise PddnetError(f"{p}: the field's affine is not a finite 4x4 matrix; fix its header")
    lin = a[:3, :3]
    norms = np.linalg.norm(lin, axis=0)
    if not np.all(norms > 0) or abs(np.linalg.det(lin)) / np.prod(norms) < 1e-6:
        raise PddnetError(f"{p}: the field's affine is singular; fix its header")


# ---------------------------------------------------------------------------------------------
# applying
# ---------------------------------------------------------------------------------------------
def warp_with_field(field: Field, image: Volume, *, labels: bool = False) -> np.ndarray:
    """``image`` warped onto ``field``'s grid: ``out(x) = image(A_img^-1 A (x + u(x)))``.

    Trilinear (float32) for an image, nearest (uint8, from a ``kind="label"`` volume) for a
    label map; border clamp outside the image. ``image`` may be stored on any grid that covers
    the field's target points in world coordinates.
    """
    m = moving_voxel_map(_grid_volume(field), image)
    return warp(image.array, field.disp, voxel_map=m, order=0 if labels else 1)


def outside_fraction(field: Field, image: Volume) -> float:
    """Fraction of the field's target points that fall outside ``image`` (estimated on a
    regular subsample of at most 32 points per axis)."""
    steps = [max(1, n // _OVERLAP_SAMPLES) for n in field.shape]
    sub = field.disp[::steps[0], ::steps[1], ::steps[2]].astype(np.float64)
    idx = np.stack(np.meshgrid(*[np.arange(0, n, s) for n, s in zip(field.shape, steps)],
                               indexing="ij"), axis=-1)
    pts = (idx + sub).reshape(-1, 3)
    m = np.linalg.inv(image.affine) @ field.affine
    q = pts @ m[:3, :3].T + m[:3, 3]
    n = np.asarray(image.shape, np.float64)
    inside = np.all((q >= -0.5) & (q <= n - 0.5), axis=1)
    return float(1.0 - inside.mean())


def apply_field_files(field: str | os.PathLike, image: str | os.PathLike,
                      out: str | os.PathLike, *, labels: bool = False,
                      reference: str | os.PathLike | None = None, overwrite: bool = False,
                      max_voxels: int | None = DEFAULT_MAX_VOXELS) -> dict[str, Any]:
    """``pddnet apply``: warp the NIfTI ``image`` (a label map with ``labels``) with ``field``
    (:func:`load_field`) and write it to ``out`` on the field's grid, atomically.

    Returns what was done: ``out``, ``field`` (its format), ``shape``, ``outside`` (the
    fraction of target points outside the image, filled by border clamping). Refuses, before
    any work, an existing ``out`` (unless ``overwrite``), a ``--reference`` on another grid,
    and an image that the field's target points miss entirely.
    """
    out_p = Path(out)
    if not out_p.name.lower().endswith((".nii", ".nii.gz")):
        raise PddnetError(f"{out_p}: the output name must end in .nii or .nii.gz")
    if out_p.exists() and not overwrite:
        raise PddnetError(f"{out_p} already exists; remove it or pass --overwrite")
    if out_p.is_dir():
        raise PddnetError(f"{out_p} is a folder; give a file name ending in .nii.gz")
    check_writable(out_p)
    ref = None
    if reference is not None:
        ref = load_nifti(reference, kind="image", max_voxels=max_voxels)
    fld = load_field(field, reference=ref, max_voxels=max_voxels)
    img = load_nifti(image, kind="label" if labels else "image", max_voxels=max_voxels)
    outside = outside_fraction(fld, img)
    if outside >= 1.0:
        raise PddnetError(f"{img.path}: none of the field's target points lie inside this "
                          "image (their world coordinates miss its field of view); is it in the "
                          "same world space as the moving scan the field was computed for?")
    warped = warp_with_field(fld, img, labels=labels)
    save_nifti(out_p, warped, fld.affine, overwrite=overwrite)
    return {"out": out_p, "field": fld.source, "shape": fld.shape, "outside": outside,
            "labels": labels}


def _grid_volume(field: Field) -> Volume:
    """A volume standing for the field's grid (shape and affine; no voxel data)."""
    return Volume(np.broadcast_to(np.float32(0), field.shape), field.affine)


def _corner_gap(a: np.ndarray, b: np.ndarray, shape) -> float:
    n = [max(int(v), 1) for v in shape]
    corners = np.array([[i, j, k, 1.0] for i in (0, n[0] - 1) for j in (0, n[1] - 1)
                        for k in (0, n[2] - 1)]).T
    diff = (np.asarray(a, np.float64) - np.asarray(b, np.float64)) @ corners
    return float(np.sqrt((diff[:3] ** 2).sum(axis=0)).max())


def _fmt(shape) -> str:
    return "x".join(str(int(n)) for n in shape)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())
