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

Refinement on image evidence (method ``features``, the default)
---------------------------------------------------------------
Given the fixed and moving scans' features ``f``, ``m`` ``(C, n_i, n_j, n_k)`` (the feature
network's outputs, on a third of the image grid) and the network's field ``E``:

* **Normalisation.** Both maps are divided by ``s_c``, the fixed map's per-channel population
  standard deviation over the grid (floored at 1e-6), and projected on the ``k`` leading
  eigenvectors of the normalised fixed map's channel covariance (``components``; the SSD is
  measured in those ``k`` channels, which also makes a step ``C / k`` times cheaper).
* **Parameters and field.** ``theta`` ``(n_i, n_j, n_k, 3)`` normalised units, initialised to
  ``E`` upsampled to the feature grid (trilinear, ``align_corners=False``); ``u = S(theta)``.
* **Energy.** ``mean_{x,c} (f_c(x) - m_c(x + u(x)))^2 + lam * sum_a mean((D_a w)^2)`` with
  ``m`` sampled trilinearly with border clamping (``align_corners=False``) and ``w = u * n / 2``
  the field in feature voxels. Adam as above; the result ``S(theta)`` is upsampled to the image
  by :func:`to_voxels`.
* **Gradient.** At feature voxel ``x`` the sample point is ``v = x + u n / 2`` (feature voxels);
  ``d data / d v_a = (2 / (N C)) sum_c r_c d m_c / d v_a`` with ``r = m(v) - f``, zero along an
  axis where ``v_a`` is clamped (``v_a <= 0`` or ``>= n_a - 1``, as PyTorch's border padding);
  ``d m / d v_a`` is the difference of the corner values along ``a`` weighted by the other two
  axes' weights. The eight corners are row gathers of the channels-last moving map.
* **Implementations.** The Adam loop runs in C (``pddnet.backends.native.feature_refine``,
  double precision, the same operations) where the kernel library is built and
  ``PDDNET_NATIVE`` is not ``off``, else in numpy (:func:`feature_loop_numpy`);
  :attr:`RefineResult.impl` says which.

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


_TAPS = np.array([1.0, 2.0, 3.0, 2.0, 1.0]) / 9.0


def _smooth_axis(x: np.ndarray, axis: int) -> np.ndarray:
    # replicate padding by 2 then the valid 5-tap filter is scipy's "nearest" mode
    from scipy.ndimage import correlate1d

    return correlate1d(x, _TAPS, axis=axis, mode="nearest")


def _smooth_t_axis(x: np.ndarray, axis: int) -> np.ndarray:
    # the transpose: the same (symmetric) filter with zeros outside, plus what the padding
    # took from the two end elements folded back: entries -2, -1 (n, n + 1) of the padded
    # signal were copies of element 0 (n - 1), read by taps (0, 1) of output 0 and tap 0 of
    # output 1 (taps 3, 4 of output n - 1 and tap 4 of output n - 2)
    from scipy.ndimage import correlate1d

    n = x.shape[axis]
    out = correlate1d(x, _TAPS, axis=axis, mode="constant")
    xm, om = np.moveaxis(x, axis, 0), np.moveaxis(out, axis, 0)
    om[0] += (_TAPS[0] + _TAPS[1]) * xm[0] + _TAPS[0] * xm[min(1, n - 1)] * (n > 1)
    om[n - 1] += (_TAPS[3] + _TAPS[4]) * xm[n - 1] + _TAPS[4] * xm[max(n - 2, 0)] * (n > 1)
    return out


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
    """What :func:`instance_optimise` and :func:`feature_optimise` return.

    Attributes:
        grid_disp: float32 refined field ``S(theta)``, normalised units: ``(G_i, G_j, G_k, 3)``
            on the control grid (``probs``) or ``(n_i, n_j, n_k, 3)`` on the feature grid
            (``features``).
        energy: ``[E before the first step, E after the last]`` (float).
        data: the data term before and after (``-mean P``, or the normalised feature SSD).
        steps: number of Adam steps taken.
        ms: wall time in milliseconds.
        method: ``"probs"`` or ``"features"``.
        impl: which loop ran: ``"numpy"`` or ``"c"`` (``features`` only, the kernel library).
        impl_reason: why not ``"c"`` (``None`` when it ran, and for ``probs``).
    """

    grid_disp: np.ndarray
    energy: list[float]
    data: list[float]
    steps: int
    ms: float
    options: dict[str, Any] = field(default_factory=dict)
    method: str = "probs"
    impl: str = "numpy"
    impl_reason: str | None = None

    def describe(self) -> dict[str, Any]:
        evidence = ({"mean_probability": [-d for d in self.data]} if self.method == "probs"
                    else {"feature_ssd": list(self.data)})
        impl = {"impl": self.impl}
        if self.method == "features" and self.impl_reason is not None:
            impl["impl_reason"] = self.impl_reason
        return {"method": self.method, **impl, "steps": self.steps, "energy": self.energy,
                **evidence,
                "grid": list(self.grid_disp.shape[:3]), "ms": round(self.ms, 3),
                "options": self.options}


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
    opts = options or RefineOptions(method="probs")
    if opts.method != "probs":
        raise PddnetError(f"instance_optimise fits the probabilities; options.method is "
                          f"{opts.method!r} (use feature_optimise)")
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
                        opts.as_dict(), "probs")


