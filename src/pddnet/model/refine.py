"""Instance optimisation ("pdd+inst") and the two-stage mode ("2 warps"): the PyTorch reference.

The definitions (written out in ``docs/refinement.md`` and the docstring of
:mod:`pddnet.runtime.refine`, which implements the same in numpy for the torch-free runtime):

* :func:`instance_optimise`: ``theta`` on the control grid, initialised to the network's
  expected displacement ``E``; field ``u = smooth3(theta)`` (two 3x3x3 average poolings after
  replicate padding, :func:`pddnet.model.ops.smooth3`); energy
  ``-mean_k P_k(u_k) + lam * diffusion_penalty(u)`` with ``P_k(u_k)`` the probability sampled
  trilinearly in displacement space (``grid_sample`` of the ``L x L x L`` probabilities at
  ``u_k / q``, ``align_corners=True``, zero padding); ``steps`` iterations of
  ``torch.optim.Adam(lr)``. Everything in normalised units, computed in float64 by default.
* :func:`feature_optimise` (method ``features``, the default): a dense field on the feature
  grid, ``theta`` initialised to the network's field upsampled there, ``u = smooth3(theta)``;
  energy ``mean_{x,c} (f_c(x) - m_c(x + u(x)))^2 + lam * diffusion_penalty(u in feature
  voxels)`` with both feature maps divided by the fixed map's per-channel standard deviation
  and projected on its first principal components; Adam. The field is upsampled to the image like the network's.
* :func:`compose_fields`: ``u(x) = u2(x) + u1(x + u2(x))`` in voxels.
* :func:`register_stages`: stage one, optional refinement, warp, stage two with the finer grid
  and smaller capture range of :func:`pddnet.spec.refine.stage2_overrides` (same weights,
  fixed features reused), optional refinement, composition. Which stages are refined:
  ``RefineOptions.stages_refined`` (``features``: stage two only; ``probs``: both).

The authors' ``fit_sparse2dense`` (pdd_net, ``pdd_abdomen_unsupervised_2warps.py``) is the
model for this; the differences are stated in ``docs/refinement.md`` (replicate instead of zero
padding in the smoothing, ``align_corners=False`` grids as everywhere in pddnet).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from pddnet.errors import PddnetError
from pddnet.model import ops
from pddnet.model.losses import diffusion_penalty
from pddnet.spec.config import PDDConfig
from pddnet.spec.refine import RefineOptions, stage2_overrides

Tensor = torch.Tensor

__all__ = ["RefineOptions", "sample_probabilities", "refine_energy", "instance_optimise",
           "feature_scale", "feature_basis", "feature_inputs", "feature_energy", "feature_optimise", "refine_stage", "compose_fields", "stage2_network", "network_for_config", "register_stages",
           "StageOutput", "Stages"]


def sample_probabilities(probs: Tensor, disp: Tensor, disp_size: int, capture: float) -> Tensor:
    """``P_k(u_k)``: each control point's probabilities at its own displacement.

    Args:
        probs: ``(G_i, G_j, G_k, L^3)`` (lattice axis ``a`` for displacement component ``a``).
        disp: ``(G_i, G_j, G_k, 3)`` normalised units.

    Returns:
        ``(G_i, G_j, G_k)``: trilinear interpolation at lattice coordinate ``(u + q) / h``,
        zero outside the lattice (``grid_sample`` zeros padding, ``align_corners=True`` at
        ``u / q``, which puts ``-1`` and ``+1`` on the outer lattice points ``-q`` and ``q``).
    """
    L = int(disp_size)
    vol = probs.reshape(-1, 1, L, L, L).to(disp.dtype)
    coords = (disp.reshape(-1, 1, 1, 1, 3) / capture).flip(-1)  # grid_sample wants (k, j, i)
    out = F.grid_sample(vol, coords, mode="bilinear", padding_mode="zeros", align_corners=True)
    return out.reshape(disp.shape[:-1])


def refine_energy(theta: Tensor, probs: Tensor, disp_size: int, capture: float,
                  weight: float) -> tuple[Tensor, Tensor, Tensor]:
    """``(E, data, smoothness)`` of parameters ``theta`` ``(G_i, G_j, G_k, 3)``.

    ``u = smooth3(theta)`` over the grid axes; ``data = -mean P_k(u_k)``;
    ``smoothness = diffusion_penalty(u)``; ``E = data + weight * smoothness``.
    """
    u = ops.smooth3(theta.permute(3, 0, 1, 2)).permute(1, 2, 3, 0)
    data = -sample_probabilities(probs, u, disp_size, capture).mean()
    smooth = diffusion_penalty(u)
    return data + weight * smooth, data, smooth


@dataclass
class Refined:
    """Result of :func:`instance_optimise`: the field (normalised, input dtype) and energies."""

    grid_disp: Tensor
    energy: list[float]
    data: list[float]
    steps: int


def instance_optimise(probs: Tensor, grid_disp: Tensor, disp_size: int, capture: float,
                      options: RefineOptions | None = None, *,
                      dtype: torch.dtype = torch.float64) -> Refined:
    """Fit ``smooth3(theta)`` to the probabilities with Adam (module docstring).

    Args:
        probs: ``(G_i, G_j, G_k, L^3)`` displacement probabilities of the network.
        grid_disp: ``(G_i, G_j, G_k, 3)`` expected displacement (normalised) -- the start.
        disp_size, capture: ``L`` and ``q`` of the model.
        options: steps, lr, weight (lam), Adam betas and eps.
        dtype: the precision of the optimisation (float64: the runtime's numpy computation
            matches it to ~1e-12; the result is returned in ``grid_disp.dtype``).
    """
    opts = options or RefineOptions(method="probs")
    if opts.method != "probs":
        raise PddnetError(f"instance_optimise fits the probabilities; options.method is "
                          f"{opts.method!r} (use feature_optimise or refine_stage)")
    probs = probs.detach().to(dtype)
    theta = grid_disp.detach().to(dtype).clone().requires_grad_(True)
    adam = torch.optim.Adam([theta], lr=opts.lr, betas=opts.betas, eps=opts.eps)
    first = None
    with torch.enable_grad():
        for _ in range(opts.steps):
            adam.zero_grad()
            e, data, _ = refine_energy(theta, probs, disp_size, capture, opts.weight)
            if first is None:
                first = (float(e.detach()), float(data.detach()))
            e.backward()
            adam.step()
    with torch.no_grad():
        e, data, _ = refine_energy(theta, probs, disp_size, capture, opts.weight)
        u = ops.smooth3(theta.permute(3, 0, 1, 2)).permute(1, 2, 3, 0)
    first = first or (float(e), float(data))
    return Refined(u.to(grid_disp.dtype).contiguous(), [first[0], float(e)],
                   [first[1], float(data)], opts.steps)


# --------------------------------------------------------------------------------------------
# refinement on image evidence: the features of both scans
# --------------------------------------------------------------------------------------------
#: floor of the per-channel feature scale (a constant channel carries no evidence)
FEATURE_SCALE_FLOOR = 1e-6


def feature_scale(fixed_feat: Tensor) -> Tensor:
    """``s_c``: per-channel population standard deviation of ``(1, C, n_i, n_j, n_k)`` fixed
    features over the grid, floored at :data:`FEATURE_SCALE_FLOOR`; shape ``(1, C, 1, 1, 1)``."""
    f = fixed_feat
    var = (f - f.mean(dim=(2, 3, 4), keepdim=True)).square().mean(dim=(2, 3, 4), keepdim=True)
    return var.sqrt().clamp_min(FEATURE_SCALE_FLOOR)


def feature_basis(fixed: Tensor, components: int) -> Tensor:
    """``(k, C)``: the eigenvectors of the ``k`` largest eigenvalues of the channel covariance
    (population, over the grid) of normalised fixed features ``(1, C, n_i, n_j, n_k)``;
    ``k = min(components, C)``. Their signs are arbitrary: the SSD does not depend on them."""
    c = fixed.shape[1]
    x = fixed.reshape(c, -1)
    x = x - x.mean(dim=1, keepdim=True)
    _, vecs = torch.linalg.eigh(x @ x.T / x.shape[1])
    return vecs[:, -min(int(components), c):].T.flip(0)


def feature_inputs(fixed_feat: Tensor, moving_feat: Tensor, components: int, *,
                   dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    """The feature maps the SSD compares: both divided by :func:`feature_scale` of the fixed
    map, then projected on :func:`feature_basis`; ``(1, k, n_i, n_j, n_k)`` each."""
    fixed = fixed_feat.detach().to(dtype)
    scale = feature_scale(fixed)
    fixed, moving = fixed / scale, moving_feat.detach().to(dtype) / scale
    basis = feature_basis(fixed, components)
    return (torch.einsum("kc,nc...->nk...", basis, fixed),
            torch.einsum("kc,nc...->nk...", basis, moving))


def feature_energy(theta: Tensor, fixed: Tensor, moving: Tensor,
                   weight: float) -> tuple[Tensor, Tensor, Tensor]:
    """``(E, data, smoothness)`` of feature-grid parameters ``theta`` ``(n_i, n_j, n_k, 3)``.

    ``fixed``/``moving``: ``(1, k, n_i, n_j, n_k)`` from :func:`feature_inputs` (normalised,
    projected). ``u = smooth3(theta)``; ``data = mean_{x,c} (f - m(x + u))^2``
    (``grid_sample``, trilinear, border, ``align_corners=False``); ``smoothness =
    diffusion_penalty(u * n / 2)`` (``u`` in feature voxels); ``E = data + weight *
    smoothness``.
    """
    shape = tuple(fixed.shape[2:])
    u = ops.smooth3(theta.permute(3, 0, 1, 2)).permute(1, 2, 3, 0)
    coords = ops.identity_grid(shape, dtype=theta.dtype) + u
    warped = ops.grid_sample3d(moving, coords.unsqueeze(0))
    data = (fixed - warped).square().mean()
    smooth = diffusion_penalty(ops.normalised_to_voxels(u, shape))
    return data + weight * smooth, data, smooth


def feature_optimise(fixed_feat: Tensor, moving_feat: Tensor, grid_disp: Tensor,
                     options: RefineOptions | None = None, *,
                     dtype: torch.dtype = torch.float64) -> Refined:
    """Fit a dense feature-grid field to the two scans' features with Adam (method ``features``).

    Args:
        fixed_feat, moving_feat: ``(1, C, n_i, n_j, n_k)`` the feature network's outputs.
        grid_disp: ``(G_i, G_j, G_k, 3)`` the network's field (normalised), upsampled to the
            feature grid (``ops.upsample_field``) as the start ``theta``.
        options: steps, lr, weight (lam) and Adam's constants; ``method`` must be
            ``"features"``.
        dtype: the precision of the optimisation.

    Returns:
        :class:`Refined` whose ``grid_disp`` is ``u = smooth3(theta)`` on the feature grid
        ``(n_i, n_j, n_k, 3)``, normalised, in ``grid_disp.dtype``; ``data`` is the feature SSD.
    """
    opts = options or RefineOptions(method="features")
    if opts.method != "features":
        raise PddnetError(f"feature_optimise fits the features; options.method is "
                          f"{opts.method!r} (use instance_optimise or refine_stage)")
    if fixed_feat.shape != moving_feat.shape or fixed_feat.dim() != 5 or fixed_feat.shape[0] != 1:
        raise PddnetError(f"feature_optimise: features must both be (1, C, n_i, n_j, n_k), got "
                          f"{tuple(fixed_feat.shape)} and {tuple(moving_feat.shape)}")
    fixed, moving = feature_inputs(fixed_feat, moving_feat, opts.components, dtype=dtype)
    shape = tuple(fixed.shape[2:])
    theta = ops.upsample_field(grid_disp.detach().to(dtype), shape).clone().requires_grad_(True)
    adam = torch.optim.Adam([theta], lr=opts.lr, betas=opts.betas, eps=opts.eps)
    first = None
    with torch.enable_grad():
        for _ in range(opts.steps):
            adam.zero_grad()
            e, data, _ = feature_energy(theta, fixed, moving, opts.weight)
            if first is None:
                first = (float(e.detach()), float(data.detach()))
            e.backward()
            adam.step()
    with torch.no_grad():
        e, data, _ = feature_energy(theta, fixed, moving, opts.weight)
        u = ops.smooth3(theta.permute(3, 0, 1, 2)).permute(1, 2, 3, 0)
    first = first or (float(e), float(data))
    return Refined(u.to(grid_disp.dtype).contiguous(), [first[0], float(e)],
                   [first[1], float(data)], opts.steps)


def refine_stage(options: RefineOptions, *, probs: Tensor | None = None,
                 grid_disp: Tensor, disp_size: int | None = None, capture: float | None = None,
                 fixed_feat: Tensor | None = None, moving_feat: Tensor | None = None) -> Refined:
    """One stage's refinement by ``options.method``: :func:`feature_optimise` on the features or
    :func:`instance_optimise` on the probabilities (``Refined.grid_disp`` is then on the
    feature grid or the control grid; :func:`pddnet.model.ops.dense_displacement` upsamples
    either)."""
    if options.method == "features":
        return feature_optimise(fixed_feat, moving_feat, grid_disp, options)
    return instance_optimise(probs, grid_disp, disp_size, capture, options)


def compose_fields(u1: Tensor, u2: Tensor) -> Tensor:
    """``u(x) = u2(x) + u1(x + u2(x))``; both ``(I, J, K, 3)`` in voxels of one grid.

    ``u1`` is sampled with :func:`pddnet.model.ops.warp` (trilinear, border padding), so
    ``warp(moving, u) == warp(warp(moving, u1), u2)`` up to interpolation.
    """
    if u1.shape != u2.shape or u1.dim() != 4 or u1.shape[-1] != 3:
        raise PddnetError(f"compose_fields: fields must both be (I, J, K, 3), got "
                         f"{tuple(u1.shape)} and {tuple(u2.shape)}")
    u1_at = ops.warp(u1.permute(3, 0, 1, 2).unsqueeze(0), u2)[0].permute(1, 2, 3, 0)
    return u2 + u1_at


def stage2_network(model, overrides: dict[str, Any] | None = None):
    """The same weights with the stage-two control grid and capture range.

    ``overrides`` default to :func:`pddnet.spec.refine.stage2_overrides` of the model's
    config; any ``PDDConfig`` field that does not change the weights may be overridden.
    """
    from pddnet.model.network import PDDNet

    cfg: PDDConfig = model.config
    ov = dict(stage2_overrides(cfg.as_dict()) if overrides is None else overrides)
    if "grid" in ov:
        ov["grid"] = tuple(int(g) for g in ov["grid"])
    for key in ("channels", "minconv"):
        if key in ov and ov[key] != getattr(cfg, key):
            raise PddnetError(f"stage2_network: overriding {key!r} changes the weights; only the "
                             "grid, capture range and displacement count may change")
    net = PDDNet(dataclasses.replace(cfg, **ov))
    net.load_state_dict(model.state_dict())
    net.train(model.training)
    return net


#: config fields an export may override without changing the weights
OVERRIDABLE = ("grid", "capture", "disp_size")


def network_for_config(model, config: dict[str, Any]):
    """``model`` as an exported model's ``pddnet.config`` describes it.

    ``model`` itself when the configs are equal; the same weights on another grid / capture
    range / number of displacements (:func:`stage2_network`) when only :data:`OVERRIDABLE`
    fields differ -- a stage-two model or ``export_checkpoint(..., overrides=...)``. For
    backends that run a checkpoint's weights behind an exported model's interface (the torch
    reference in ``pddnet validate``). Raises ``ValueError`` naming the fields otherwise.
    """
    mine = model.config.as_dict()
    theirs = PDDConfig.from_dict(dict(config)).as_dict()
    diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
    if not diff:
        return model
    fixed = [k for k in diff if k not in OVERRIDABLE]
    if fixed:
        raise PddnetError("the network differs from the exported model in "
                         + "; ".join(f"{k}: {mine.get(k)!r} vs {theirs.get(k)!r}" for k in fixed))
    return stage2_network(model, {k: theirs[k] for k in diff})


@dataclass
class StageOutput:
    """One stage of :func:`register_stages` (fields in voxels of the image grid)."""

    config: PDDConfig
    grid_disp: Tensor           # (G, 3) network expectation, normalised
    probs: Tensor               # (G, L^3)
    refined: Refined | None     # instance optimisation, if run (feature or control grid)
    disp: Tensor                # (I, J, K, 3) voxels: this stage's field
    times_ms: dict[str, float] = field(default_factory=dict)


@dataclass
class Stages:
    """All stages and the composed field ``disp`` ``(I, J, K, 3)`` in voxels."""

    disp: Tensor
    stages: list[StageOutput]
    times_ms: dict[str, float]
    refine_stages: list[int] = field(default_factory=list)  # 1-based, the refined stages


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1e3


def register_stages(model, fixed: Tensor, moving: Tensor, *, refine: RefineOptions | None = None,
                    stages: int = 1, stage2: Any = None) -> Stages:
    """Feed-forward, refined, or two-stage registration with the PyTorch reference.

    Args:
        model: a :class:`~pddnet.model.network.PDDNet` (eval mode).
        fixed, moving: ``(1, 1, I, J, K)`` normalised intensities.
        refine: instance optimisation (``None``: feed-forward fields) of the stages
            ``refine.refined_stages(stages)`` names (``stages_refined``: ``"last"`` refines
            stage two only, stage one's network field feeding it; ``"all"`` every stage).
        stages: 1 or 2.
        stage2: the stage-two network, or a dict of config overrides (default:
            :func:`stage2_network` of ``model``).

    Returns:
        :class:`Stages`; ``times_ms`` has ``features``, ``head``, ``refine`` (stage one) and
        for two stages ``warp``, ``features2``, ``head2``, ``refine2``, ``compose``.
    """
    if stages not in (1, 2):
        raise PddnetError(f"register_stages: stages must be 1 or 2, got {stages}")
    shape = tuple(fixed.shape[2:])
    times: dict[str, float] = {}
    out: list[StageOutput] = []
    which = refine.refined_stages(stages) if refine is not None else []
    with torch.no_grad():
        t0 = time.perf_counter()
        ff, fm = model.features(fixed), model.features(moving)
        times["features"] = _ms(t0)
        u = _stage(model, ff, fm, refine if 1 in which else None, shape, times, "", out)
        if stages == 2:
            net2 = stage2 if isinstance(stage2, torch.nn.Module) else stage2_network(model, stage2)
            t0 = time.perf_counter()
            m1 = ops.warp(moving, u)
            times["warp"] = _ms(t0)
            t0 = time.perf_counter()
            fm2 = net2.features(m1)
            times["features2"] = _ms(t0)
            u2 = _stage(net2, ff, fm2, refine if 2 in which else None, shape, times, "2", out)
            t0 = time.perf_counter()
            u = compose_fields(u, u2)
            times["compose"] = _ms(t0)
    return Stages(u, out, times, which)


def _stage(net, ff, fm, refine, shape, times, suffix, out) -> Tensor:
    cfg = net.config
    t0 = time.perf_counter()
    reg = net.register_features(ff, fm)
    times["head" + suffix] = _ms(t0)
    refined = None
    grid = reg.grid_disp
    if refine is not None:
        t0 = time.perf_counter()
        refined = refine_stage(refine, probs=reg.probs, grid_disp=reg.grid_disp,
                               disp_size=cfg.disp_size, capture=cfg.capture, fixed_feat=ff,
                               moving_feat=fm)
        grid = refined.grid_disp
        times["refine" + suffix] = _ms(t0)
    disp = ops.dense_displacement(grid, shape)
    out.append(StageOutput(cfg, reg.grid_disp, reg.probs, refined, disp))
    return disp
