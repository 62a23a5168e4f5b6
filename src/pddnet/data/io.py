"""NIfTI volumes: reading with header checks, writing through :func:`pddnet._files.atomic_write`,
and reorientation to the canonical (RAS+) axis order.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from pddnet._files import atomic_write
from pddnet.errors import PddnetError

#: Largest voxel spacing (mm) accepted by :func:`load_nifti`; anything above is a broken header.
MAX_SPACING_MM = 20.0


@dataclass
class Volume:
    """A 3D volume with its voxel-to-world (RAS+ mm) affine.

    ``array`` is indexed ``[i, j, k]`` in NIfTI voxel order; ``affine`` maps ``(i, j, k, 1)`` to
    world millimetres.
    """

    array: np.ndarray
    affine: np.ndarray
    path: Path | None = None

    def __post_init__(self) -> None:
        self.affine = np.asarray(self.affine, dtype=np.float64)
        if self.affine.shape != (4, 4):
            raise PddnetError(f"a volume affine must be 4x4, got shape {self.affine.shape}")

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along each array axis (column norms of the affine)."""
        return _spacing_of(self.affine)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(n) for n in self.array.shape)


def _spacing_of(affine: np.ndarray) -> tuple[float, float, float]:
    cols = np.sqrt(np.sum(np.asarray(affine, dtype=np.float64)[:3, :3] ** 2, axis=0))
    return (float(cols[0]), float(cols[1]), float(cols[2]))


