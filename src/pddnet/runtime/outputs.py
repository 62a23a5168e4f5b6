"""Writing a registration's outputs: all or nothing, never over existing files unless asked.

Files (in ``out_dir``):

``disp.nii.gz``
    the field ``(i, j, k, 3)`` float32, voxels of the fixed image, with the fixed affine.
``disp.npz``
    the same array alone (key ``arr_0``, uncompressed): the Learn2Reg layout, one array; its grid
    (the fixed affine) is ``summary.json``'s ``field.affine`` and ``disp.nii.gz``'s header.
``disp_itk.nii.gz``
    the same field for ITK, ANTs and 3D Slicer: ``(i, j, k, 1, 3)`` float32, millimetres, LPS,
    intent vector (:mod:`pddnet.runtime.fields`). Not written for a sheared fixed grid, which
    ITK cannot represent (a note says so).
``disp_l2r2020.npz`` (``l2r_half=True``)
    Learn2Reg 2020 submission layout: ``arr_0`` ``(3, i/2, j/2, k/2)`` float16.
``warped.nii.gz``, ``warped_labels.nii.gz`` (when moving labels were given)
    the moving image (float32 HU, trilinear) and labels (uint8) warped onto the fixed grid; the
    labels as the Learn2Reg evaluation warps them (nearest, 0 where the sample falls outside
    the moving grid: :func:`pddnet.metrics.warp_labels`).
``summary.json``
    inputs, notes, model, backend, timings (ms), reuse saving, metrics; written last.

The set is written into a staging folder and swapped in as a whole by
:func:`pddnet._files.atomic_directory`: the output folder holds the previous complete result or
the new complete one, whatever interrupts the write (an error, Ctrl-C, SIGTERM, ``kill -9``, a
full disk), and a second writer of the same folder is refused while the first runs.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pddnet._files import atomic_write, write_json
from pddnet.data.io import save_nifti
from pddnet.runtime.fields import itk_grid_problem, voxels_to_itk

if TYPE_CHECKING:
    from pddnet.runtime.session import RegistrationResult

DISP_NII = "disp.nii.gz"
DISP_NPZ = "disp.npz"
DISP_ITK = "disp_itk.nii.gz"
DISP_L2R = "disp_l2r2020.npz"
WARPED = "warped.nii.gz"
WARPED_LABELS = "warped_labels.nii.gz"
SUMMARY = "summary.json"


def planned_outputs(*, labels: bool, l2r_half: bool = False, itk: bool = True) -> list[str]:
    """File names a save writes, in order (``labels``: moving labels were given; ``itk``: the
    fixed grid can be represented in ITK, see :func:`pddnet.runtime.fields.itk_grid_problem`)."""
    names = [DISP_NII, DISP_NPZ] + ([DISP_ITK] if itk else []) + ([DISP_L2R] if l2r_half
                                                                   else []) + [WARPED]
    if labels:
        names.append(WARPED_LABELS)
    return names + [SUMMARY]


#: every file name a registration may write: what a new result replaces in ``--out``
OUTPUT_NAMES = frozenset(planned_outputs(labels=True, l2r_half=True))


def write_outputs(result: "RegistrationResult", folder: str | Path, *,
                  l2r_half: bool = False) -> dict[str, Path]:
    """Write ``result``'s files into ``folder`` (see the module docstring); returns name -> path.

    ``folder`` is a staging folder of :func:`pddnet._files.atomic_directory`, which makes the
    whole set appear at once (:meth:`RegistrationResult.save`, ``pddnet register``). Sets
    ``result.timings_ms["write"]`` (the time to write everything before the summary).
    """
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    aff = result.affine
    itk_problem = itk_grid_problem(aff)
    if itk_problem is not None:
        note = f"{DISP_ITK} not written: the fixed grid {itk_problem}"
        if note not in result.notes:
            result.notes.append(note)
    names = planned_outputs(labels=result.warped_labels is not None, l2r_half=l2r_half,
                            itk=itk_problem is None)
    written: list[Path] = []
    t0 = time.perf_counter()
    written.append(save_nifti(out / DISP_NII, result.disp, aff))
    written.append(_write_npz(out / DISP_NPZ, result.disp))
    if itk_problem is None:
        written.append(save_nifti(out / DISP_ITK, voxels_to_itk(result.disp, aff), aff,
                                  intent="vector"))
    if l2r_half:
        from pddnet.runtime.postprocess import half_resolution_l2r2020

        written.append(_write_npz(out / DISP_L2R, arr_0=half_resolution_l2r2020(result.disp)))
    written.append(save_nifti(out / WARPED, result.warped, aff))
    if result.warped_labels is not None:
        written.append(save_nifti(out / WARPED_LABELS, result.warped_labels, aff))
    result.timings_ms["write"] = (time.perf_counter() - t0) * 1e3
    summary = result.summary(outputs=names)
    summary["field"] = {**summary.get("field", {}), **field_files(aff, itk=itk_problem is None)}
    written.append(write_json(out / SUMMARY, summary))
    return {p.name: p for p in written}


def field_files(affine: np.ndarray, *, itk: bool = True) -> dict[str, Any]:
    """What ``summary.json`` says under ``field`` about the field files: the grid's affine (the
    one thing ``disp.npz`` does not hold) and each file's layout."""
    files = {
        DISP_NII: "(i, j, k, 3) float32, voxels of the fixed grid, channel a along array axis a",
        DISP_NPZ: "arr_0: the same array, alone (Learn2Reg layout); its grid is field.affine",
    }
    if itk:
        files[DISP_ITK] = ("(i, j, k, 1, 3) float32, mm, LPS, NIfTI intent vector: an ITK "
                           "displacement field (SimpleITK, ANTs, 3D Slicer)")
    return {"affine": np.asarray(affine, np.float64).tolist(), "files": files}


def _write_npz(path: Path, *arrays: Any, **named: Any) -> Path:
    with atomic_write(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, *arrays, **named)
    return path
