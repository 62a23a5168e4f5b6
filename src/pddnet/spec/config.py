"""Model configuration: one dataclass, named presets, and the preprocessing contract.

The architecture does not depend on the image size (offsets, control grid and displacements
live in normalised coordinates), so the same weights run at any input shape. The shape a
model was trained and exported at is recorded next to it, not in the config.

Torch-free: the runtime and export read configs from checkpoints and ONNX metadata.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from pddnet.errors import PddnetError

MINCONV_MODES = ("approx", "exact")


@dataclass(frozen=True)
class Intensity:
    """CT intensity normalisation: ``x = clip(HU, lower, upper) / scale``."""

    lower: float = -1000.0
    upper: float = 1500.0
    scale: float = 500.0

    def as_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class PDDConfig:
    """Hyper-parameters of PDD-Net (Heinrich, MICCAI 2019).

    Attributes:
        channels: feature channels ``c`` of the OBELISK network (the paper: 16).
        grid: control grid points per axis ``(G_i, G_j, G_k)``; the paper uses 32^3.
        disp_size: displacements per axis ``L`` (odd); ``L^3`` candidates per control point.
        capture: capture range ``q`` in normalised units; the displacement lattice spacing
            is ``2 q / (L - 1)``.
        minconv: ``"approx"`` (min-pool + two average pools, the paper) or ``"exact"``
            (lower envelope of parabolas, separable per axis).
        alpha_init: initial values of the six trainable scalars
            ``(a0, a1, a2, a3, a4, a5)``: cost scale and offset, the second mean-field
            iteration's weights of the data cost and of the first iteration, its offset,
            and the softmax temperature.
        penalty_init: initial quadratic penalty (cost per squared displacement step) of the
            exact min-convolution; unused by ``approx``.
        intensity: preprocessing contract for CT input.
    """

    channels: int = 16
    grid: tuple[int, int, int] = (32, 32, 32)
    disp_size: int = 15
    capture: float = 0.4
    minconv: str = "approx"
    alpha_init: tuple[float, ...] = (1.0, 0.1, 1.0, 1.0, 0.1, 1.0)
    penalty_init: float = 0.5
    intensity: Intensity = field(default_factory=Intensity)

    def __post_init__(self) -> None:
        problems = []
        if self.channels < 1:
            problems.append(f"channels must be >= 1, got {self.channels}")
        if len(self.grid) != 3 or any(int(g) < 2 for g in self.grid):
            problems.append(f"grid must be three sizes >= 2, got {self.grid}")
        if self.disp_size < 3 or self.disp_size % 2 == 0:
            problems.append(f"disp_size must be odd and >= 3, got {self.disp_size}")
        if not 0.0 < self.capture <= 1.0:
            problems.append(f"capture must be in (0, 1], got {self.capture}")
        if self.minconv not in MINCONV_MODES:
            problems.append(f"minconv must be one of {MINCONV_MODES}, got {self.minconv!r}")
        if len(self.alpha_init) != 6:
            problems.append(f"alpha_init needs 6 values, got {len(self.alpha_init)}")
        if problems:
            raise PddnetError("invalid PDDConfig: " + "; ".join(problems))
        object.__setattr__(self, "grid", tuple(int(g) for g in self.grid))
        object.__setattr__(self, "alpha_init", tuple(float(a) for a in self.alpha_init))

    @property
    def disp_step(self) -> float:
        """Spacing of the displacement lattice in normalised units."""
        return 2.0 * self.capture / (self.disp_size - 1)

    @staticmethod
    def feature_shape(image_shape: tuple[int, int, int]) -> tuple[int, int, int]:
        """Grid on which OBELISK features are sampled: a third of the image per axis."""
        shape = tuple(int(n) // 3 for n in image_shape)
        if min(shape) < 2:
            raise PddnetError(f"image shape {tuple(image_shape)} is too small: each axis needs "
                              f">= 6 voxels")
        return shape  # type: ignore[return-value]

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["grid"] = list(self.grid)
        d["alpha_init"] = list(self.alpha_init)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PDDConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise PddnetError(f"unknown PDDConfig keys {sorted(unknown)}; this pddnet knows "
                              f"{sorted(known)}")
        d = dict(d)
        if "intensity" in d and isinstance(d["intensity"], dict):
            d["intensity"] = Intensity(**d["intensity"])
        if "grid" in d:
            d["grid"] = tuple(d["grid"])
        if "alpha_init" in d:
            d["alpha_init"] = tuple(d["alpha_init"])
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), sort_keys=True)


PRESETS: dict[str, PDDConfig] = {
    # As published: c = 16 (about 120k weights), G = 32, L = 15, q = 0.4 (3375 displacements).
    "paper": PDDConfig(channels=16, grid=(32, 32, 32), disp_size=15, capture=0.4),
    # Sized for the `small` synthetic data (96x80x128 at 4 mm) and training on 2 CPU cores.
    "small": PDDConfig(channels=16, grid=(20, 20, 20), disp_size=11, capture=0.3),
    # Unit tests: a few milliseconds per forward pass.
    "tiny": PDDConfig(channels=4, grid=(6, 6, 6), disp_size=5, capture=0.3),
}

#: image shape each preset is meant for (the data the shipped weights were trained on)
PRESET_IMAGE_SHAPES: dict[str, tuple[int, int, int]] = {
    "paper": (192, 160, 256),
    "small": (96, 80, 128),
    "tiny": (24, 24, 24),
}


def preset(name: str, **overrides: Any) -> PDDConfig:
    """Return a named preset, optionally with fields replaced."""
    if name not in PRESETS:
        raise PddnetError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    cfg = PRESETS[name]
    return dataclasses.replace(cfg, **overrides) if overrides else cfg
