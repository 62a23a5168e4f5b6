"""PDD-Net: OBELISK features, correlation, two mean-field iterations, soft displacements.

Follows Heinrich, "Closing the Gap between Deep and Conventional Image Registration using
Probabilistic Dense Displacement Networks" (MICCAI 2019) and the authors' public code; the
building blocks are the reference ops of :mod:`pddnet.model.ops`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from pddnet.errors import PddnetError
from pddnet.model import ops
from pddnet.spec.config import Intensity, PDDConfig
from pddnet.spec.config import normalise_intensity as spec_normalise

Tensor = torch.Tensor


def normalise_intensity(image, intensity: Intensity) -> np.ndarray:
    """The preprocessing contract (:class:`~pddnet.spec.config.Intensity`, ``ct`` or ``mr``)
    as float32 numpy: :func:`pddnet.spec.config.normalise_intensity`, the function the runtime
    applies too."""
    return spec_normalise(image, intensity)


class ObeliskFeatures(nn.Module):
    """OBELISK-style feature extractor, shared by the fixed and the moving scan.

    avg-pool (k3, s2, p1) -> Conv 1->4 (k5, s2, p2) + BN + ReLU -> two sets of ``2c``
    trainable offsets sampled on a grid of a third of the image size, their difference ->
    Conv 1x1 (8c -> 4c) + BN + ReLU -> Conv 3x3x3 (4c -> 4c) + BN + ReLU -> Conv 1x1 (4c -> c).
    """

    def __init__(self, channels: int, *, offset_std: float = 0.05):
        super().__init__()
        c = channels
        self.offsets = nn.Parameter(torch.randn(2, 2 * c, 3) * offset_std)
        self.conv0 = nn.Conv3d(1, 4, 5, stride=2, padding=2, bias=False)
        self.bn0 = nn.BatchNorm3d(4)
        self.conv1 = nn.Conv3d(8 * c, 4 * c, 1, bias=False)
        self.bn1 = nn.BatchNorm3d(4 * c)
        self.conv2 = nn.Conv3d(4 * c, 4 * c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm3d(4 * c)
        self.conv3 = nn.Conv3d(4 * c, c, 1)

    def stem(self, image: Tensor) -> Tensor:
        """Input ``(1, 1, I, J, K)`` -> the 4-channel map the offsets sample from."""
        x = F.avg_pool3d(image, 3, stride=2, padding=1)
        return F.relu(self.bn0(self.conv0(x)))

    def forward(self, image: Tensor, memory_format=torch.contiguous_format) -> Tensor:
        """``(1, 1, I, J, K)`` normalised intensities -> ``(1, c, I//3, J//3, K//3)``.

        ``memory_format=torch.channels_last_3d`` runs the convolutions after the offsets
        channels-last (the same values up to float rounding; on CPUs the 3x3x3 convolution and
        its backward run ~1.5x faster) and returns channels-last features.
        """
        out_shape = PDDConfig.feature_shape(tuple(image.shape[2:]))
        x = self.stem(image)
        x = (ops.deformable_sample(x, self.offsets[0], out_shape)
             - ops.deformable_sample(x, self.offsets[1], out_shape))
        x = x.contiguous(memory_format=memory_format)
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.conv3(x)


@dataclass
class Registration:
    """What one forward pass produces (all torch tensors)."""

    cost: Tensor          # (Gi, Gj, Gk, L, L, L) regularised cost after two iterations
    probs: Tensor         # (Gi, Gj, Gk, L^3) displacement probabilities
    grid_disp: Tensor     # (Gi, Gj, Gk, 3) expected displacement, normalised units

    def dense(self, shape) -> Tensor:
        """Full-resolution displacement in voxels, ``(*shape, 3)``."""
        return ops.dense_displacement(self.grid_disp, shape)


class PDDNet(nn.Module):
    """The whole network. ``forward(fixed, moving)`` takes normalised ``(1, 1, I, J, K)`` tensors."""

    def __init__(self, config: PDDConfig, *, seed: int | None = None):
        super().__init__()
        self.config = config
        with torch.random.fork_rng(devices=[]):
            if seed is not None:  # a seeded model initialises identically every time
                torch.manual_seed(seed)
            self.features = ObeliskFeatures(config.channels)
        self.alpha = nn.Parameter(torch.tensor(config.alpha_init, dtype=torch.float32))
        if config.minconv == "exact":
            # softplus keeps the quadratic penalty positive
            raw = float(np.log(np.expm1(config.penalty_init)))
            self.penalty_raw = nn.Parameter(torch.tensor(raw, dtype=torch.float32))
        else:
            self.register_parameter("penalty_raw", None)

    @property
    def penalty(self) -> Tensor | None:
        return None if self.penalty_raw is None else F.softplus(self.penalty_raw)

    def data_cost(self, feat_fixed: Tensor, feat_moving: Tensor) -> Tensor:
        """``a1 + a0 * SSD``: ``(Gi, Gj, Gk, L, L, L)``."""
        cfg = self.config
        ssd = ops.correlation(feat_fixed, feat_moving, cfg.grid, cfg.disp_size, cfg.capture)
        return self.alpha[1] + self.alpha[0] * ssd

    def regularise(self, cost: Tensor) -> Tensor:
        """Two mean-field iterations; the second sees ``a4 + a2 * D + a3 * (first output)``."""
        mode, pen = self.config.minconv, self.penalty
        first = ops.mean_field_step(cost, mode, pen)
        second_in = self.alpha[4] + self.alpha[2] * cost + self.alpha[3] * first
        return ops.mean_field_step(second_in, mode, pen)

    def register_features(self, feat_fixed: Tensor, feat_moving: Tensor) -> Registration:
        """Everything after the feature network (used directly by known-answer tests)."""
        cfg = self.config
        cost = self.regularise(self.data_cost(feat_fixed, feat_moving))
        probs = ops.displacement_probabilities(cost, self.alpha[5])
        disp = ops.expected_displacement(probs, cfg.disp_size, cfg.capture)
        return Registration(cost=cost, probs=probs, grid_disp=disp)

    def forward(self, fixed: Tensor, moving: Tensor) -> Registration:
        if fixed.shape != moving.shape or fixed.dim() != 5 or fixed.shape[:2] != (1, 1):
            raise PddnetError(f"PDDNet expects fixed and moving as (1, 1, I, J, K) of one shape; "
                             f"got {tuple(fixed.shape)} and {tuple(moving.shape)}")
        return self.register_features(self.features(fixed), self.features(moving))

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters())