# --------------------------------------------------------------------------------------------
# Refinement on image evidence: the features of both scans
# --------------------------------------------------------------------------------------------
#: floor of the per-channel feature scale (``pddnet.model.refine.FEATURE_SCALE_FLOOR``)
FEATURE_SCALE_FLOOR = 1e-6

# corner c = 4 a + 2 b + d of a cell: its offset along each axis (a, b, d) in {0, 1}
_CORNERS = np.array([[a, b, d] for a in (0, 1) for b in (0, 1) for d in (0, 1)])


def feature_scale(fixed: np.ndarray) -> np.ndarray:
    """``(C,)`` float64: per-channel population standard deviation of ``(C, n_i, n_j, n_k)``
    features over the grid, floored at :data:`FEATURE_SCALE_FLOOR`."""
    f = np.asarray(fixed, np.float64).reshape(fixed.shape[0], -1)
    return np.maximum(f.std(axis=1), FEATURE_SCALE_FLOOR)


def feature_basis(fixed: np.ndarray, components: int) -> np.ndarray:
    """``(k, C)``: eigenvectors of the ``k = min(components, C)`` largest eigenvalues of the
    channel covariance of normalised ``(C, n_i, n_j, n_k)`` fixed features (signs arbitrary:
    the SSD does not depend on them)."""
    c = fixed.shape[0]
    x = np.asarray(fixed, np.float64).reshape(c, -1)
    x = x - x.mean(axis=1, keepdims=True)
    _, vecs = np.linalg.eigh(x @ x.T / x.shape[1])
    return vecs[:, -min(int(components), c):].T[::-1]


def feature_inputs(fixed: np.ndarray, moving: np.ndarray, components: int) -> tuple[
        np.ndarray, np.ndarray]:
    """Both ``(C, n_i, n_j, n_k)`` maps divided by :func:`feature_scale` of the fixed one and
    projected on :func:`feature_basis`: ``(k, n_i, n_j, n_k)`` float64 each."""
    s = feature_scale(fixed)[:, None, None, None]
    f = np.asarray(fixed, np.float64) / s
    m = np.asarray(moving, np.float64) / s
    basis = feature_basis(f, components)
    c = f.shape[0]
    return ((basis @ f.reshape(c, -1)).reshape(-1, *f.shape[1:]),
            (basis @ m.reshape(c, -1)).reshape(-1, *m.shape[1:]))


