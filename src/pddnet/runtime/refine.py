"""Instance optimisation ("pdd+inst") and the two-stage mode ("2 warps") without torch.

This module is the runtime implementation (numpy, float64 internally) of what
:mod:`pddnet.model.refine` defines with PyTorch; both follow ``docs/refinement.md``. The settings both
sides share (:class:`~pddnet.spec.refine.RefineOptions`, the registration modes, the stage-two
overrides) live in :mod:`pddnet.spec.refine`.

Instance optimisation
---------------------
Given the network's displacement probabilities ``P`` ``(G_i, G_j, G_k, L^3)`` and expected
displacement ``E`` ``(G_i, G_j, G_k, 3)`` (normalised units, ``docs/conventions.md``):

* **Parameters and field.** ``theta`` has the control grid's shape ``(G_i, G_j, G_k, 3)``, in
  normalised units, initialised to ``E``. The refined field is ``u = S(theta)``: two 3x3x3
  average poolings (stride 1) after replicate padding by 2 over the grid axes -- the same
  operator as the network's message passing (``pddnet.model.ops.smooth3``), applied as one
  5-tap matrix per axis (:func:`smoothing_matrix`). Replicate padding keeps a constant field
  unchanged; the authors' ``AvgPool3d(3, 1, padding=1)`` zero-pads, which pulls the outer
  layer of control points towards zero displacement. With zero steps the result is ``S(E)``.
* **Data term.** For control point ``k`` the probability at the current displacement is
  ``P_k(u_k)``: trilinear interpolation of ``P_k`` seen as an ``L x L x L`` volume at the
  lattice coordinate ``t = (u_k + q) / h`` per axis (``h = 2 q / (L - 1)`` the lattice step;
  index ``d`` is the displacement ``-q + h d``; component ``a`` moves along lattice axis
  ``a``). Outside the lattice the probability is zero (PyTorch ``grid_sample`` with
  ``padding_mode="zeros", align_corners=True`` at ``u / q``): within one step outside it ramps
  linearly to zero, further out value and gradient are zero.
* **Energy.** ``E(theta) = -mean_k P_k(u_k) + lam * sum_a mean((D_a u)^2)`` with ``D_a`` the
  forward difference along grid axis ``a`` and the mean over all its ``(G_a - 1) * ... * 3``
  entries (``pddnet.model.losses.diffusion_penalty``), in normalised units.
* **Optimiser.** ``steps`` iterations of Adam (PyTorch's update: ``betas = (0.9, 0.999)``,
  ``eps = 1e-8``, bias-corrected, no weight decay) with learning rate ``lr`` in normalised
  units per step. Defaults are those of the authors' ``fit_sparse2dense`` as called in their
  two-warp script: 50 steps, ``lr = 0.02``, ``lam = 1.5``.
* **Resolution.** The refined field lives on the control grid, where the probabilities are
  defined (the authors' code, too, overwrites its finer ``GridNet`` with the ``G^3``
  prediction). It is upsampled to the image like the network's output: trilinear,
  ``align_corners=False``, times ``n / 2`` per axis to voxels (:func:`to_voxels`).

Why numpy with hand-derived gradients rather than an unrolled ONNX graph: one step is about a
dozen small array operations on ``K = G_i G_j G_k`` points (eight gathers of corner
probabilities, the smoothing and its transpose, the diffusion gradient, Adam), so the cost is
per-operation overhead and gather latency, not arithmetic. ``scripts/bench_refine.py`` writes
the same step as an ONNX graph (180 standard nodes, equal to this code to 1e-14) and runs it
with ONNX Runtime, probabilities bound once: which of the two is faster depends on the machine,
and either is a few percent of a registration (figures in ``docs/benchmarks.md``). numpy stays
for one code path on every geometry; an unrolled 50-step graph would also carry 9000 nodes for
every backend to load. The gradient is
``dE/dtheta = S^T dE/du`` with ``dE/du = -(1/K)(1/h) dP/dt + (2 lam / N_a) D_a^T D_a u``
summed over the axes; tests compare it with finite differences and with autograd.

Two stages
----------
Stage one registers ``moving`` to ``fixed`` (optionally refined): ``u1``. The moving scan is
warped with it, ``m1(x) = moving(x + u1(x))`` (trilinear, border clamp, model grid), and the
same weights run again with a finer control grid and a smaller capture range
(:func:`pddnet.spec.refine.stage2_overrides`): ``u2`` (optionally refined) registers ``m1`` to ``fixed``. The
composed field is ``u(x) = u2(x) + u1(x + u2(x))`` (``u1`` sampled trilinearly, border clamp,
in voxels), so that ``warped(x) = moving(x + u(x))`` equals ``m1(x + u2(x))`` up to the one
interpolation it saves. The fixed scan's features are the same in both stages and are reused.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pddnet.errors import PddnetError
from pddnet.spec.refine import RefineOptions

# --------------------------------------------------------------------------------------------
# Linear operators on the control grid
# --------------------------------------------------------------------------------------------

def smoothing_matrix(n: int) -> np.ndarray:
    """``(n, n)`` float64: replicate-pad by 2, then two valid 3-averages (one grid axis of ``S``).

    Equal to ``pddnet.model.ops.smoothing_matrix``; interior rows are ``[1, 2, 3, 2, 1] / 9``.
    """
    pad = np.clip(np.arange(-2, n + 2), 0, n - 1)
    m = np.zeros((n + 4, n))
    m[np.arange(n + 4), pad] = 1.0
    for _ in range(2):
        m = (m[:-2] + m[1:-1] + m[2:]) / 3.0
    return m


def _apply_axes(x: np.ndarray, mats=None, transpose: bool = False) -> np.ndarray:
    """``S(x)`` (or ``S^T x``) along the three grid axes of ``(G_i, G_j, G_k, C)``.

    ``S`` along one axis is replicate padding by 2 followed by the valid 5-tap filter
    ``[1, 2, 3, 2, 1] / 9`` (the two 3-averages); ``S^T`` is the full 5-tap filter (it is
    symmetric) followed by folding the two padded entries at each end back onto the edge
    element. Both are shifted sums, faster than the (banded) matrices for these sizes.
    ``mats`` is accepted for symmetry with :func:`smoothing_matrix` users and ignored.
    """
    for axis in range(3):
        x = _smooth_t_axis(x, axis) if transpose else _smooth_axis(x, axis)
    return x


_TAPS = (1.0 / 9.0, 2.0 / 9.0, 3.0 / 9.0, 2.0 / 9.0, 1.0 / 9.0)


def _smooth_axis(x: np.ndarray, axis: int) -> np.ndarray:
    n = x.shape[axis]
    xm = np.moveaxis(x, axis, 0)
    xp = np.concatenate([xm[:1], xm[:1], xm, xm[-1:], xm[-1:]], axis=0)
    out = xp[0:n] * _TAPS[0]
    for s in range(1, 5):
        out += xp[s:s + n] * _TAPS[s]
    return np.ascontiguousarray(np.moveaxis(out, 0, axis))


def _smooth_t_axis(x: np.ndarray, axis: int) -> np.ndarray:
    n = x.shape[axis]
    xm = np.moveaxis(x, axis, 0)
    full = np.zeros((n + 4,) + xm.shape[1:], x.dtype)
    for s, w in enumerate(_TAPS):
        full[s:s + n] += w * xm
    out = full[2:n + 2].copy()
    out[0] += full[0] + full[1]
    out[-1] += full[n + 2] + full[n + 3]
    return np.ascontiguousarray(np.moveaxis(out, 0, axis))


def smooth(x: np.ndarray, mats=None) -> np.ndarray:
    """``S(x)`` over the first three axes of ``(G_i, G_j, G_k, C)``."""
    return _apply_axes(x, mats or [smoothing_matrix(n) for n in x.shape[:3]])


# --------------------------------------------------------------------------------------------
# The energy and its gradient
# --------------------------------------------------------------------------------------------

def sample_probabilities(probs: np.ndarray, disp: np.ndarray, disp_size: int, capture: float,
                         *, grad: bool = False):
    """``P_k(u_k)``: trilinear in displacement space, zero outside the lattice.

    Args:
        probs: ``(..., L^3)`` probabilities (flattened ``L x L x L``, lattice axis ``a`` for
            component ``a``).
        disp: ``(..., 3)`` displacements in normalised units.
        grad: also return ``dP/du`` ``(..., 3)``.

    Returns:
        ``(...)`` float64 values (and the gradient).
    """
    L = int(disp_size)
    batch = disp.shape[:-1]
    p = np.asarray(probs).reshape(-1, L ** 3)
    u = np.asarray(disp, np.float64).reshape(-1, 3)
    if p.shape[0] != u.shape[0]:
        raise PddnetError(f"sample_probabilities: probs {probs.shape} and disp {disp.shape} "
                          "describe different numbers of control points")
    h = 2.0 * capture / (L - 1)
    t = (u + capture) / h
    i0 = np.floor(t)
    f = t - i0
    i0 = i0.astype(np.int64)
    base = np.arange(p.shape[0], dtype=np.int64) * L ** 3
    # per axis: index and validity (zero padding) of the two corners, and their weights
    idx, ok, w = [], [], []
    for a, stride in enumerate((L * L, L, 1)):
        lo, hi = i0[:, a], i0[:, a] + 1
        idx.append((np.clip(lo, 0, L - 1) * stride, np.clip(hi, 0, L - 1) * stride))
        ok.append(((lo >= 0) & (lo < L), (hi >= 0) & (hi < L)))
        w.append((1.0 - f[:, a], f[:, a]))
    flat = p.reshape(-1)
    v = np.empty((2, 2, 2, p.shape[0]))
    for a in (0, 1):
        for b in (0, 1):
            for c in (0, 1):
                vals = flat[base + idx[0][a] + idx[1][b] + idx[2][c]].astype(np.float64)
                vals *= ok[0][a] & ok[1][b] & ok[2][c]
                v[a, b, c] = vals
    # contract axis by axis: k first, then j, then i
    vk = v[..., 0, :] * w[2][0] + v[..., 1, :] * w[2][1]       # (2, 2, K)
    vjk = vk[:, 0] * w[1][0] + vk[:, 1] * w[1][1]               # (2, K)
    value = vjk[0] * w[0][0] + vjk[1] * w[0][1]
    if not grad:
        return value.reshape(batch)
    dk = v[..., 1, :] - v[..., 0, :]                            # d/dt_k, (2, 2, K)
    dk = (dk[:, 0] * w[1][0] + dk[:, 1] * w[1][1])
    dk = dk[0] * w[0][0] + dk[1] * w[0][1]
    dj = vk[:, 1] - vk[:, 0]                                    # (2, K)
    dj = dj[0] * w[0][0] + dj[1] * w[0][1]
    di = vjk[1] - vjk[0]
    g = np.stack([di, dj, dk], axis=-1) / h
    return value.reshape(batch), g.reshape(*batch, 3)


def diffusion(u: np.ndarray, *, grad: bool = False):
    """``sum_a mean((D_a u)^2)`` over the grid axes of ``(G_i, G_j, G_k, 3)`` (and its gradient)."""
    total = 0.0
    g = np.zeros_like(u) if grad else None
    for a in range(3):
        if u.shape[a] < 2:
            continue
        d = np.diff(u, axis=a)
        total += float(np.mean(d * d))
        if grad:
            d *= 2.0 / d.size
            lo = [slice(None)] * 4
            hi = [slice(None)] * 4
            lo[a], hi[a] = slice(0, -1), slice(1, None)
            g[tuple(lo)] -= d
            g[tuple(hi)] += d
    return (total, g) if grad else total


def energy(theta: np.ndarray, probs: np.ndarray, disp_size: int, capture: float, weight: float,
           *, mats=None, grad: bool = False):
    """The refinement energy of ``theta`` ``(G_i, G_j, G_k, 3)`` (and ``dE/dtheta``).

    Returns ``(E, data, smoothness)`` or ``(E, data, smoothness, dE/dtheta)``, where ``data`` is
    ``-mean_k P_k(u_k)`` and ``smoothness`` the unweighted diffusion term.
    """
    mats = mats or [smoothing_matrix(n) for n in theta.shape[:3]]
    u = _apply_axes(theta, mats)
    k = int(np.prod(theta.shape[:3]))
    if grad:
        p, dp = sample_probabilities(probs, u, disp_size, capture, grad=True)
        reg, dreg = diffusion(u, grad=True)
    else:
        p = sample_probabilities(probs, u, disp_size, capture)
        reg = diffusion(u)
    data = -float(p.sum()) / k
    e = data + weight * reg
    if not grad:
        return e, data, reg
    du = dp * (-1.0 / k) + weight * dreg
    return e, data, reg, _apply_axes(du, mats, transpose=True)


class Adam:
    """PyTorch's Adam (no weight decay, no amsgrad) on one float64 array, updated in place."""

    def __init__(self, lr: float, betas=(0.9, 0.999), eps: float = 1e-8):
        self.lr, self.b1, self.b2, self.eps = float(lr), float(betas[0]), float(betas[1]), \
            float(eps)
        self.t = 0
        self.m = self.v = None

    def step(self, param: np.ndarray, grad: np.ndarray) -> None:
        if self.m is None:
            self.m, self.v = np.zeros_like(param), np.zeros_like(param)
        self.t += 1
        self.m *= self.b1
        self.m += (1.0 - self.b1) * grad
        self.v *= self.b2
        self.v += (1.0 - self.b2) * grad * grad
        step = self.lr / (1.0 - self.b1 ** self.t)
        denom = np.sqrt(self.v) / np.sqrt(1.0 - self.b2 ** self.t) + self.eps
        param -= step * self.m / denom


