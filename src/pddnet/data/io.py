"""NIfTI volumes: reading with header checks, writing through :func:`pddnet._files.atomic_write`,
and reorientation to the canonical (RAS+) axis order.
"""

from __future__ import annotations

import math
import os
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from pddnet._files import atomic_write
from pddnet.errors import PddnetError

#: Largest voxel spacing (mm) accepted by :func:`load_nifti`; anything above is a broken header.
MAX_SPACING_MM = 20.0

#: Default voxel budget of :func:`load_nifti` (``max_voxels``), checked from the header before
#: anything is allocated: 2**28 = 268,435,456 voxels = 512x512x1024, the largest routine CT (a
#: 512x512 matrix, up to 1024 thin slices); 1 GiB as float32 once loaded. 512**3 would refuse
#: real thin-slice chest-abdomen scans (512x512x600 = 1.6e8 voxels).
DEFAULT_MAX_VOXELS = 2**28

#: How many decompressed bytes a ``.nii.gz`` may hold beyond what its header declares (header,
#: extensions, voxel data) before the gzip check stops reading it.
GZIP_SLACK_BYTES = 1 << 20

#: Smallest |det| of the affine's 3x3 part relative to the product of its column norms (the
#: volume of a unit cell over that of a box of the same spacing): below it the voxel axes are
#: (nearly) coplanar and world coordinates cannot be mapped back to voxels.
MIN_AFFINE_CONDITION = 1e-6

#: The sform and qform "disagree" when they place a corner voxel of the grid this far apart (mm).
QFORM_SFORM_ATOL_MM = 1e-3

_GZIP_MAGIC = b"\x1f\x8b"
_READ_CHUNK = 1 << 20  # compressed bytes read at a time by the gzip check
_OUT_CHUNK = 4 << 20   # most decompressed bytes held at a time by the gzip check
_UNREADABLE_HEADER_PROBE = 64 << 20  # decompressed bytes checked when the header fails to parse


@dataclass
class Volume:
    """A 3D volume with its voxel-to-world (RAS+ mm) affine.

    ``array`` is indexed ``[i, j, k]`` in NIfTI voxel order; ``affine`` maps ``(i, j, k, 1)`` to
    world millimetres.
    """

    array: np.ndarray
    affine: np.ndarray
    path: Path | None = None
    #: What :func:`load_nifti` found in the header and how it was resolved (e.g. an sform/qform
    #: disagreement), one line each, without a role prefix; the runtime copies them into its
    #: notes.
    notes: list[str] = field(default_factory=list)

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


