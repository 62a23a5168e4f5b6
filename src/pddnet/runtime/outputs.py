"""Writing a registration's outputs: all or nothing, never over existing files unless asked.

Files (in ``out_dir``):

``disp.nii.gz``
    the field ``(i, j, k, 3)`` float32, voxels of the fixed image, with the fixed affine.
``disp.npz``
    the same field as ``disp`` plus ``affine`` (uncompressed; fast to write and read).
``disp_l2r2020.npz`` (``l2r_half=True``)
    Learn2Reg 2020 submission layout: ``arr_0`` ``(3, i/2, j/2, k/2)`` float16.
``warped.nii.gz``, ``warped_labels.nii.gz`` (when moving labels were given)
    the moving image (float32 HU) and labels (uint8) warped onto the fixed grid.
``summary.json``
    inputs, notes, model, backend, timings (ms), reuse saving, metrics; written last.

Every file goes through :func:`pddnet.data.io.atomic_write` (temporary name, renamed when
complete). All target names are checked before anything is written, and if writing fails or is
interrupted (Ctrl-C included) the files this call already wrote are removed, so ``out_dir``
holds either the complete set, ending with ``summary.json``, or none of it.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pddnet._files import atomic_write
from pddnet.data.io import save_nifti
from pddnet.errors import PddnetError

if TYPE_CHECKING:
    from pddnet.runtime.session import RegistrationResult

DISP_NII = "disp.nii.gz"
DISP_NPZ = "disp.npz"
DISP_L2R = "disp_l2r2020.npz"
WARPED = "warped.nii.gz"
WARPED_LABELS = "warped_labels.nii.gz"
SUMMARY = "summary.json"


def planned_outputs(*, labels: bool, l2r_half: bool = False) -> list[str]:
    """File names a save writes, in order (``labels``: moving labels were given)."""
    names = [DISP_NII, DISP_NPZ] + ([DISP_L2R] if l2r_half else []) + [WARPED]
    if labels:
        names.append(WARPED_LABELS)
    return names + [SUMMARY]


def check_free(out_dir: str | Path, names: list[str], *, overwrite: bool) -> None:
    """Raise if any of ``names`` exists in ``out_dir`` (unless ``overwrite``)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise PddnetError(f"{out} exists and is not a folder; choose another --out")
    if overwrite:
        return
    taken = [n for n in names if (out / n).exists()]
    if taken:
        raise PddnetError(f"{out} already holds {', '.join(taken)}; choose another folder, remove "
                          "them, or pass --overwrite (overwrite=True)")


def write_outputs(result: "RegistrationResult", out_dir: str | Path, *, overwrite: bool = False,
                  l2r_half: bool = False) -> dict[str, Path]:
    """Write ``result`` to ``out_dir`` (see the module docstring); returns name -> path.

    Sets ``result.timings_ms["write"]`` (the time to write everything before the summary).
    """
    out = Path(out_dir)
    names = planned_outputs(labels=result.warped_labels is not None, l2r_half=l2r_half)
    check_free(out, names, overwrite=overwrite)
    created = [p for p in (out, *out.parents) if not p.exists()]  # removed again on failure
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    t0 = time.perf_counter()
    try:
        aff = result.affine
        written.append(save_nifti(out / DISP_NII, result.disp, aff, overwrite=overwrite))
        written.append(_write_npz(out / DISP_NPZ, overwrite, disp=result.disp, affine=aff))
        if l2r_half:
            from pddnet.runtime.postprocess import half_resolution_l2r2020

            written.append(_write_npz(out / DISP_L2R, overwrite,
                                      arr_0=half_resolution_l2r2020(result.disp)))
        written.append(save_nifti(out / WARPED, result.warped, aff, overwrite=overwrite))
        if result.warped_labels is not None:
            written.append(save_nifti(out / WARPED_LABELS, result.warped_labels, aff,
                                      overwrite=overwrite))
        result.timings_ms["write"] = (time.perf_counter() - t0) * 1e3
        summary = result.summary(outputs=names)
        with atomic_write(out / SUMMARY, overwrite=overwrite) as tmp:
            tmp.write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n")
        written.append(out / SUMMARY)
    except BaseException:
        for p in written:
            with contextlib.suppress(OSError):
                p.unlink()
        for d in created:  # innermost first; rmdir refuses a folder something else wrote into
            with contextlib.suppress(OSError):
                d.rmdir()
        raise
    return {p.name: p for p in written}


def _write_npz(path: Path, overwrite: bool, **arrays: Any) -> Path:
    with atomic_write(path, overwrite=overwrite) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
    return path
