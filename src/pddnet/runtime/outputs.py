"""Writing a registration's outputs: all or nothing, never over existing files unless asked.

Files (in ``out_dir``):

``disp.nii.gz``
    the field ``(i, j, k, 3)`` float32, voxels of the fixed image, with the fixed affine.
``disp.npz``
    the same field as ``disp`` plus ``affine`` (uncompressed; fast to write and read).
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
    names = planned_outputs(labels=result.warped_labels is not None, l2r_half=l2r_half)
    written: list[Path] = []
    t0 = time.perf_counter()
    aff = result.affine
    written.append(save_nifti(out / DISP_NII, result.disp, aff))
    written.append(_write_npz(out / DISP_NPZ, disp=result.disp, affine=aff))
    if l2r_half:
        from pddnet.runtime.postprocess import half_resolution_l2r2020

        written.append(_write_npz(out / DISP_L2R, arr_0=half_resolution_l2r2020(result.disp)))
    written.append(save_nifti(out / WARPED, result.warped, aff))
    if result.warped_labels is not None:
        written.append(save_nifti(out / WARPED_LABELS, result.warped_labels, aff))
    result.timings_ms["write"] = (time.perf_counter() - t0) * 1e3
    written.append(write_json(out / SUMMARY, result.summary(outputs=names)))
    return {p.name: p for p in written}


def _write_npz(path: Path, **arrays: Any) -> Path:
    with atomic_write(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
    return path