def load_nifti(path: str | os.PathLike, *, kind: str = "image",
               max_voxels: int | None = DEFAULT_MAX_VOXELS) -> Volume:
    """Read a 3D NIfTI image (``kind="image"``, float32 HU) or label map (``kind="label"``, uint8).

    The header is read first, alone; nothing is allocated for the voxels until it has passed:

    * its declared size must be at most ``max_voxels`` voxels (default
      :data:`DEFAULT_MAX_VOXELS`; ``None``: no limit);
    * a ``.nii.gz`` is then verified end to end, in one streaming pass in constant memory (the
      CRC32 and length of every gzip member, as ``gzip -t`` does; nibabel itself stops reading
      before the gzip trailer), stopping as soon as it holds more data than its header declares;
      an uncompressed ``.nii`` must hold at least the bytes its header declares.

    Raises :class:`PddnetError` naming the file and the problem for: a missing or unreadable file,
    a corrupted or truncated ``.nii.gz``, a header above the voxel budget, an array that is not 3D
    (a trailing singleton 4th axis is squeezed away), a volume of zero size, a non-finite or
    singular affine, a voxel spacing that is not in (0, 20] mm, NaN/Inf in an image, and
    non-integer, negative or > 255 values in a label map. Header findings that are resolved
    rather than refused (an sform that disagrees with the qform) are in ``Volume.notes``.
    """
    if kind not in ("image", "label"):
        raise PddnetError(f"kind must be 'image' or 'label', not {kind!r}")
    if max_voxels is not None and (isinstance(max_voxels, bool)
                                   or not isinstance(max_voxels, (int, np.integer))
                                   or max_voxels < 1):
        raise PddnetError(f"max_voxels must be a positive integer or None (no limit), not "
                          f"{max_voxels!r}")
    p = Path(path)
    if not p.exists():
        raise PddnetError(f"{p}: no such file; check the path")
    if not p.is_file():
        raise PddnetError(f"{p} is not a file; give the path of a .nii or .nii.gz file")
    gz = p.name.lower().endswith(".gz") and _starts_with_gzip_magic(p)
    try:
        img = nib.load(str(p))  # the header only: the voxels stay on disk (a lazy ArrayProxy)
        shape = tuple(int(n) for n in img.header.get_data_shape())
        stored = np.dtype(img.header.get_data_dtype())
    except Exception as exc:  # nibabel raises many types (ImageFileError, EOFError, zlib, ...)
        if gz:  # a damaged stream is the likelier cause: say so when it is found quickly
            _check_gzip(p, _UNREADABLE_HEADER_PROBE, stop_quietly=True)
        raise PddnetError(_one_line(
            f"{p}: cannot be read as NIfTI ({type(exc).__name__}: {exc}); "
            "is it a complete .nii/.nii.gz file?")) from exc
    declared = _check_declared_size(p, shape, stored, max_voxels)
    try:
        end = declared + _data_offset(img)
    except Exception as exc:  # e.g. a NaN vox_offset
        raise PddnetError(_one_line(
            f"{p}: cannot be read as NIfTI: its header gives no usable data offset "
            f"({type(exc).__name__}: {exc}); the file is damaged -- fix or re-export it")) from exc
    if gz:
        _check_gzip(p, end + GZIP_SLACK_BYTES, need=end)
    elif p.name.lower().endswith(".nii") and p.stat().st_size < end:
        raise PddnetError(
            f"{p}: cannot be read: the file holds {p.stat().st_size} bytes but its header "
            f"declares {end} ({_fmt_shape(shape)} {stored} voxels); the file is incomplete -- "
            "copy it again")
    try:
        data = np.asanyarray(img.dataobj)
        affine = np.asarray(img.affine, dtype=np.float64)
    except MemoryError:
        raise PddnetError(f"{p}: not enough memory to load its {_fmt_shape(shape)} voxels "
                          f"({_fmt_bytes(declared)} as stored); free memory or use a smaller "
                          "scan") from None
    except Exception as exc:
        raise PddnetError(_one_line(
            f"{p}: cannot be read as NIfTI ({type(exc).__name__}: {exc}); "
            "is it a complete .nii/.nii.gz file?")) from exc
    return _validated_volume(data, affine, p, kind, notes=_header_notes(img.header, shape))


def _one_line(text: str) -> str:
    """``text`` with every run of whitespace (newlines included) made one space."""
    return " ".join(str(text).split())


def _fmt_shape(shape) -> str:
    return "x".join(str(int(n)) for n in shape)


def _sci(n: float) -> str:
    """``1.0e9`` for 1,000,000,000."""
    mantissa, exponent = f"{n:.1e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def _fmt_bytes(n: float) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} bytes"


def _starts_with_gzip_magic(p: Path) -> bool:
    try:
        with open(p, "rb") as fh:
            return fh.read(2) == _GZIP_MAGIC
    except OSError:
        return False


def _data_offset(img) -> int:
    """Where the voxels start in the (decompressed) file, as nibabel will read them."""
    off = getattr(img.dataobj, "offset", None)
    if off is None:
        off = img.header.get_data_offset()
    return max(int(off), 0)


def _check_declared_size(p: Path, shape: tuple[int, ...], stored: np.dtype,
                         max_voxels: int | None) -> int:
    """Refuse a header that declares a negative dimension or more than ``max_voxels`` voxels;
    return the bytes its voxels take as stored."""
    if any(n < 0 for n in shape):
        raise PddnetError(f"{p}: its header declares a negative dimension (shape "
                          f"{shape}); the file is damaged -- fix or re-export it")
    voxels = math.prod(shape)
    stored_bytes = voxels * max(stored.itemsize, 1)
    if max_voxels is not None and voxels > max_voxels:
        raise PddnetError(
            f"{p}: its header declares {_fmt_shape(shape)} voxels ({_sci(voxels)}; "
            f"{_fmt_bytes(stored_bytes)} as stored {stored}, {_fmt_bytes(4 * voxels)} as "
            f"float32), more than the limit of {int(max_voxels):,} voxels; if the scan really "
            "is that large, pass --max-voxels N to allow it (max_voxels=N in Python, None for "
            "no limit)")
    return stored_bytes


