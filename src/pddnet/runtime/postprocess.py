"""Post-processing: the model-grid displacement -> a field on the fixed scan's own grid; warping.

The model returns ``disp`` ``(I, J, K, 3)`` in voxels of the model grid (RAS+ axes, the fixed
scan's field of view). :func:`field_to_fixed_grid` turns it into ``u`` ``(i, j, k, 3)`` float32 in
voxels of the fixed file as stored, channel ``a`` along that file's array axis ``a``, so that
``warped(x) = moving(x + u(x))`` holds in the file's voxel axes (Learn2Reg convention; for a
moving scan on another grid, ``moving`` means the moving scan in world coordinates: the warp
samples it at world point ``A_fixed (x + u(x))``).

Steps: undo the reorientation at model resolution (transpose the spatial axes, flip the
flipped ones; permute the components the same way and negate those of flipped axes), then
resize to the fixed shape with the ``align_corners=False`` convention (trilinear) and scale
component ``a`` by the voxel-size ratio ``n_fixed[a] / n_model[a]``. Both steps are exact
re-expressions of the same world-space field: ``u(x) = R_f^-1 R_m d(y(x))`` with ``R`` the
linear parts of the affines and ``y(x)`` the model-grid coordinate of fixed voxel ``x``.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from pddnet.data.io import Volume
from pddnet.errors import PddnetError
from pddnet.runtime.preprocess import AFFINE_ATOL_MM, PreparedFixed
from pddnet.runtime.resample import resample, resize_map, warp


def field_to_fixed_grid(disp: np.ndarray, fixed: PreparedFixed) -> np.ndarray:
    """Model-grid ``disp`` ``(I, J, K, 3)`` -> ``(i, j, k, 3)`` float32 in fixed-file voxels."""
    disp = np.asarray(disp, np.float32)
    if disp.shape != tuple(fixed.grid_shape) + (3,):
        raise PddnetError(f"field_to_fixed_grid: the model returned a displacement of shape "
                          f"{disp.shape}, expected the model grid {tuple(fixed.grid_shape)} + (3,); "
                          "the fixed scan was prepared for another model: prepare it again "
                          "with this one")
    p = fixed.original_to_canonical()[:3, :3]
    src = [int(np.argmax(np.abs(p[:, o]))) for o in range(3)]  # canonical axis of file axis o
    sign = [float(p[src[o], o]) for o in range(3)]
    d = disp.transpose(src[0], src[1], src[2], 3)[..., src]
    flips = tuple(o for o in range(3) if sign[o] < 0)
    if flips:
        d = np.flip(d, axis=flips)
    d = np.ascontiguousarray(d)
    for o in flips:
        d[..., o] *= -1.0
    model_shape = d.shape[:3]
    out_shape = fixed.volume.shape
    if model_shape != out_shape:
        d = resample(d, out_shape, resize_map(model_shape, out_shape), order=1)
        d *= (np.asarray(out_shape, np.float32) / np.asarray(model_shape, np.float32))
    return d.astype(np.float32, copy=False)


def moving_voxel_map(fixed: Volume, moving: Volume) -> np.ndarray | None:
    """4x4 map from fixed-file voxels to moving-file voxels; ``None`` when the grids coincide."""
    if fixed.shape == moving.shape and np.allclose(fixed.affine, moving.affine,
                                                   atol=AFFINE_ATOL_MM):
        return None
    return np.linalg.inv(moving.affine) @ fixed.affine


def warp_to_fixed(moving: Volume, disp: np.ndarray, fixed: Volume, *, order: int) -> np.ndarray:
    """``warped(x) = moving(A_m^-1 A_f (x + disp(x)))`` on the fixed grid (border clamp).

    ``order=1`` (trilinear, float32) for images. Label maps go through
    :func:`warp_labels_to_fixed` instead (the official evaluation's warp); ``order=0`` here is
    a border-clamped nearest-neighbour warp, kept for callers that want it.
    """
    return warp(moving.array, disp, voxel_map=moving_voxel_map(fixed, moving), order=order)


def warp_labels_to_fixed(moving_labels: Volume, disp: np.ndarray, fixed: Volume) -> np.ndarray:
    """Moving labels warped onto the fixed grid as the Learn2Reg evaluation warps them:
    nearest neighbour, **0 (background) where ``x + disp(x)`` falls outside the moving grid**
    (:func:`pddnet.metrics.warp_labels`), so pddnet's Dice and HD95 are the leaderboard's. For
    a moving map on another grid the sample point is first mapped through the world
    coordinates (the official code assumes one grid; this is its natural extension)."""
    from pddnet.metrics import warp_labels

    return warp_labels(moving_labels.array, disp,
                       voxel_map=moving_voxel_map(fixed, moving_labels))


def labels_on_fixed_grid(moving_labels: Volume, fixed: Volume) -> np.ndarray:
    """Moving labels before registration (zero displacement), nearest, on the fixed grid."""
    m = moving_voxel_map(fixed, moving_labels)
    if m is None:
        return moving_labels.array
    return resample(moving_labels.array, fixed.shape, m, order=0)


def half_resolution_l2r2020(disp: np.ndarray) -> np.ndarray:
    """Learn2Reg 2020 submission layout: ``(3, i/2, j/2, k/2)`` float16, values still in
    full-resolution voxels, downsampled per component with ``scipy.ndimage.zoom(0.5, order=2)``
    (their evaluator upsamples with ``zoom(2, order=2)``)."""
    return np.stack([ndimage.zoom(disp[..., a], 0.5, order=2) for a in range(3)]
                    ).astype(np.float16)
