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
    eye = torch.eye(n, dtype=torch.float64).unsqueeze(1)  # (n signals, 1, n)
    v = F.pad(eye, (2, 2), mode="replicate")
    v = F.avg_pool1d(F.avg_pool1d(v, 3, stride=1), 3, stride=1)
    return v[:, 0, :].T.contiguous().to(dtype=dtype, device=device)


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
    """
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