@dataclass
class RefineResult:
    """What :func:`instance_optimise` returns.

    Attributes:
        grid_disp: ``(G_i, G_j, G_k, 3)`` float32 refined field ``S(theta)``, normalised units.
        energy: ``[E before the first step, E after the last]`` (float).
        data: the data term (``-mean P``) before and after.
        steps: number of Adam steps taken.
        ms: wall time in milliseconds.
    """

    grid_disp: np.ndarray
    energy: list[float]
    data: list[float]
    steps: int
    ms: float
    options: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        return {"steps": self.steps, "energy": self.energy, "mean_probability":
                [-d for d in self.data], "ms": round(self.ms, 3), "options": self.options}


def instance_optimise(probs: np.ndarray, grid_disp: np.ndarray, disp_size: int, capture: float,
                      options: RefineOptions | None = None) -> RefineResult:
    """Refine the expected displacement against the probabilities (module docstring).

    Args:
        probs: ``(G_i, G_j, G_k, L^3)`` (or ``(K, L^3)`` with ``grid_disp`` ``(K, 3)`` reshaped
            accordingly), the network's ``probs`` output.
        grid_disp: ``(G_i, G_j, G_k, 3)`` expected displacement, normalised units.
        disp_size, capture: ``L`` and ``q`` of the model (``pddnet.config``).
        options: :class:`RefineOptions` (default: 50 steps, lr 0.02, lam 1.5).
    """
    opts = options or RefineOptions()
    t0 = time.perf_counter()
    g = np.asarray(grid_disp)
    if g.ndim != 4 or g.shape[-1] != 3:
        raise PddnetError(f"instance_optimise: grid_disp must be (G_i, G_j, G_k, 3), got "
                          f"{g.shape}")
    p = np.asarray(probs)
    if p.shape[:3] != g.shape[:3] or p.shape[-1] != disp_size ** 3:
        raise PddnetError(f"instance_optimise: probs {p.shape} does not match grid_disp "
                          f"{g.shape} and L^3 = {disp_size ** 3}")
    theta = g.astype(np.float64)
    mats = [smoothing_matrix(n) for n in theta.shape[:3]]
    adam = Adam(opts.lr, opts.betas, opts.eps)
    e0 = d0 = None
    for _ in range(opts.steps):
        e, d, _, gr = energy(theta, p, disp_size, capture, opts.weight, mats=mats, grad=True)
        if e0 is None:
            e0, d0 = e, d
        adam.step(theta, gr)
    e1, d1, _ = energy(theta, p, disp_size, capture, opts.weight, mats=mats)
    if e0 is None:
        e0, d0 = e1, d1
    out = _apply_axes(theta, mats).astype(np.float32)
    return RefineResult(out, [e0, e1], [d0, d1], opts.steps, (time.perf_counter() - t0) * 1e3,
                        opts.as_dict())


