"""Reference implementations (PyTorch, differentiable) of every PDD-Net building block.

Each function here is the definition that the ONNX function bodies (``pddnet.export.ops``), the
Triton kernels of the TensorRT plugins and the torch-free runtime are tested against; the
specs are written out in ``docs/ops.md``. They favour clarity over speed.

Conventions (``docs/conventions.md``): tensors are ``(N, C, i, j, k)``; coordinates are
normalised with ``align_corners=False`` and listed in array-axis order ``(i, j, k)``;
sampling is trilinear with border padding.

Shapes used below: ``G = (G_i, G_j, G_k)`` control grid, ``L`` displacements per axis,
``C`` feature channels.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools

import torch
import torch.nn.functional as F

from pddnet.errors import PddnetError

Tensor = torch.Tensor


# --------------------------------------------------------------------------------------------
# Coordinates
# --------------------------------------------------------------------------------------------

def cell_centres(n: int, *, dtype=torch.float32, device=None) -> Tensor:
    """Normalised coordinates ``(2 v + 1) / n - 1`` of the ``n`` voxel centres along one axis."""
    v = torch.arange(n, dtype=dtype, device=device)
    return (2.0 * v + 1.0) / n - 1.0


def identity_grid(shape, *, dtype=torch.float32, device=None) -> Tensor:
    """``(*shape, 3)`` normalised coordinates of the cell centres of a regular 3D grid."""
    axes = [cell_centres(int(n), dtype=dtype, device=device) for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)


def displacement_set(disp_size: int, capture: float, *, dtype=torch.float32,
                     device=None) -> Tensor:
    """``(L, L, L, 3)`` candidate displacements: ``-q + 2 q d / (L - 1)`` per axis (normalised)."""
    d = torch.linspace(-capture, capture, disp_size, dtype=dtype, device=device)
    return torch.stack(torch.meshgrid(d, d, d, indexing="ij"), dim=-1)


def normalised_to_voxels(field: Tensor, shape) -> Tensor:
    """Scale a ``(..., 3)`` normalised displacement to voxels of a grid of ``shape``."""
    scale = torch.tensor([n / 2.0 for n in shape], dtype=field.dtype, device=field.device)
    return field * scale


# --------------------------------------------------------------------------------------------
# 3D grid sampling
# --------------------------------------------------------------------------------------------

def grid_sample3d(x: Tensor, coords: Tensor, *, mode: str = "bilinear") -> Tensor:
    """Sample ``x`` at normalised coordinates, trilinear (or nearest) with border padding.

    Args:
        x: ``(N, C, I, J, K)``.
        coords: ``(N, *S, 3)`` normalised coordinates in array order ``(i, j, k)``,
            ``align_corners=False``; any number of sample dimensions ``S``.
        mode: ``"bilinear"`` (trilinear for 3D) or ``"nearest"``.

    Returns:
        ``(N, C, *S)``.
    """
    if x.dim() != 5 or coords.shape[-1] != 3 or coords.shape[0] != x.shape[0]:
        raise PddnetError(f"grid_sample3d: expected x (N,C,I,J,K) and coords (N,...,3), got "
                         f"{tuple(x.shape)} and {tuple(coords.shape)}")
    sample_shape = coords.shape[1:-1]
    grid = coords.reshape(coords.shape[0], -1, 1, 1, 3).flip(-1)  # torch wants (k, j, i)
    out = F.grid_sample(x, grid, mode=mode, padding_mode="border", align_corners=False)
    return out.reshape(*x.shape[:2], *sample_shape)


def interp_weights(positions: Tensor, n: int) -> Tensor:
    """Trilinear interpolation weights along one axis, as a matrix.

    ``W[..., p, v] = max(0, 1 - |clamp(x_p, 0, n - 1) - v|)`` where ``x_p`` is the voxel
    coordinate of the normalised ``positions[..., p]``. Sampling a signal ``s`` of length
    ``n`` at the positions is ``W @ s``, identical to 1D linear ``grid_sample`` with border
    padding and ``align_corners=False``; the weights are differentiable in the positions.

    Args:
        positions: ``(..., P)`` normalised coordinates.
        n: number of voxels along the axis.

    Returns:
        ``(..., P, n)``.
    """
    v = ((positions + 1.0) * n - 1.0) / 2.0
    v = v.clamp(0.0, n - 1.0)
    idx = torch.arange(n, dtype=positions.dtype, device=positions.device)
    return (1.0 - (v.unsqueeze(-1) - idx).abs()).clamp_min(0.0)


def lattice_sample(x: Tensor, pos_i: Tensor, pos_j: Tensor, pos_k: Tensor) -> Tensor:
    """Trilinear sampling of ``x`` at every point of a tensor-product lattice.

    Sampling at ``(pos_i[p], pos_j[q], pos_k[r])`` for all ``p, q, r`` is separable, so it is
    three small matrix products instead of a gather per point; the result equals
    :func:`grid_sample3d` at those points.

    Args:
        x: ``(N, C, I, J, K)``.
        pos_i, pos_j, pos_k: ``(S, P_a)`` normalised positions per axis for each of ``S``
            lattices (``S`` may be 1).

    Returns:
        ``(N, C, S, P_i, P_j, P_k)``.
    """
    n, c, ni, nj, nk = x.shape
    wi, wj, wk = interp_weights(pos_i, ni), interp_weights(pos_j, nj), interp_weights(pos_k, nk)
    s, pi, pj, pk = wi.shape[0], wi.shape[1], wj.shape[1], wk.shape[1]
    y = wi[None] @ x.reshape(n * c, 1, ni, nj * nk)  # (NC, S, Pi, J*K)
    if s == 1:  # one lattice: fold Pi into the batch
        y = wj[0] @ y.reshape(n * c * pi, nj, nk)  # (NC*Pi, Pj, K)
        y = y @ wk[0].T
    else:
        y = wj[None, :, None] @ y.reshape(n * c, s, pi, nj, nk)  # (NC, S, Pi, Pj, K)
        y = y @ wk.transpose(1, 2)[None, :, None]
    return y.reshape(n, c, s, pi, pj, pk)


def deformable_sample(x: Tensor, offsets: Tensor, out_shape) -> Tensor:
    """OBELISK sampling: ``x`` on a regular grid of ``out_shape``, shifted by each offset.

    Args:
        x: ``(1, C, I, J, K)`` feature map.
        offsets: ``(S, 3)`` normalised offsets in array order (trainable in OBELISK).
        out_shape: ``(I', J', K')`` of the output grid (cell centres, ``align_corners=False``).

    Returns:
        ``(1, C * S, I', J', K')``; channel ``c * S + s`` is channel ``c`` sampled with offset
        ``s`` (the channel order of the authors' code).
    """
    if x.shape[0] != 1 or offsets.dim() != 2 or offsets.shape[1] != 3:
        raise PddnetError(f"deformable_sample: expected x (1,C,I,J,K) and offsets (S,3), got "
                         f"{tuple(x.shape)} and {tuple(offsets.shape)}")
    offsets = offsets.to(x.dtype)
    pos = [cell_centres(int(n), dtype=x.dtype, device=x.device)[None, :] + offsets[:, a, None]
           for a, n in enumerate(out_shape)]
    return lattice_sample(x, *pos).reshape(1, -1, *out_shape)


# --------------------------------------------------------------------------------------------
# Correlation layer
# --------------------------------------------------------------------------------------------

def control_features(feat: Tensor, grid) -> Tensor:
    """Features sampled trilinearly at the control points: ``(1, C, *grid)``."""
    pos = [cell_centres(int(g), dtype=feat.dtype, device=feat.device)[None] for g in grid]
    return lattice_sample(feat, *pos)[:, :, 0]


def correlation(feat_fixed: Tensor, feat_moving: Tensor, grid, disp_size: int,
                capture: float, *, max_elems: int = 1 << 27) -> Tensor:
    """Sum of squared feature differences for every control point and displacement.

    ``D(k, d) = sum_c (f_c(F)(x_k) - f_c(M)(x_k + d))^2`` with both feature maps sampled
    trilinearly (border padding) at the control points ``x_k`` and the displaced points.
    The displaced points ``x_k + d`` form a tensor-product lattice (per axis: every control
    coordinate plus every displacement), so the moving features are sampled with
    :func:`lattice_sample`, in slabs of control-grid slices along ``i`` to bound memory.

    Args:
        feat_fixed, feat_moving: ``(1, C, I, J, K)`` feature maps on the same grid.
        grid: control grid ``(G_i, G_j, G_k)``.
        disp_size, capture: ``L`` and ``q`` of the displacement set.
        max_elems: upper bound on the sampled moving features held at once.

    Returns:
        ``(G_i, G_j, G_k, L, L, L)``.
    """
    if feat_fixed.shape != feat_moving.shape or feat_fixed.dim() != 5 or feat_fixed.shape[0] != 1:
        raise PddnetError(f"correlation: feature maps must both be (1,C,I,J,K); got "
                         f"{tuple(feat_fixed.shape)} and {tuple(feat_moving.shape)}")
    grid = tuple(int(g) for g in grid)
    n_ch, L = feat_fixed.shape[1], disp_size
    kw = dict(dtype=feat_fixed.dtype, device=feat_fixed.device)
    disp = torch.linspace(-capture, capture, L, **kw)
    # (G_a, L) positions x_k + d per axis
    pos = [(cell_centres(g, **kw)[:, None] + disp[None, :]) for g in grid]
    fixed = control_features(feat_fixed, grid)[0]  # (C, Gi, Gj, Gk)
    per_slice = n_ch * L * grid[1] * L * grid[2] * L
    step = max(1, min(grid[0], max_elems // per_slice))
    slabs = []
    for i0 in range(0, grid[0], step):
        gi = min(step, grid[0] - i0)
        m = lattice_sample(feat_moving, pos[0][i0:i0 + gi].reshape(1, -1),
                           pos[1].reshape(1, -1), pos[2].reshape(1, -1))
        m = m.reshape(n_ch, gi, L, grid[1], L, grid[2], L)
        f = fixed[:, i0:i0 + gi, None, :, None, :, None]
        slabs.append(_ChannelSSD.apply(f, m).permute(0, 2, 4, 1, 3, 5))
    return torch.cat(slabs, 0)


class _ChannelSSD(torch.autograd.Function):
    """``sum_c (f_c - m_c)^2`` over the leading axis, ``f`` broadcast against ``m``.

    Computed one channel at a time in both directions: several times faster on CPUs than one
    broadcast expression, and the backward pass needs no per-channel autograd graph.
    """

    @staticmethod
    def forward(ctx, f: Tensor, m: Tensor) -> Tensor:
        ctx.save_for_backward(f, m)
        out = torch.zeros(torch.broadcast_shapes(f.shape[1:], m.shape[1:]), dtype=m.dtype,
                          device=m.device)
        for fc, mc in zip(f, m):
            out.add_((fc - mc).square_())
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        f, m = ctx.saved_tensors
        grad_f = torch.empty_like(f) if ctx.needs_input_grad[0] else None
        grad_m = torch.empty_like(m) if ctx.needs_input_grad[1] else None
        for c, (fc, mc) in enumerate(zip(f, m)):
            g = (fc - mc).mul_(grad).mul_(2.0)  # d/df_c
            if grad_f is not None:
                grad_f[c] = _sum_to(g, fc.shape)
            if grad_m is not None:
                torch.neg(g, out=grad_m[c])
        return grad_f, grad_m


def _sum_to(x: Tensor, shape) -> Tensor:
    """Reduce a broadcast result back to ``shape``."""
    dims = [i for i, (a, b) in enumerate(zip(x.shape, shape)) if b == 1 and a != 1]
    return x.sum(dim=dims, keepdim=True) if dims else x


# --------------------------------------------------------------------------------------------
# Regularisation: min-convolution over displacements, message passing over the grid
# --------------------------------------------------------------------------------------------

def smoothing_matrix(n: int, *, dtype=torch.float32, device=None) -> Tensor:
    """``(n, n)`` matrix of one axis of :func:`smooth3`.

    Built by applying its definition (replicate-pad by 2, then two valid 3-averages, as the
    authors' ``ReplicationPad3d(2)`` + ``AvgPool3d(3, 1)`` twice) to the identity, so each
    row holds the weights of one output (5 non-zeros, ``[1, 2, 3, 2, 1] / 9`` inside).
    """
    return _smoothing_matrix64(int(n)).to(dtype=dtype, device=device, copy=True)


@functools.lru_cache(maxsize=64)
def _smoothing_matrix64(n: int) -> Tensor:
    """:func:`smoothing_matrix` in float64, built once per size (a training step asks for it
    twelve times; building it costs more than applying it at the ``small`` preset)."""
    eye = torch.eye(n, dtype=torch.float64).unsqueeze(1)  # (n signals, 1, n)
    v = F.pad(eye, (2, 2), mode="replicate")
    v = F.avg_pool1d(F.avg_pool1d(v, 3, stride=1), 3, stride=1)
    return v[:, 0, :].T.contiguous()


def _along(x: Tensor, matrix: Tensor, axis: int) -> Tensor:
    """Apply ``matrix`` (out, in) along ``axis`` of ``x`` (a batched matmul, no transposes)."""
    axis = axis % x.dim()
    n = x.shape[axis]
    pre = int(torch.tensor(x.shape[:axis]).prod()) if axis else 1
    if axis == x.dim() - 1:
        return (x.reshape(pre, n) @ matrix.T).reshape(*x.shape[:axis], matrix.shape[0])
    y = matrix @ x.reshape(pre, n, -1)
    return y.reshape(*x.shape[:axis], matrix.shape[0], *x.shape[axis + 1:])


def smooth3(x: Tensor) -> Tensor:
    """Two 3x3x3 average poolings over the last three axes after replicate padding by 2.

    The size is preserved. The operation is linear and separable, so it is applied as one
    :func:`smoothing_matrix` product per axis.
    """
    for axis in (-3, -2, -1):
        x = _along(x, smoothing_matrix(x.shape[axis], dtype=x.dtype, device=x.device), axis)
    return x


def minpool3(x: Tensor) -> Tensor:
    """3x3x3 min-pooling over the last three axes, stride 1, replicate padding (size kept).

    With replicate padding the minimum over a border window equals the minimum over the
    window clipped to the volume (``-max_pool3d(-x, 3, 1, padding=1)``). The box minimum is
    separable: a 3-neighbour minimum along each axis in turn.

    The values are those of :func:`minpool3_direct`. When a gradient is recorded (and
    :func:`fast_gradients` is on), :func:`minpool3_pooled` computes them, for its cheaper
    backward pass.
    """
    if torch.is_grad_enabled() and x.requires_grad and _FAST.get():
        return minpool3_pooled(x)
    return minpool3_direct(x)


def minpool3_direct(x: Tensor) -> Tensor:
    """:func:`minpool3` written as its definition: replicate padding and six ``torch.minimum``
    (autograd splits the gradient between ties). The reference of the fast path."""
    v = F.pad(x.reshape(-1, 1, *x.shape[-3:]), (1, 1, 1, 1, 1, 1), mode="replicate")
    v = torch.minimum(torch.minimum(v[..., :-2], v[..., 1:-1]), v[..., 2:])
    v = torch.minimum(torch.minimum(v[..., :-2, :], v[..., 1:-1, :]), v[..., 2:, :])
    v = torch.minimum(torch.minimum(v[..., :-2, :, :], v[..., 1:-1, :, :]), v[..., 2:, :, :])
    return v.reshape(x.shape)


def minconv_approx(cost: Tensor) -> Tensor:
    """The paper's min-convolution over the last three (displacement) axes.

    Min-pooling (k3, s1, replicate pad) followed by two average poolings (k3, s1, replicate
    pad): :func:`smooth3` of :func:`minpool3`. The authors' code pads once by three before
    the min-pool instead; the two agree except within two layers of the displacement border.
    """
    return smooth3(minpool3(cost))


def minconv_exact(cost: Tensor, penalty: Tensor | float) -> Tensor:
    """Exact min-convolution with a quadratic penalty over the last three axes.

    ``y(d) = min_{d'} x(d') + p * ||d - d'||^2`` with ``d`` in displacement-lattice steps.
    The quadratic penalty is separable, so this is three 1D lower-envelope transforms
    (Felzenszwalb & Huttenlocher); here each is evaluated by its O(L^2) definition, which is
    exact and differentiable (the gradient flows to the minimising ``x(d')`` and to ``p``).
    """
    penalty = torch.as_tensor(penalty, dtype=cost.dtype, device=cost.device)
    out = cost
    for axis in (-3, -2, -1):
        out = _minconv_exact_1d(out, penalty, axis)
    return out


def _minconv_exact_1d(x: Tensor, penalty: Tensor, axis: int, max_elems: int = 1 << 26) -> Tensor:
    xm = x.movedim(axis, -1)
    n = xm.shape[-1]
    idx = torch.arange(n, dtype=x.dtype, device=x.device)
    quad = penalty * (idx[:, None] - idx[None, :]).square()  # (out i, in j)
    flat = xm.reshape(-1, n)
    rows = max(1, max_elems // (n * n))
    parts = [(flat[r:r + rows, None, :] + quad).amin(dim=-1) for r in range(0, flat.shape[0], rows)]
    return torch.cat(parts, 0).reshape(xm.shape).movedim(-1, axis)


def minconv(cost: Tensor, mode: str = "approx", penalty: Tensor | float | None = None) -> Tensor:
    """Dispatch to :func:`minconv_approx` or :func:`minconv_exact` (which needs ``penalty``)."""
    if mode == "approx":
        return minconv_approx(cost)
    if mode == "exact":
        if penalty is None:
            raise PddnetError("minconv(mode='exact') needs a penalty")
        return minconv_exact(cost, penalty)
    raise PddnetError(f"minconv: unknown mode {mode!r}")


def smooth_grid(cost: Tensor) -> Tensor:
    """Message passing over the control grid: :func:`smooth3` over the first three axes.

    ``cost`` is ``(G_i, G_j, G_k, L, L, L)``; each displacement is smoothed spatially.
    """
    for axis in (0, 1, 2):
        cost = _along(cost, smoothing_matrix(cost.shape[axis], dtype=cost.dtype,
                                             device=cost.device), axis)
    return cost


def mean_field_step(cost: Tensor, mode: str = "approx",
                    penalty: Tensor | float | None = None) -> Tensor:
    """One mean-field iteration: min-convolution over displacements, then grid smoothing."""
    return smooth_grid(minconv(cost, mode, penalty))


# --------------------------------------------------------------------------------------------
# Probabilities, displacement, warping
# --------------------------------------------------------------------------------------------

def displacement_probabilities(cost: Tensor, temperature: Tensor | float) -> Tensor:
    """``softmax(-a5 * cost)`` over the ``L^3`` displacements: ``(G_i, G_j, G_k, L^3)``."""
    flat = cost.reshape(*cost.shape[:3], -1)
    return torch.softmax(-temperature * flat, dim=-1)


def expected_displacement(probs: Tensor, disp_size: int, capture: float) -> Tensor:
    """``sum_d p(k, d) d``: ``(G_i, G_j, G_k, 3)`` in normalised units."""
    disp = displacement_set(disp_size, capture, dtype=probs.dtype, device=probs.device)
    return probs @ disp.reshape(-1, 3)


def displacement_entropy(probs: Tensor) -> Tensor:
    """Entropy (nats) of each control point's displacement distribution: ``(G_i, G_j, G_k)``."""
    return -(probs * torch.log(probs.clamp_min(1e-30))).sum(-1)


def upsample_field(field: Tensor, shape) -> Tensor:
    """Trilinear upsampling (``align_corners=False``) of ``(G_i, G_j, G_k, 3)`` to ``(*shape, 3)``."""
    v = field.permute(3, 0, 1, 2).unsqueeze(0)
    up = F.interpolate(v, size=tuple(int(n) for n in shape), mode="trilinear", align_corners=False)
    return up[0].permute(1, 2, 3, 0)


def dense_displacement(field: Tensor, shape) -> Tensor:
    """Control-grid field (normalised) to a full-resolution field in voxels: ``(*shape, 3)``."""
    return normalised_to_voxels(upsample_field(field, shape), shape)


def warp(moving: Tensor, disp_voxels: Tensor, *, mode: str = "bilinear") -> Tensor:
    """Backward warp: ``warped(x) = moving(x + u(x))``.

    Args:
        moving: ``(N, C, I, J, K)``.
        disp_voxels: ``(I, J, K, 3)`` displacement in voxels (array-axis order).
        mode: ``"bilinear"`` for images, ``"nearest"`` for label maps.
    """
    shape = moving.shape[2:]
    scale = torch.tensor([2.0 / n for n in shape], dtype=moving.dtype, device=moving.device)
    coords = identity_grid(shape, dtype=moving.dtype, device=moving.device) + disp_voxels * scale
    coords = coords.unsqueeze(0).expand(moving.shape[0], *coords.shape)
    return grid_sample3d(moving, coords, mode=mode)


# --------------------------------------------------------------------------------------------
# Fast paths for training (same values as the definitions above, cheaper gradients)
# --------------------------------------------------------------------------------------------
#
# The definitions above are the reference every other implementation is tested against. The
# functions below compute the same quantities in the separable form the ONNX bodies use (see
# docs/ops.md), so that a training step's backward pass touches no tensor larger than the cost
# volume. tests/model/test_fast_paths.py compares their values and gradients with the
# definitions (float64, fresh random inputs) and checks the custom Functions by finite
# differences.

_FAST = contextvars.ContextVar("pddnet_fast_gradients", default=True)


@contextlib.contextmanager
def fast_gradients(enabled: bool = True):
    """Switch the fast paths below on or off (on by default) within a ``with`` block.

    Off, :func:`minpool3` records the gradient of its definition (:func:`minpool3_direct`) and
    training (``pddnet.model.train``) computes the cost with :func:`correlation` and the label
    loss with its direct form: today's reference step, which the benchmark and the tests compare
    the fast step with.
    """
    token = _FAST.set(bool(enabled))
    try:
        yield
    finally:
        _FAST.reset(token)


def fast_gradients_enabled() -> bool:
    """Whether :func:`fast_gradients` is on (the default)."""
    return _FAST.get()


def lattice_weights(grid, disp_size: int, capture: float, shape, *, dtype=torch.float32,
                    device=None) -> list[Tensor]:
    """Interpolation matrices of the displaced control points ``x_g + d``, one per axis.

    Returns ``[W_i, W_j, W_k]`` with ``W_a`` of shape ``(G_a, L, n_a)``: row ``(g, d)`` holds the
    (two-tap) trilinear weights of position ``u_g + d`` on an axis of ``n_a`` voxels, where
    ``u_g`` is the control point's cell centre and ``d`` runs over the displacement steps.
    """
    disp = torch.linspace(-capture, capture, disp_size, dtype=dtype, device=device)
    return [interp_weights(cell_centres(int(g), dtype=dtype, device=device)[:, None] + disp,
                           int(n)) for g, n in zip(grid, shape)]


def sample_i(x: Tensor, wi: Tensor) -> Tensor:
    """Interpolate ``x`` ``(C, I, J, K)`` along ``i`` at displaced control points, channels last.

    ``wi`` ``(S, L, I)``: :func:`lattice_weights` of ``S`` control slices. Returns ``T1`` of
    shape ``(S, J, L, K, C)``: ``T1[s, v, a, k, c] = sum_u W_i[s, a, u] x[c, u, v, k]``.
    """
    c, ni, nj, nk = x.shape
    s, L = wi.shape[0], wi.shape[1]
    t1 = wi.reshape(s * L, ni) @ x.permute(1, 2, 3, 0).reshape(ni, nj * nk * c)
    return t1.reshape(s, L, nj, nk, c).transpose(1, 2)


def sample_j(t1: Tensor, wj: Tensor) -> Tensor:
    """Continue :func:`sample_i` along ``j`` with ``wj`` ``(G_j, L, J)``: ``T2`` of shape
    ``(S, G_j, L_j, L_i, K, C)``,
    ``T2[s, g, b, a, k, c] = sum_v W_j[g, b, v] T1[s, v, a, k, c]``.
    """
    s, nj = t1.shape[:2]
    t2 = wj.reshape(-1, nj) @ t1.reshape(s, nj, -1)  # (S, Gj*Lj, Li*K*C)
    return t2.reshape(s, *wj.shape[:2], *t1.shape[2:])


def two_taps(w: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The two taps of each row of interpolation weights ``w`` ``(G, L, n)`` (from
    :func:`interp_weights`): voxel indices ``e0, e1`` and weights ``w0, w1``, each ``(G, L)``,
    with ``w[g, d] @ s == w0 s[e0] + w1 s[e1]`` for any signal ``s``."""
    n = w.shape[-1]
    e0 = (w > 0).to(torch.uint8).argmax(-1).clamp_max(max(n - 2, 0))
    e1 = (e0 + 1).clamp_max(n - 1)
    w0 = w.gather(-1, e0[..., None])[..., 0]
    w1 = w.gather(-1, e1[..., None])[..., 0] * (e1 != e0)
    return e0, e1, w0, w1


def interpolate_blocks(z: Tensor, taps, scale: float = 1.0) -> Tensor:
    """``out[..., g, d] = scale * sum_e W[g, d, e] z[..., e, g]``: the last-axis interpolation
    of a tensor whose values differ per control point ``g`` (``z`` ``(..., K, G)``), with the
    :func:`two_taps` of ``W``; returns ``(..., G, L)``."""
    e0, e1, w0, w1 = taps
    g, n = e0.shape[0], z.shape[-2]
    col = torch.arange(g, device=z.device)[:, None]
    out = _TapGather.apply(z.reshape(-1, n * g), (e0 * g + col).reshape(-1),
                           (e1 * g + col).reshape(-1), scale * w0.reshape(-1),
                           scale * w1.reshape(-1))
    return out.reshape(*z.shape[:-2], g, e0.shape[1])


class _TapGather(torch.autograd.Function):
    """``out[r, q] = w0[q] x[r, i0[q]] + w1[q] x[r, i1[q]]`` for a 2D ``x``; the backward pass
    scatters into one zero-filled gradient (gradients for ``x`` only)."""

    @staticmethod
    def forward(ctx, x, i0, i1, w0, w1):
        ctx.save_for_backward(i0, i1, w0, w1)
        ctx.n = x.shape[1]
        out = x.index_select(1, i0).mul_(w0)
        return out.addcmul_(x.index_select(1, i1), w1)

    @staticmethod
    def backward(ctx, grad):
        i0, i1, w0, w1 = ctx.saved_tensors
        gx = grad.new_zeros(grad.shape[0], ctx.n)
        gx.index_add_(1, i0, grad * w0)
        gx.index_add_(1, i1, grad * w1)
        return gx, None, None, None, None


def spread_blocks(x: Tensor, taps, n: int) -> Tensor:
    """The adjoint of :func:`interpolate_blocks`: ``out[..., e, g] = sum_d W[g, d, e] x[..., g, d]``
    for ``x`` ``(..., G, L)`` and weights over ``n`` voxels; returns ``(..., n, G)``."""
    e0, e1, w0, w1 = taps
    g = e0.shape[0]
    col = torch.arange(g, device=x.device)[:, None]
    out = _TapScatter.apply(x.reshape(-1, x.shape[-2] * x.shape[-1]), (e0 * g + col).reshape(-1),
                            (e1 * g + col).reshape(-1), w0.reshape(-1), w1.reshape(-1), n * g)
    return out.reshape(*x.shape[:-2], n, g)


class _TapScatter(torch.autograd.Function):
    """``out[r, i0[q]] += w0[q] x[r, q]; out[r, i1[q]] += w1[q] x[r, q]`` into ``n`` zeroed
    columns (the adjoint of :class:`_TapGather`, which is its backward pass)."""

    @staticmethod
    def forward(ctx, x, i0, i1, w0, w1, n):
        ctx.save_for_backward(i0, i1, w0, w1)
        out = x.new_zeros(x.shape[0], n)
        out.index_add_(1, i0, x * w0)
        return out.index_add_(1, i1, x * w1)

    @staticmethod
    def backward(ctx, grad):
        i0, i1, w0, w1 = ctx.saved_tensors
        gx = grad.index_select(1, i0).mul_(w0)
        return gx.addcmul_(grad.index_select(1, i1), w1), None, None, None, None, None


class _NeighbourGram(torch.autograd.Function):
    """Channel Gram terms of neighbouring voxels of ``t`` ``(S, J, L, K, C)`` along ``J`` and
    ``K`` (sums over the last axis): ``a00 = sum t[v,e]^2``, ``a01 = sum t[v,e] t[v,e+1]``,
    ``a10 = sum t[v,e] t[v+1,e]``, ``a11 = sum t[v,e] t[v+1,e+1] + t[v,e+1] t[v+1,e]``. The
    backward pass accumulates into one gradient tensor."""

    @staticmethod
    def forward(ctx, t):
        ctx.save_for_backward(t)
        a00 = t.square().sum(-1)
        a01 = (t[..., :-1, :] * t[..., 1:, :]).sum(-1)
        a10 = (t[:, :-1] * t[:, 1:]).sum(-1)
        a11 = (t[:, :-1, :, :-1] * t[:, 1:, :, 1:] + t[:, :-1, :, 1:] * t[:, 1:, :, :-1]).sum(-1)
        return a00, a01, a10, a11

    @staticmethod
    def backward(ctx, g00, g01, g10, g11):
        (t,) = ctx.saved_tensors
        g = torch.zeros_like(t)
        if g00 is not None:
            g.addcmul_(g00[..., None], t, value=2.0)
        if g01 is not None:
            g01 = g01[..., None]
            g[..., :-1, :].addcmul_(g01, t[..., 1:, :])
            g[..., 1:, :].addcmul_(g01, t[..., :-1, :])
        if g10 is not None:
            g10 = g10[..., None]
            g[:, :-1].addcmul_(g10, t[:, 1:])
            g[:, 1:].addcmul_(g10, t[:, :-1])
        if g11 is not None:
            g11 = g11[..., None]
            g[:, :-1, :, :-1].addcmul_(g11, t[:, 1:, :, 1:])
            g[:, 1:, :, 1:].addcmul_(g11, t[:, :-1, :, :-1])
            g[:, :-1, :, 1:].addcmul_(g11, t[:, 1:, :, :-1])
            g[:, 1:, :, :-1].addcmul_(g11, t[:, :-1, :, 1:])
        return g


def correlation_separable(feat_fixed: Tensor, feat_moving: Tensor, grid, disp_size: int,
                          capture: float, *, max_elems: int = 1 << 26,
                          layout: str = "grid") -> Tensor:
    """:func:`correlation` in the separable, expanded form of the ONNX body (same values).

    ``D = |f|^2 - 2 f.m + |m|^2`` per control point ``g`` and displacement ``d``: the moving
    features are interpolated along ``i`` and ``j`` only (``T2``, :func:`sample_i`,
    :func:`sample_j`); the cross term contracts the channels with the fixed features before the
    last interpolation axis (:func:`interpolate_blocks`), and ``|m|^2`` is a quadratic form of
    the two-tap weights over the channel Gram terms of neighbouring voxels of ``T1``. The
    ``C x G^3 x L^3`` sampled moving features of the definition are never formed, in the
    forward pass or the backward pass. Equal to :func:`correlation` up to float rounding of the
    expansion (``~1e-6`` of ``max(cost)`` in float32).

    Slabs of control slices along ``i`` bound memory (``max_elems`` elements of ``T2`` per
    slab); with several slabs and gradients enabled, each slab's intermediates are recomputed
    in the backward pass instead of being kept.

    ``layout="grid"`` returns ``(G_i, G_j, G_k, L, L, L)`` like :func:`correlation`;
    ``"disp"`` the displacement-major ``(L, L, L, G_i, G_j, G_k)`` of
    :func:`mean_field_step_dmajor_neg`.
    """
    if feat_fixed.shape != feat_moving.shape or feat_fixed.dim() != 5 or feat_fixed.shape[0] != 1:
        raise PddnetError(f"correlation_separable: feature maps must both be (1,C,I,J,K); got "
                          f"{tuple(feat_fixed.shape)} and {tuple(feat_moving.shape)}")
    if layout not in ("grid", "disp"):
        raise PddnetError(f"correlation_separable: layout must be 'grid' or 'disp', got {layout!r}")
    # The intermediates T2 and the cross term's z scale with the size of the axis interpolated
    # last, T1 with those of the last two: below, "i, j, k" are the feature axes in decreasing
    # size (a view), and the output is permuted back in the one copy it is written with.
    order = sorted(range(3), key=lambda a: -int(feat_moving.shape[2 + a]))
    back = [order.index(a) for a in range(3)]  # where each original axis is in the order
    feat_fixed = feat_fixed.permute(0, 1, *[2 + a for a in order])
    feat_moving = feat_moving.permute(0, 1, *[2 + a for a in order])
    grid = tuple(int(grid[a]) for a in order)
    gj, gk = grid[1], grid[2]
    c, ni, nj, nk = feat_moving.shape[1:]
    L = int(disp_size)
    kw = dict(dtype=feat_moving.dtype, device=feat_moving.device)
    wi, wj, wk = lattice_weights(grid, L, capture, (ni, nj, nk), **kw)
    # (S, Gj, Lj, Li, Gk, Lk) of a slab -> (Li, Lj, Lk, Gi, Gj, Gk) or (Gi, ..., Lk), original axes
    lead, tail = (0, 1, 4), (3, 2, 5)  # the slab's G and L axes, in the order's axes
    g_axes, l_axes = [lead[back[a]] for a in range(3)], [tail[back[a]] for a in range(3)]
    out_axes = (*l_axes, *g_axes) if layout == "disp" else (*g_axes, *l_axes)
    taps = two_taps(wk)
    # |m|^2 along k: sum_e wk[e]^2 G0[e] + 2 wk[e] wk[e+1] G1[e], as one (2K-1, Gk*L) matrix
    wk_norm = torch.cat([wk.square(), 2.0 * wk[..., :-1] * wk[..., 1:]], dim=-1)
    wk_norm = wk_norm.reshape(gk * L, 2 * nk - 1).T
    wj_sq = wj.square().reshape(gj * L, nj)                               # same voxel twice
    wj_pair = (wj[..., :-1] * wj[..., 1:]).reshape(gj * L, nj - 1)         # voxels b and b + 1
    # (Gi, Gj, Gk, C); contiguous first: the sampling products are slow on a strided view
    fixed = control_features(feat_fixed.contiguous(), grid)[0].permute(1, 2, 3, 0)
    moving = feat_moving[0]

    def slab(f: Tensor, m: Tensor, w_i: Tensor) -> Tensor:
        s = w_i.shape[0]
        t1 = sample_i(m, w_i)  # (S, J, Li, K, C)
        t2 = sample_j(t1, wj)  # (S, Gj, Lj, Li, K, C)
        # cross term: channels contracted with the fixed features, then interpolated along k
        z = t2.reshape(s * gj, L * L * nk, c) @ f.reshape(s * gj, gk, c).transpose(1, 2)
        cross = interpolate_blocks(z.reshape(s, gj, L, L, nk, gk), taps, -2.0)  # -2 f.m
        # |m|^2: Gram terms of neighbouring voxels of T1 (along j: v, v+1; along k: e, e+1),
        # interpolated along j with products of the two-tap weights into
        # G0[e] = sum_c T2[e]^2 and G1[e] = sum_c T2[e] T2[e+1], then along k
        a00, a01, a10, a11 = _NeighbourGram.apply(t1)
        g0 = wj_sq @ a00.reshape(s, nj, L * nk) + 2.0 * (wj_pair @ a10.reshape(s, nj - 1, L * nk))
        g1 = (wj_sq @ a01.reshape(s, nj, L * (nk - 1))
              + wj_pair @ a11.reshape(s, nj - 1, L * (nk - 1)))
        gram = torch.cat([g0.reshape(s, gj, L, L, nk), g1.reshape(s, gj, L, L, nk - 1)], dim=-1)
        norm = (gram @ wk_norm).reshape(s, gj, L, L, gk, L)  # (S, Gj, Lj, Li, Gk, Lk)
        f_sq = f.square().sum(-1).permute(back)  # (S, Gj, Gk), original axes
        if layout == "grid":
            f_sq = f_sq[..., None, None, None]
        return (norm + cross).permute(out_axes) + f_sq

    step = max(1, min(grid[0], max_elems // (gj * L * L * nk * c)))
    if step >= grid[0]:
        return slab(fixed, moving, wi)
    axis = out_axes.index(0)
    from torch.utils.checkpoint import checkpoint

    recompute = torch.is_grad_enabled()
    parts = []
    for i0 in range(0, grid[0], step):
        args = (fixed[i0:i0 + step], moving, wi[i0:i0 + step])
        parts.append(checkpoint(slab, *args, use_reentrant=False) if recompute else slab(*args))
    return torch.cat(parts, axis)


def minpool3_pooled(x: Tensor) -> Tensor:
    """:func:`minpool3` as one 3x3x3 max-pooling of ``-x`` (stride 1, implicit ``-inf``
    padding, which equals the clipped window of replicate padding for a minimum).

    Exactly the values of :func:`minpool3_direct`. The leading axes are the pooling's channels,
    stored channels-last so that the kernel runs over them vectorised; the gradient is
    PyTorch's native pooling backward (one scatter through the saved argmax), several times
    cheaper than the backward of six ``torch.minimum``. Where neighbours tie, the whole gradient
    goes to one of them, where ``torch.minimum`` splits it (elsewhere the gradients are
    identical).
    """
    v = torch.neg(x.reshape(1, -1, *x.shape[-3:])).contiguous(
        memory_format=torch.channels_last_3d)
    v = F.max_pool3d(v, 3, stride=1, padding=1)
    return torch.neg(v).contiguous().reshape(x.shape)


def maxpool3_dmajor(x: Tensor) -> Tensor:
    """3x3x3 max-pooling (stride 1, clipped window) over the *first* three axes of ``x``
    ``(L_i, L_j, L_k, ...)``: ``-minpool3(-x)`` over those axes.

    In this displacement-major layout the trailing axes are the contiguous channels of a
    channels-last pooling: no transposes, and PyTorch's native pooling backward (one scatter
    through the saved argmax). Where neighbours tie, the whole gradient goes to one of them.
    """
    lead = x.shape[:3]
    v = x.reshape(1, *lead, -1).permute(0, 4, 1, 2, 3)  # channels-last view
    return F.max_pool3d(v, 3, stride=1, padding=1).permute(0, 2, 3, 4, 1).reshape(x.shape)


def mean_field_step_dmajor_neg(neg_cost: Tensor, mode: str = "approx",
                               penalty: Tensor | float | None = None) -> Tensor:
    """``-mean_field_step(cost)`` from ``neg_cost = -cost``, both displacement-major
    ``(L, L, L, G_i, G_j, G_k)``.

    The same operations on permuted axes (min-convolution over the first three, grid smoothing
    over the last three), so the same values up to float rounding. Carrying the cost negated
    makes the min-pooling a max-pooling as it stands (:func:`maxpool3_dmajor`, no negation
    passes; the smoothing is linear), and the layout makes it transpose-free and the smoothing
    products large.
    """
    if mode == "approx":
        x = maxpool3_dmajor(neg_cost)
    elif mode == "exact":
        if penalty is None:
            raise PddnetError("mean_field_step_dmajor_neg(mode='exact') needs a penalty")
        pen = torch.as_tensor(penalty, dtype=neg_cost.dtype, device=neg_cost.device)
        x = -neg_cost
        for axis in (0, 1, 2):
            x = _minconv_exact_1d(x, pen, axis)
        x = -x
    else:
        raise PddnetError(f"mean_field_step_dmajor_neg: unknown mode {mode!r}")
    axes = (0, 1, 2, 3, 4, 5) if mode == "approx" else (3, 4, 5)
    for axis in axes:
        x = _along(x, smoothing_matrix(x.shape[axis], dtype=x.dtype, device=x.device), axis)
    return x


def affine(b: Tensor, *terms: Tensor) -> Tensor:
    """``b + a_0 x_0 + a_1 x_1 + ...`` for scalar tensors ``b, a_i`` and tensors ``x_i`` of one
    shape (``terms = a_0, x_0, a_1, x_1, ...``): :class:`_Affine`."""
    return _Affine.apply(b, *terms)


class _Affine(torch.autograd.Function):
    """:func:`affine` as in-place passes over one output tensor. The backward pass gives the
    coefficients' gradients as dot products (``sum(grad * x_i)`` without forming the product)
    and each ``x_i`` its scaled gradient: two to three passes over the cost volume fewer than
    autograd's graph of products and sums, and no product saved."""

    @staticmethod
    def forward(ctx, b, *terms):
        coeffs, xs = terms[0::2], terms[1::2]
        out = torch.mul(xs[0], coeffs[0]).add_(b)
        for a, x in zip(coeffs[1:], xs[1:]):
            out.addcmul_(x, a)
        ctx.save_for_backward(*terms)
        return out

    @staticmethod
    def backward(ctx, grad):
        terms = ctx.saved_tensors
        flat = grad.reshape(-1)
        grads = [grad.sum() if ctx.needs_input_grad[0] else None]
        for k in range(0, len(terms), 2):
            a, x = terms[k], terms[k + 1]
            grads.append(torch.dot(flat, x.reshape(-1)).reshape(a.shape)
                         if ctx.needs_input_grad[k + 1] else None)
            grads.append(grad * a if ctx.needs_input_grad[k + 2] else None)
        return tuple(grads)


def softmax_scaled(x: Tensor, scale: Tensor, dim: int) -> Tensor:
    """``softmax(scale * x, dim)`` for a scalar tensor ``scale``: :class:`_ScaledSoftmax`."""
    return _ScaledSoftmax.apply(x, scale, dim)


class _ScaledSoftmax(torch.autograd.Function):
    """:func:`softmax_scaled` with a backward pass that scales the softmax gradient in place
    and gives the scale's gradient as a dot product with ``x``: no product tensor is formed or
    saved (autograd's graph of the product allocates two cost-volume-sized gradients)."""

    @staticmethod
    def forward(ctx, x, scale, dim):
        y = torch.softmax(x * scale, dim)
        ctx.save_for_backward(x, scale, y)
        ctx.dim = dim
        return y

    @staticmethod
    def backward(ctx, grad):
        x, scale, y = ctx.saved_tensors
        g = torch.ops.aten._softmax_backward_data(grad.contiguous(), y, ctx.dim, y.dtype)
        g_scale = (torch.dot(g.reshape(-1), x.reshape(-1)).reshape(scale.shape)
                   if ctx.needs_input_grad[1] else None)
        return (g.mul_(scale) if ctx.needs_input_grad[0] else None), g_scale, None