def _nifti_suffix(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(".nii.gz"):
        return ".nii.gz"
    if name.endswith(".nii"):
        return ".nii"
    return ""


def load_nifti(path: str | os.PathLike, *, kind: str = "image") -> Volume:
    """Read a 3D NIfTI image (``kind="image"``, float32 HU) or label map (``kind="label"``, uint8).

    Raises :class:`PddnetError` naming the file and the problem for: a missing or unreadable file,
    an array that is not 3D (a trailing singleton 4th axis is squeezed away), a volume of zero
    size, a non-finite affine or a voxel spacing that is not in (0, 20] mm, NaN/Inf in an image,
    and non-integer, negative or > 255 values in a label map.
    """
    if kind not in ("image", "label"):
        raise PddnetError(f"kind must be 'image' or 'label', not {kind!r}")
    p = Path(path)
    if not p.exists():
        raise PddnetError(f"{p}: no such file; check the path")
    if not p.is_file():
        raise PddnetError(f"{p} is not a file; give the path of a .nii or .nii.gz file")
    try:
        img = nib.load(str(p))
        data = np.asanyarray(img.dataobj)
        affine = np.asarray(img.affine, dtype=np.float64)
    except Exception as exc:  # nibabel raises many types (ImageFileError, EOFError, zlib, ...)
        raise PddnetError(
            f"{p}: cannot be read as NIfTI ({type(exc).__name__}: {exc}); "
            "is it a complete .nii/.nii.gz file?"
        ) from exc
    return _validated_volume(data, affine, p, kind)


def _validated_volume(data: np.ndarray, affine: np.ndarray, p: Path | None, kind: str) -> Volume:
    where = str(p) if p is not None else "volume"
    data = np.asarray(data)
    if data.size == 0:  # before the rank check: a NIfTI with a zero dimension reads as (0,)
        raise PddnetError(f"{where}: the volume is empty (shape {tuple(data.shape)}, no voxels); "
                          "is the file complete?")
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise PddnetError(
            f"{where}: expected a 3D volume, got an array of shape {tuple(data.shape)}; "
            "pass a single 3D scan (a 4th axis of length 1 is accepted)"
        )
    if data.size == 0:
        raise PddnetError(f"{where}: the volume is empty (shape {tuple(data.shape)})")
    if not np.all(np.isfinite(affine)):
        raise PddnetError(f"{where}: the affine contains NaN or Inf; fix the NIfTI header")
    spacing = _spacing_of(affine)
    if not all(0.0 < s <= MAX_SPACING_MM for s in spacing):
        shown = ", ".join(f"{s:g}" for s in spacing)
        raise PddnetError(
            f"{where}: implausible voxel spacing ({shown}) mm; each must be in (0, "
            f"{MAX_SPACING_MM:g}] mm; fix the NIfTI header (pixdim / sform)"
        )
    if kind == "image":
        if np.issubdtype(data.dtype, np.complexfloating) or data.dtype.kind not in "biuf":
            raise PddnetError(f"{where}: unsupported image data type {data.dtype}")
        out = data.astype(np.float32, copy=False)
        if out.dtype.kind == "f" and not np.all(np.isfinite(out)):
            bad = int(np.count_nonzero(~np.isfinite(out)))
            raise PddnetError(
                f"{where}: the image contains {bad} NaN/Inf voxel(s); replace them (e.g. by "
                "-1000 HU) before registration"
            )
        return Volume(np.ascontiguousarray(out), affine, p)
    # label map
    if data.dtype.kind == "b":
        data = data.astype(np.uint8)
    if data.dtype.kind not in "iuf":
        raise PddnetError(f"{where}: unsupported label data type {data.dtype}")
    if data.dtype.kind == "f":
        if not np.all(np.isfinite(data)):
            raise PddnetError(f"{where}: the label map contains NaN/Inf; labels must be integers")
        if not np.all(data == np.round(data)):
            raise PddnetError(
                f"{where}: the label map holds non-integer values; is this an image rather "
                "than a label map?"
            )
    lo, hi = data.min(), data.max()
    if lo < 0:
        raise PddnetError(f"{where}: the label map holds negative values (min {lo:g}); labels "
                          "must be 0 (background) or positive integers")
    if hi > 255:
        raise PddnetError(f"{where}: label {hi:g} exceeds 255; at most 255 labels are supported "
                          "(labels are stored as uint8)")
    return Volume(np.ascontiguousarray(data.astype(np.uint8)), affine, p)


def save_nifti(path: str | os.PathLike, array: np.ndarray, affine: np.ndarray, *,
               overwrite: bool = True) -> Path:
    """Write ``array`` with ``affine`` to ``path`` (.nii or .nii.gz, gzip for the latter).

    Goes through :func:`atomic_write`. The sform and qform are both set (code 1, scanner) and
    the units to mm. Boolean arrays are written as uint8 and 64-bit integers as the smallest
    integer type that holds them (NIfTI readers often reject int64).
    """
    final = Path(path)
    if not _nifti_suffix(final):
        raise PddnetError(f"{final}: a NIfTI file name must end in .nii or .nii.gz")
    arr = np.asarray(array)
    aff = np.asarray(affine, dtype=np.float64)
    if aff.shape != (4, 4) or not np.all(np.isfinite(aff)):
        raise PddnetError(f"{final}: the affine must be a finite 4x4 matrix")
    if arr.ndim < 3 or arr.size == 0:
        raise PddnetError(f"{final}: refusing to write an array of shape {arr.shape}; "
                          "expected a non-empty volume with at least 3 axes")
    if arr.dtype.kind == "b":
        arr = arr.astype(np.uint8)
    elif arr.dtype in (np.int64, np.uint64):
        arr = arr.astype(_smallest_int_dtype(arr))
    img = nib.Nifti1Image(np.ascontiguousarray(arr), aff)
    img.header.set_xyzt_units("mm", "sec")
    img.set_sform(aff, code=1)
    img.set_qform(aff, code=1)
    with atomic_write(final, overwrite=overwrite) as tmp:
        nib.save(img, str(tmp))
    return final


def _smallest_int_dtype(arr: np.ndarray) -> np.dtype:
    lo, hi = int(arr.min()), int(arr.max())
    for dt in (np.uint8, np.int16, np.int32):
        info = np.iinfo(dt)
        if info.min <= lo and hi <= info.max:
            return np.dtype(dt)
    raise PddnetError(f"integer values in [{lo}, {hi}] do not fit in int32 for NIfTI")


def to_canonical(volume: Volume) -> tuple[Volume, str]:
    """Reorient ``volume`` to the closest canonical (RAS+) orientation with nibabel.

    Returns the new volume and a short description of what changed, e.g.
    ``"flipped axis 0; transposed axes (2, 1, 0)"`` (flips refer to the input axes and happen
    first; the new array is ``flipped.transpose(axes)``) or ``"already canonical"``.
    """
    img = nib.Nifti1Image(volume.array, volume.affine)
    ornt = nib.io_orientation(volume.affine)  # row a: (output axis of input axis a, flip)
    canon = nib.as_closest_canonical(img)
    parts = []
    flips = [a for a in range(3) if ornt[a, 1] < 0]
    if flips:
        parts.append("; ".join(f"flipped axis {a}" for a in flips))
    perm = tuple(int(a) for a in np.argsort(ornt[:, 0]))  # new axis j comes from input axis perm[j]
    if perm != (0, 1, 2):
        parts.append(f"transposed axes {perm}")
    desc = "; ".join(parts) if parts else "already canonical"
    array = np.ascontiguousarray(np.asanyarray(canon.dataobj)).astype(volume.array.dtype,
                                                                      copy=False)
    return Volume(array, np.asarray(canon.affine, dtype=np.float64), volume.path), desc