def _check_gzip(p: Path, limit: int | None, *, need: int | None = None,
                stop_quietly: bool = False) -> None:
    """Verify the whole gzip stream of ``p`` as ``gzip -t`` does, in constant memory.

    Every member's deflate data, CRC32 and ISIZE are checked by zlib (gzip mode, ``wbits=31``);
    zero padding after a member is allowed (as Python's gzip allows it), anything else after it
    must be another member. Stops as soon as more than ``limit`` bytes have come out (a
    decompression bomb, or a file that is not what its header says) and refuses the file, or,
    with ``stop_quietly``, just returns; with ``need``, refuses a stream that ends before that
    many bytes.
    """
    def too_much(total: int) -> None:
        if not stop_quietly:
            raise PddnetError(
                f"{p}: refused: its gzip stream holds more data than its header declares "
                f"({need} bytes, header and voxels; reading stopped at {total} decompressed "
                "bytes); the file is damaged or not what it claims to be -- check where it came "
                "from")

    def corrupted(what: str) -> PddnetError:
        return PddnetError(f"{p}: cannot be read: the gzip data is corrupted ({what}); the file "
                           "was damaged in transfer or on disk -- copy it again")

    total = 0
    d = None  # the decompressor of the member in progress, None between members
    with open(p, "rb") as fh:
        buf = b""
        while True:
            if not buf:
                buf = fh.read(_READ_CHUNK)
                if not buf:
                    break
            if d is None:
                buf = buf.lstrip(b"\0")
                if not buf:
                    continue
                if total and not buf.startswith(_GZIP_MAGIC[:len(buf)]):
                    raise corrupted("trailing data after the gzip stream, not another gzip "
                                    "member")
                d = zlib.decompressobj(31)
            try:
                total += len(d.decompress(buf, _OUT_CHUNK))
                while d.unconsumed_tail and (limit is None or total <= limit):
                    total += len(d.decompress(d.unconsumed_tail, _OUT_CHUNK))
            except zlib.error as exc:
                raise corrupted(_zlib_reason(exc)) from None
            if limit is not None and total > limit:
                return too_much(total)
            if d.eof:
                buf, d = d.unused_data, None
            else:
                buf = b""
        if d is not None:  # input exhausted inside a member: flush what zlib still holds
            try:
                while not d.eof:
                    out = d.decompress(b"", _OUT_CHUNK)
                    if not out:
                        break
                    total += len(out)
                    if limit is not None and total > limit:
                        return too_much(total)
            except zlib.error as exc:
                raise corrupted(_zlib_reason(exc)) from None
            if not d.eof:
                raise corrupted(f"truncated: the stream ends after {total} decompressed bytes, "
                                "before its end-of-member trailer")
    if need is not None and total < need:
        raise PddnetError(
            f"{p}: cannot be read: its gzip stream holds {total} bytes but its header declares "
            f"{need} (header and voxels); the file is incomplete -- copy it again")


def _zlib_reason(exc: zlib.error) -> str:
    msg = str(exc)
    if "incorrect data check" in msg:
        return "CRC check failed"
    if "incorrect length check" in msg:
        return "length check failed"
    return f"invalid compressed data: {msg}"