class FeatureSampler:
    """``m(x + u(x))`` on the feature grid, the SSD to ``f`` and its gradient in ``u``.

    Args:
        fixed, moving: ``(k, n_i, n_j, n_k)`` from :func:`feature_inputs`.

    Both are kept channels-last, ``(N, k)`` rows, so the eight trilinear corners of every
    sample are one row gather; the corner weights and the per-corner dot products with the
    residual are ``(2, 2, 2, N)`` arrays (one ``einsum`` each).
    """

    def __init__(self, fixed: np.ndarray, moving: np.ndarray):
        if fixed.shape != moving.shape or fixed.ndim != 4:
            raise PddnetError(f"FeatureSampler: features must both be (k, n_i, n_j, n_k), got "
                              f"{fixed.shape} and {moving.shape}")
        c, *shape = fixed.shape
        if min(shape) < 2:
            raise PddnetError(f"FeatureSampler: the feature grid {shape} needs >= 2 points per "
                              "axis")
        self.shape = tuple(int(n) for n in shape)
        self.n = np.asarray(self.shape, np.float64)
        self.fixed = np.ascontiguousarray(np.moveaxis(fixed, 0, -1).reshape(-1, c), np.float64)
        self.moving = np.ascontiguousarray(np.moveaxis(moving, 0, -1).reshape(-1, c),
                                           np.float64)
        ni, nj, nk = self.shape
        self.strides = np.array([nj * nk, nk, 1], np.int64)
        self.offsets = (_CORNERS @ self.strides).reshape(2, 2, 2, 1)           # corner a, b, d
        grid = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in self.shape], indexing="ij")
        self.base = np.stack(grid).reshape(3, -1)                               # (3, N) centres
        self._gather = np.empty((2, 2, 2, self.fixed.shape[0], c))

    def __call__(self, u: np.ndarray, *, grad: bool = False):
        """``data = mean_{x,c} (m(x + u(x)) - f)^2`` for ``u`` ``(N, 3)`` normalised (and
        ``d data / d u`` ``(N, 3)``). Per-axis work is on ``(3, N)`` rows."""
        half = self.n[:, None] / 2.0
        top = self.n[:, None] - 1.0
        v = self.base + np.ascontiguousarray(u.T) * half                       # feature voxels
        vc = np.clip(v, 0.0, top)
        i0 = np.minimum(np.floor(vc), top - 1.0)
        frac = vc - i0
        w = np.stack([1.0 - frac, frac])                                        # (2, 3, N)
        wi, wj, wk = w[:, 0], w[:, 1], w[:, 2]                                  # (2, N) each
        weights = wi[:, None, None] * (wj[:, None] * wk[None])[None]            # (2, 2, 2, N)
        lin = self.strides @ i0.astype(np.int64)
        corners = np.take(self.moving, lin + self.offsets, axis=0, out=self._gather,
                          mode="clip")                                          # (2,2,2,N,k)
        r = np.einsum("abcnk,abcn->nk", corners, weights)
        r -= self.fixed
        scale = 1.0 / r.size
        data = float(np.einsum("nk,nk->", r, r)) * scale
        if not grad:
            return data
        d = np.einsum("abcnk,nk->abcn", corners, r)                             # (2, 2, 2, N)
        g = np.stack([np.einsum("bcn,bn,cn->n", d[1] - d[0], wj, wk),
                      np.einsum("acn,an,cn->n", d[:, 1] - d[:, 0], wi, wk),
                      np.einsum("abn,an,bn->n", d[:, :, 1] - d[:, :, 0], wi, wj)])
        g *= (2.0 * scale) * half
        g *= (v > 0.0) & (v < top)                                              # border: no slope
        return data, g.T


def feature_energy(theta: np.ndarray, sampler: FeatureSampler, weight: float, *,
                   grad: bool = False):
    """The feature refinement energy of ``theta`` ``(n_i, n_j, n_k, 3)`` (and ``dE/dtheta``).

    Returns ``(E, data, smoothness)`` or ``(E, data, smoothness, dE/dtheta)``: ``data`` the
    normalised feature SSD, ``smoothness`` the unweighted diffusion of ``u`` in feature voxels.
    """
    u = _apply_axes(theta)
    half = sampler.n / 2.0
    if grad:
        data, du = sampler(u.reshape(-1, 3), grad=True)
        reg, dreg = diffusion(u * half, grad=True)
    else:
        data = sampler(u.reshape(-1, 3))
        reg = diffusion(u * half)
    e = data + weight * reg
    if not grad:
        return e, data, reg
    du = du.reshape(u.shape) + (weight * half) * dreg
    return e, data, reg, _apply_axes(du, transpose=True)


