"""Training losses: the non-local label loss and the diffusion penalty of PDD-Net.

The label loss supervises the whole displacement distribution, not only its mean: the
moving scan's one-hot labels are sampled at every candidate displacement, weighted by the
predicted probabilities, and compared with the fixed labels at each control point.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pddnet.errors import PddnetError
from pddnet.model import ops

Tensor = torch.Tensor


def one_hot(labels: Tensor, num_classes: int) -> Tensor:
    """``(I, J, K)`` integer labels -> ``(1, num_classes, I, J, K)`` float one-hot.

    Labels outside ``[0, num_classes)`` are refused (as ``F.one_hot`` does)."""
    labels = labels.long()
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise PddnetError(f"one_hot: labels must lie in [0, {num_classes}), got "
                          f"[{int(labels.min())}, {int(labels.max())}]")
    out = torch.zeros((num_classes, *labels.shape), dtype=torch.float32, device=labels.device)
    return out.scatter_(0, labels[None], 1.0)[None]


def class_weights(label_maps, num_classes: int, power: float = 0.5,
                  background: float | None = None) -> Tensor:
    """``frequency^-power`` per class, normalised to mean 1 over the classes present.

    With ``background``, class 0 then gets that weight instead (the authors' code: inverse
    square root of the frequency, mean 1, background 0.15)."""
    counts = torch.zeros(num_classes, dtype=torch.float64)
    for lab in label_maps:
        counts += torch.bincount(torch.as_tensor(lab).long().reshape(-1), minlength=num_classes)[
            :num_classes].double()
    present = counts > 0
    w = torch.zeros(num_classes, dtype=torch.float64)
    w[present] = (counts[present] / counts.sum()).pow(-power)
    w[present] /= w[present].mean()
    if background is not None:
        w[0] = float(background)
    return w.float()


def soft_labels(labels_onehot: Tensor, factor: int = 2) -> Tensor:
    """Average-pool one-hot labels by ``factor``: soft labels, cheaper to sample densely."""
    return F.avg_pool3d(labels_onehot, factor, stride=factor) if factor > 1 else labels_onehot


def pooled_one_hot(labels: Tensor, num_classes: int, factor: int = 2) -> Tensor:
    """``soft_labels(one_hot(labels, num_classes), factor)`` by counting each class in each
    ``factor^3`` block (one ``bincount``), without the full-resolution one-hot volume.

    Exactly the same values: the block means of a one-hot volume are counts over ``factor^3``.
    """
    labels = labels.long()
    lo, hi = torch.aminmax(labels) if labels.numel() else (0, 0)
    if factor == 1 or not 0 <= int(lo) <= int(hi) < num_classes:
        return soft_labels(one_hot(labels, num_classes), factor)  # one_hot refuses bad labels
    shape = [n // factor for n in labels.shape]  # avg_pool3d drops a partial last block
    blocks = labels[:shape[0] * factor, :shape[1] * factor, :shape[2] * factor].reshape(
        shape[0], factor, shape[1], factor, shape[2], factor)
    n_vox = shape[0] * shape[1] * shape[2]
    block = torch.arange(n_vox, device=labels.device).reshape(shape[0], 1, shape[1], 1,
                                                               shape[2], 1)
    counts = torch.bincount((blocks * n_vox + block).reshape(-1), minlength=num_classes * n_vox)
    return (counts.float() / factor ** 3).reshape(1, num_classes, *shape)


def nonlocal_label_loss(probs: Tensor, fixed_onehot: Tensor, moving_onehot: Tensor, grid,
                        disp_size: int, capture: float, weights: Tensor,
                        reduction: str = "sum", *, layout: str = "grid") -> Tensor:
    """Class-weighted MSE between fixed labels and probability-weighted moving labels.

    Args:
        probs: ``(G_i, G_j, G_k, L^3)`` displacement probabilities.
        fixed_onehot, moving_onehot: ``(1, n_classes, I, J, K)`` one-hot or soft labels.
        grid, disp_size, capture: the model's control grid and displacement set.
        weights: ``(n_classes,)`` class weights.
        reduction: ``"sum"`` or ``"mean"`` over the classes.
        layout: ``"grid"`` (probabilities ``(G_i, G_j, G_k, L^3)``) or ``"disp"``
            (``(L^3, G_i, G_j, G_k)``, as :func:`pddnet.model.train.forward_fast` makes them).

    Returns:
        scalar: ``sum_c w_c mean_k (sum_d p(k, d) M_c(x_k + d) - F_c(x_k))^2`` (``"sum"``), or
        that divided by ``n_classes`` (``"mean"``, the authors' code). Averaged, the label term
        is ``n_classes`` times smaller against the diffusion penalty: with the frequency weights
        and the paper's diffusion weight 1.5 training collapses to a flat distribution (zero
        displacement); the authors pair it with a background weight of 0.15.

    The expectation ``sum_d p(k, d) M_c(x_k + d)`` is :func:`expected_labels` (separable, the
    labels are never sampled at every displacement); :func:`nonlocal_label_loss_direct` is the
    same loss written as its definition.
    """
    predicted = expected_labels(probs, moving_onehot, grid, disp_size, capture, layout=layout)
    return _weighted_mse(predicted, fixed_onehot, grid, weights, reduction)


REDUCTIONS = ("sum", "mean")


def _weighted_mse(predicted: Tensor, fixed_onehot: Tensor, grid, weights: Tensor,
                  reduction: str = "sum") -> Tensor:
    if reduction not in REDUCTIONS:
        raise PddnetError(f"label loss: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    target = ops.control_features(fixed_onehot.to(predicted.dtype), grid)[0]  # (n, Gi, Gj, Gk)
    per_class = (predicted - target).square().mean(dim=(1, 2, 3))
    total = (weights.to(predicted.dtype) * per_class).sum()
    return total / per_class.shape[0] if reduction == "mean" else total


def expected_labels(probs: Tensor, moving_onehot: Tensor, grid, disp_size: int,
                    capture: float, *, max_elems: int = 1 << 25, layout: str = "grid") -> Tensor:
    """``sum_d p(k, d) M_c(x_k + d)`` for every class ``c`` and control point ``k``:
    ``(n_classes, G_i, G_j, G_k)``, differentiable in ``probs``.

    Separable: the labels are interpolated along ``i`` and ``j`` at the displaced control
    points (``T2`` of :func:`ops.sample_j`, ``(S, G_j, L_j, L_i, K, n)``); the probabilities
    are spread onto the label voxels along ``k`` with the two-tap weights
    (:func:`ops.spread_blocks`, ``Q[.., e, g_k] = sum_d p(.., g_k, d) W_k[g_k, d, e]``); one
    batched product over ``(L_j, L_i, e)`` per control column ``(g_i, g_j)`` contracts them.
    Neither the ``n_classes x (G L)^3`` sampled labels nor anything of that size is formed.
    Slabs of control slices along ``i`` bound ``Q`` to ``max_elems`` elements. ``layout`` is
    that of ``probs``: ``"grid"`` ``(G_i, G_j, G_k, L^3)`` or ``"disp"`` ``(L^3, G_i, G_j, G_k)``.
    """
    if layout not in ("grid", "disp"):
        raise PddnetError(f"expected_labels: layout must be 'grid' or 'disp', got {layout!r}")
    L = int(disp_size)
    labels = moving_onehot[0].to(probs.dtype)  # (n, I, J, K)
    if layout == "disp":  # (Li, Lj, Lk, Gi, Gj, Gk) -> the grid-major order, as a view
        p = probs.reshape(L, L, L, *grid).permute(3, 4, 5, 0, 1, 2)
    else:
        p = probs.reshape(*grid, L, L, L)
    # T2 and Q scale with the size of the label axis spread along last, T2 with the last two:
    # below, "i, j, k" are the label axes in decreasing size (views)
    order = sorted(range(3), key=lambda a: -int(labels.shape[1 + a]))
    back = [order.index(a) for a in range(3)]
    labels = labels.permute(0, *[1 + a for a in order])
    p = p.permute(*order, *[3 + a for a in order])
    grid = tuple(int(grid[a]) for a in order)
    gi, gj, gk = grid
    n_cls, nk = labels.shape[0], labels.shape[-1]
    wi, wj, wk = ops.lattice_weights(grid, L, capture, labels.shape[1:], dtype=probs.dtype,
                                     device=probs.device)
    taps = ops.two_taps(wk)
    step = max(1, min(gi, max_elems // (gj * L * L * nk * gk)))
    parts = []
    for i0 in range(0, gi, step):
        s = min(step, gi - i0)
        t2 = ops.sample_j(ops.sample_i(labels, wi[i0:i0 + s]), wj)  # (S, Gj, Lj, Li, K, n)
        pt = p[i0:i0 + s].permute(0, 1, 4, 3, 2, 5)  # (S, Gj, Lj, Li, Gk, Lk)
        q = ops.spread_blocks(pt, taps, nk)  # (S, Gj, Lj, Li, K, Gk)
        # (n, x) @ (x, Gk) per control column: the gradient for q comes out in q's layout
        pred = t2.reshape(s * gj, -1, n_cls).transpose(1, 2) @ q.reshape(s * gj, -1, gk)
        parts.append(pred.reshape(s, gj, n_cls, gk))
    return torch.cat(parts, 0).permute(2, *[(0, 1, 3)[b] for b in back])  # original axes


def nonlocal_label_loss_direct(probs: Tensor, fixed_onehot: Tensor, moving_onehot: Tensor, grid,
                               disp_size: int, capture: float, weights: Tensor,
                               reduction: str = "sum") -> Tensor:
    """:func:`nonlocal_label_loss` as its definition: the moving labels sampled at every
    displacement of every control point (``n_classes x (G L)^3`` values), weighted by the
    probabilities. The reference the separable form is tested against."""
    L = disp_size
    dt, dev = probs.dtype, probs.device
    disp = torch.linspace(-capture, capture, L, dtype=dt, device=dev)
    pos = [(ops.cell_centres(int(g), dtype=dt, device=dev)[:, None] + disp).reshape(1, -1)
           for g in grid]
    n_cls = moving_onehot.shape[1]
    moving = ops.lattice_sample(moving_onehot.to(dt), *pos)  # (1, n, 1, Gi*L, Gj*L, Gk*L)
    moving = moving.reshape(n_cls, grid[0], L, grid[1], L, grid[2], L)
    # bring the (small) probabilities into the lattice layout instead of permuting the labels
    p = probs.reshape(*grid, L, L, L).permute(0, 3, 1, 4, 2, 5)
    predicted = torch.stack([(m * p).sum(dim=(1, 3, 5)) for m in moving.unbind(0)])
    return _weighted_mse(predicted, fixed_onehot, grid, weights, reduction)


def diffusion_penalty(grid_disp: Tensor) -> Tensor:
    """Sum over axes of the mean squared forward difference of the control-grid displacement.

    ``grid_disp`` is ``(G_i, G_j, G_k, 3)`` in normalised units (as in the authors' code, so
    the paper's weight 1.5 keeps its meaning).
    """
    return sum(grid_disp.diff(dim=a).square().mean() for a in range(3))