# --------------------------------------------------------------------------------------------
# Fields: upsampling and composition
# --------------------------------------------------------------------------------------------

def interp_matrix(n_out: int, n_in: int) -> np.ndarray:
    """``(n_out, n_in)`` float32: linear interpolation at the cell centres of ``n_out`` cells
    from ``n_in`` cells over the same extent (``align_corners=False``, border clamp)."""
    v = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0.0, n_in - 1)
    return np.maximum(0.0, 1.0 - np.abs(v[:, None] - np.arange(n_in)[None, :])).astype(np.float32)


def to_voxels(grid_disp: np.ndarray, image_shape) -> np.ndarray:
    """Control-grid field (normalised) -> ``(*image_shape, 3)`` float32 in voxels.

    Trilinear upsampling with ``align_corners=False`` (the exported graph's ``disp``, PyTorch
    ``interpolate(mode="trilinear")``), then times ``n / 2`` per axis; as in the exported
    graph, one interpolation matrix per axis (three matrix products).
    """
    ni, nj, nk = (int(n) for n in image_shape)
    g = np.asarray(grid_disp, np.float32)
    gi, gj, gk = g.shape[:3]
    ui, uj, uk = interp_matrix(ni, gi), interp_matrix(nj, gj), interp_matrix(nk, gk)
    x = np.ascontiguousarray(g.transpose(3, 0, 1, 2))                  # (3, gi, gj, gk)
    x = (ui @ x.reshape(3, gi, gj * gk)).reshape(3 * ni, gj, gk)      # (3 ni, gj, gk)
    x = (uj @ x) @ uk.T                                               # (3 ni, nj, nk)
    x *= np.repeat(np.asarray([ni, nj, nk], np.float32) / 2.0, ni)[:, None, None]
    return np.ascontiguousarray(x.reshape(3, ni, nj, nk).transpose(1, 2, 3, 0))


def compose(u1: np.ndarray, u2: np.ndarray) -> np.ndarray:
    """``u(x) = u2(x) + u1(x + u2(x))`` for fields ``(I, J, K, 3)`` in voxels of one grid.

    ``u1`` is sampled trilinearly with border clamping (``resample.warp``), so
    ``moving(x + u(x))`` is ``m1(x + u2(x))`` with ``m1(y) = moving(y + u1(y))``.
    """
    from pddnet.runtime.resample import warp

    u1 = np.asarray(u1, np.float32)
    u2 = np.asarray(u2, np.float32)
    if u1.shape != u2.shape or u1.ndim != 4 or u1.shape[-1] != 3:
        raise PddnetError(f"compose: fields must both be (I, J, K, 3), got {u1.shape} and "
                          f"{u2.shape}")
    out = np.empty_like(u2)
    for a in range(3):
        out[..., a] = u2[..., a] + warp(np.ascontiguousarray(u1[..., a]), u2, order=1)
    return out