def _header_notes(header, shape: tuple[int, ...]) -> list[str]:
    """What the header holds that pddnet resolves rather than refuses: an sform and a qform
    (both codes > 0) that place the grid differently. nibabel (and pddnet) then use the sform."""
    if not hasattr(header, "get_sform") or not hasattr(header, "get_qform"):
        return []
    try:
        with np.errstate(all="ignore"):
            sform, scode = header.get_sform(coded=True)
            qform, qcode = header.get_qform(coded=True)
            if not (int(scode) > 0 and int(qcode) > 0):
                return []
            sform = np.asarray(sform, np.float64)
            qform = np.asarray(qform, np.float64)
            if not np.all(np.isfinite(sform)):
                return []  # refused by _validated_volume: the affine is the sform
            if not np.all(np.isfinite(qform)):
                return [f"the qform is not finite (NaN/Inf); pddnet uses the sform (code "
                        f"{int(scode)}), as nibabel does"]
            gap = _corner_gap(sform, qform, shape)
    except Exception:  # a header too broken to compare: the affine checks decide
        return []
    if gap <= QFORM_SFORM_ATOL_MM:
        return []
    return [f"the sform and qform disagree (they place the grid's corner voxels up to "
            f"{gap:.3g} mm apart); pddnet uses the sform (code {int(scode)}), as nibabel does"]


def _corner_gap(a: np.ndarray, b: np.ndarray, shape) -> float:
    """Largest distance (mm) between where ``a`` and ``b`` put the 8 corner voxels of ``shape``."""
    n = [max(int(v), 1) for v in (tuple(shape) + (1, 1, 1))[:3]]
    corners = np.array([[i, j, k, 1.0] for i in (0, n[0] - 1) for j in (0, n[1] - 1)
                        for k in (0, n[2] - 1)]).T
    diff = (np.asarray(a, np.float64) - np.asarray(b, np.float64)) @ corners
    return float(np.sqrt((diff[:3] ** 2).sum(axis=0)).max())


def _validated_volume(data: np.ndarray, affine: np.ndarray, p: Path | None, kind: str, *,
                      notes: Sequence[str] = ()) -> Volume:
    where = str(p) if p is not None else "volume"
    notes = list(notes)
    data = np.asarray(data)
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise PddnetError(f"{where}: the affine must be 4x4, got shape {affine.shape}")
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
    _check_invertible(affine, spacing, where)
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
        return Volume(np.ascontiguousarray(out), affine, p, notes)
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
    return Volume(np.ascontiguousarray(data.astype(np.uint8)), affine, p, notes)


def _check_invertible(affine: np.ndarray, spacing, where: str) -> None:
    """Refuse an affine that cannot map world coordinates back to voxels."""
    if not np.allclose(affine[3], (0.0, 0.0, 0.0, 1.0), rtol=0.0, atol=1e-6):
        shown = ", ".join(f"{v:g}" for v in affine[3])
        raise PddnetError(f"{where}: the affine's last row is ({shown}), not (0, 0, 0, 1); it "
                          "is not a voxel-to-world map -- fix the NIfTI header (sform/qform)")
    det = float(np.linalg.det(affine[:3, :3]))
    rel = abs(det) / float(np.prod(spacing))
    if not rel >= MIN_AFFINE_CONDITION:
        shown = "0" if det == 0 else (f"{det:.3g}, only {rel:.1e} of a box of the same "
                                      "spacing")
        raise PddnetError(
            f"{where}: the affine is singular (determinant {shown}: its voxel axes are (nearly) "
            "coplanar, so world positions cannot be mapped back to voxels); fix the NIfTI "
            "header (sform/qform)")


def save_nifti(path: str | os.PathLike, array: np.ndarray, affine: np.ndarray, *,
               overwrite: bool = True, intent: str | None = None) -> Path:
    """Write ``array`` with ``affine`` to ``path`` (.nii or .nii.gz, gzip for the latter).

    Goes through :func:`atomic_write`. The sform and qform are both set (code 1, scanner) and
    the units to mm. Boolean arrays are written as uint8 and 64-bit integers as the smallest
    integer type that holds them (NIfTI readers often reject int64). ``intent`` sets the
    header's intent code by nibabel's name (``"vector"``: NIFTI_INTENT_VECTOR, 1007, what ITK
    writes and reads for a displacement field of shape ``(i, j, k, 1, 3)``).
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
    if intent is not None:
        img.header.set_intent(intent)
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
    return (Volume(array, np.asarray(canon.affine, dtype=np.float64), volume.path,
                   list(volume.notes)), desc)