def feature_optimise(fixed_features: np.ndarray, moving_features: np.ndarray,
                     grid_disp: np.ndarray, options: RefineOptions | None = None, *,
                     impl: str | None = None, threads: int = 1) -> RefineResult:
    """Refine the network's field against the two scans' features (module docstring).

    Args:
        fixed_features, moving_features: ``(1, C, n_i, n_j, n_k)`` or ``(C, n_i, n_j, n_k)``,
            the feature network's outputs (``PairRun.fixed_features`` / ``moving_features``).
        grid_disp: ``(G_i, G_j, G_k, 3)`` the network's field, normalised units.
        options: :class:`RefineOptions` with ``method="features"`` (the default method).
        impl: ``None``/``"auto"``: the C loop of the kernel library
            (``pddnet.backends.native.feature_refine``, double precision, the same numbers to
            ~1e-12) where it is built and ``PDDNET_NATIVE`` is not ``off``, else numpy
            (:func:`feature_loop_numpy`); ``"c"`` or ``"numpy"`` to force one.
        threads: threads of the C loop (its results do not depend on it).

    Returns:
        :class:`RefineResult` with the refined field on the feature grid; ``impl`` says which
        loop ran (``impl_reason`` why not C).
    """
    opts = options or RefineOptions(method="features")
    if opts.method != "features":
        raise PddnetError(f"feature_optimise fits the features; options.method is "
                          f"{opts.method!r} (use instance_optimise)")
    t0 = time.perf_counter()
    f, m = (np.asarray(x) for x in (fixed_features, moving_features))
    if f.ndim == 5 and f.shape[0] == 1:
        f = f[0]
    if m.ndim == 5 and m.shape[0] == 1:
        m = m[0]
    if f.shape != m.shape or f.ndim != 4:
        raise PddnetError(f"feature_optimise: fixed and moving features must both be "
                          f"(1, C, n_i, n_j, n_k), got {np.shape(fixed_features)} and "
                          f"{np.shape(moving_features)}")
    g = np.asarray(grid_disp)
    if g.ndim != 4 or g.shape[-1] != 3:
        raise PddnetError(f"feature_optimise: grid_disp must be (G_i, G_j, G_k, 3), got "
                          f"{g.shape}")
    sampler = FeatureSampler(*feature_inputs(f, m, opts.components))
    theta = upsample(g, sampler.shape)
    use, why = _native_refine(impl)
    if use:
        from pddnet.backends import native

        u, energies, data = native.feature_refine(
            sampler.fixed, sampler.moving, theta, steps=opts.steps, lr=opts.lr,
            betas=opts.betas, eps=opts.eps, weight=opts.weight, threads=threads)
    else:
        u, energies, data = feature_loop_numpy(sampler, theta, opts)
    out = u.astype(np.float32)
    return RefineResult(out, energies, data, opts.steps, (time.perf_counter() - t0) * 1e3,
                        opts.as_dict(), "features", "c" if use else "numpy", why)


def _native_refine(impl: str | None) -> tuple[bool, str | None]:
    """Whether the C loop runs: ``impl`` ``None``/``"auto"`` where the library is loaded and
    ``PDDNET_NATIVE`` is not ``off``, ``"c"`` (required: raises where it cannot run), or
    ``"numpy"``. Returns ``(use C, why not)``."""
    if impl == "numpy":
        return False, "asked for numpy"
    if impl not in (None, "auto", "c"):
        raise PddnetError(f"feature_optimise: impl must be 'auto', 'c' or 'numpy', got {impl!r}")
    from pddnet.backends import native

    ok, why = native.refine_status()
    if impl == "c" and not ok:
        raise PddnetError(f"feature_optimise: the C refinement cannot run: {why}")
    return ok, why


def feature_loop_numpy(sampler: FeatureSampler, theta: np.ndarray, opts: RefineOptions
                       ) -> tuple[np.ndarray, list[float], list[float]]:
    """The numpy Adam loop of :func:`feature_optimise` from ``theta`` (copied): ``(S(theta)
    float64, [E before, E after], [data before, data after])``. The C loop
    (``pddnet.backends.native.feature_refine``) computes the same."""
    theta = np.array(theta, np.float64)
    adam = Adam(opts.lr, opts.betas, opts.eps)
    e0 = d0 = None
    for _ in range(opts.steps):
        e, d, _, gr = feature_energy(theta, sampler, opts.weight, grad=True)
        if e0 is None:
            e0, d0 = e, d
        adam.step(theta, gr)
    e1, d1, _ = feature_energy(theta, sampler, opts.weight)
    if e0 is None:
        e0, d0 = e1, d1
    return _apply_axes(theta), [e0, e1], [d0, d1]


# --------------------------------------------------------------------------------------------
# Fields: upsampling and composition
# --------------------------------------------------------------------------------------------

def interp_matrix(n_out: int, n_in: int, dtype=np.float32) -> np.ndarray:
    """``(n_out, n_in)``: linear interpolation at the cell centres of ``n_out`` cells from
    ``n_in`` cells over the same extent (``align_corners=False``, border clamp)."""
    v = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0.0, n_in - 1)
    return np.maximum(0.0, 1.0 - np.abs(v[:, None] - np.arange(n_in)[None, :])).astype(dtype)


def upsample(grid_disp: np.ndarray, shape) -> np.ndarray:
    """``(G_i, G_j, G_k, C)`` -> ``(*shape, C)`` float64, trilinear with ``align_corners=False``
    (PyTorch ``interpolate(mode="trilinear")``), no change of units."""
    g = np.asarray(grid_disp, np.float64)
    mats = [interp_matrix(int(n), g.shape[a], np.float64) for a, n in enumerate(shape)]
    return np.einsum("ai,bj,ck,ijkd->abcd", *mats, g, optimize=True)


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
