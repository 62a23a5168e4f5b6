"""Model configuration: one dataclass, named presets, and the preprocessing contract.

The architecture does not depend on the image size (offsets, control grid and displacements
live in normalised coordinates), so the same weights run at any input shape. The shape a
model was trained and exported at is recorded next to it, not in the config.

Torch-free: the runtime and export read configs from checkpoints and ONNX metadata.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import reprlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pddnet.errors import PddnetError

MINCONV_MODES = ("approx", "exact")

# --------------------------------------------------------------------------------------------
# bounds: a config (from a checkpoint or a model's metadata) outside them is refused before any
# network is built or any buffer is allocated
# --------------------------------------------------------------------------------------------
#: feature channels ``c``: 1..256. The paper uses 16; each channel adds a full-resolution
#: feature volume per image, so hundreds of channels only cost memory.
MIN_CHANNELS, MAX_CHANNELS = 1, 256
#: control grid points per axis: 2..64. The paper uses 32 (its stage two 48); the cost volume
#: grows with the cube of the grid.
MIN_GRID, MAX_GRID = 2, 64
#: displacements per axis ``L`` (odd): 3..31. The paper uses 15; the cost volume and every
#: mean-field step grow with ``L^3`` (``disp_size`` 1001 would allocate for minutes and GBs).
MIN_DISP_SIZE, MAX_DISP_SIZE = 3, 31
#: largest cost volume ``G_i * G_j * G_k * L^3`` (elements; 4 GiB as float32). The paper's
#: stage one is 32^3 * 15^3 = 1.1e8, its stage two 48^3 * 15^3 = 3.7e8.
MAX_COST_VOLUME = 2 ** 30
#: capture range ``q`` in normalised units: (0, 1] (1 is half the image extent).
MAX_CAPTURE = 1.0
#: model grid (``image_shape``) per axis: 6..1024 voxels (the features are sampled on a third of
#: it, which needs >= 2 per axis); the paper's grid is 192 x 160 x 256.
MIN_IMAGE_AXIS, MAX_IMAGE_AXIS = 6, 1024
#: largest model grid in voxels (2^28: the displacement field alone is 3 GiB as float32).
MAX_IMAGE_VOXELS = 2 ** 28
#: largest ``num_labels``: the label maps the runtime reads hold values 0..255.
MAX_NUM_LABELS = 255

_repr = reprlib.Repr()
_repr.maxlevel, _repr.maxstring, _repr.maxother = 2, 40, 40
_repr.maxlist = _repr.maxtuple = _repr.maxdict = 4


def show(value: Any) -> str:
    """A short one-line description of ``value`` for error messages: its (abridged) repr and
    type; never raises (huge integers, deep nesting, odd objects)."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool) and \
            abs(int(value)).bit_length() > 64:
        return f"an integer of {abs(int(value)).bit_length()} bits ({type(value).__name__})"
    try:
        text = _repr.repr(value)
    except Exception:  # a huge int nested in a list, a broken __repr__, ...
        text = "<unprintable>"
    return f"{text} ({type(value).__name__})"


def is_int(value: Any) -> bool:
    """An integer that is not a bool (numpy integers count)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value: Any) -> bool:
    """A finite real number that is not a bool (numpy numbers count)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False
    try:
        return math.isfinite(float(value))
    except (OverflowError, ValueError, TypeError):
        return False


def check_image_shape(value: Any, *, name: str = "image_shape") -> tuple[int, int, int]:
    """``value`` as the model grid ``(I, J, K)``: three integers in
    [:data:`MIN_IMAGE_AXIS`, :data:`MAX_IMAGE_AXIS`], at most :data:`MAX_IMAGE_VOXELS` in all.
    Raises :class:`PddnetError` (``"{name} is ...; expected ..."``) otherwise."""
    expected = (f"expected three integers in [{MIN_IMAGE_AXIS}, {MAX_IMAGE_AXIS}] (the model "
                f"grid I J K in voxels, at most {MAX_IMAGE_VOXELS} voxels)")
    if not isinstance(value, (list, tuple)) or len(value) != 3 or not all(
            is_int(n) and MIN_IMAGE_AXIS <= n <= MAX_IMAGE_AXIS for n in value):
        raise PddnetError(f"{name} is {show(value)}; {expected}")
    shape = tuple(int(n) for n in value)
    if math.prod(shape) > MAX_IMAGE_VOXELS:
        raise PddnetError(f"{name} is {list(shape)} ({math.prod(shape)} voxels); {expected}")
    return shape  # type: ignore[return-value]


#: Intensity normalisation modes: ``ct`` (a fixed Hounsfield window) and ``mr`` (a z-score
#: within the image's own foreground, for images without an absolute intensity unit).
INTENSITY_MODES = ("ct", "mr")
_MODE_KEYS = {"ct": ("lower", "upper", "scale"), "mr": ("z_lower", "z_upper")}
#: The formula of each mode, in the names of its fields (bundles' ``preprocessing.json``).
INTENSITY_FORMULAS = {
    "ct": "clip(HU, intensity.lower, intensity.upper) / intensity.scale",
    "mr": "clip((v - mean_F) / std_F, intensity.z_lower, intensity.z_upper), F = the voxels "
          "above the image mean",
}


@dataclass(frozen=True)
class Intensity:
    """Intensity normalisation, part of the model contract (chosen at training, recorded in the
    checkpoint and the exported metadata, applied by :func:`normalise_intensity` in training and
    in the runtime alike).

    ``mode="ct"``: ``x = clip(HU, lower, upper) / scale`` (defaults map [-1000, 1500] HU onto
    [-2, 3]).

    ``mode="mr"``: ``x = clip((v - mean_F) / std_F, z_lower, z_upper)``, where ``F`` is the
    image's foreground, the voxels brighter than the image's mean, and ``mean_F``/``std_F`` are
    the mean and standard deviation of ``v`` over ``F``. Unchanged by any ``a * v + b`` with
    ``a > 0`` (``F`` too is), so MR in arbitrary units needs no hand rescaling; the default clip
    range [-2, 3] is the numeric range of the ``ct`` default. Chosen over a foreground
    percentile window because the same tissue lands at more similar values across subjects with
    bias fields (docs/benchmarks.md, "MR intensity normalisation").
    """

    lower: float = -1000.0
    upper: float = 1500.0
    scale: float = 500.0
    mode: str = "ct"
    z_lower: float = -2.0
    z_upper: float = 3.0

    def __post_init__(self) -> None:
        if not (isinstance(self.mode, str) and self.mode in INTENSITY_MODES):
            raise PddnetError(f"invalid intensity normalisation: mode must be one of "
                              f"{list(INTENSITY_MODES)} (ct: Hounsfield units; mr: MR or any "
                              f"image without an absolute scale), got {show(self.mode)}")
        keys = _MODE_KEYS[self.mode]
        bad = [f"{k} must be a finite number, got {show(getattr(self, k))}"
               for k in keys if not is_real(getattr(self, k))]
        if not bad and self.mode == "ct" and (self.upper <= self.lower or self.scale == 0):
            bad.append(f"needs upper > lower and scale != 0, got lower {self.lower}, upper "
                       f"{self.upper}, scale {self.scale}")
        if not bad and self.mode == "mr" and self.z_upper <= self.z_lower:
            bad.append(f"needs z_upper > z_lower, got z_lower {self.z_lower}, z_upper "
                       f"{self.z_upper}")
        other = [k for m, ks in _MODE_KEYS.items() if m != self.mode for k in ks
                 if getattr(self, k) != _DEFAULTS[k]]
        if other:
            bad.append(f"{', '.join(other)} belong to another mode than {self.mode!r} (mode "
                       f"{self.mode!r} uses {', '.join(keys)})")
        if bad:
            raise PddnetError("invalid intensity normalisation: " + "; ".join(bad))
        for k in keys:
            object.__setattr__(self, k, float(getattr(self, k)))

    def as_dict(self) -> dict[str, Any]:
        """``{"mode", ...}`` with the fields of this mode only (the metadata form)."""
        return {"mode": self.mode, **{k: getattr(self, k) for k in _MODE_KEYS[self.mode]}}

    @classmethod
    def from_dict(cls, d: Any) -> "Intensity":
        """The inverse of :meth:`as_dict`; a dict without ``mode`` (written before modes
        existed) is ``ct``. Keys of another mode, unknown keys or bad values raise
        :class:`PddnetError`."""
        if not isinstance(d, dict):
            raise PddnetError(f"invalid intensity normalisation: expected an object {{mode, "
                              f"...}}, got {show(d)}")
        mode = d.get("mode", "ct")
        if not (isinstance(mode, str) and mode in INTENSITY_MODES):
            return cls(mode=mode)  # raises with the list of modes
        allowed = ("mode",) + _MODE_KEYS[mode]
        extra = [k for k in d if k not in allowed]
        if extra:
            raise PddnetError(f"invalid intensity normalisation: intensity has unknown keys "
                              f"{_repr.repr(extra)} for mode {mode!r}; expected "
                              f"{', '.join(allowed)}")
        missing = [k for k in _MODE_KEYS[mode] if k not in d]
        if missing:
            raise PddnetError(f"invalid intensity normalisation: mode {mode!r} needs "
                              f"{', '.join(_MODE_KEYS[mode])}; missing {', '.join(missing)}")
        return cls(**d)

    def describe(self) -> str:
        """The formula in words, for notes and bundle descriptions."""
        if self.mode == "ct":
            return (f"clipped to [{self.lower:g}, {self.upper:g}] HU and divided by "
                    f"{self.scale:g}")
        return (f"z-score within the foreground (voxels above the image mean), clipped to "
                f"[{self.z_lower:g}, {self.z_upper:g}]")


_DEFAULTS = {f.name: f.default for f in dataclasses.fields(Intensity)}


def normalise_intensity(image: Any, intensity: Intensity) -> np.ndarray:
    """The one implementation of the intensity contract (:class:`Intensity`): ``image`` (any
    real array, on the model grid) -> float32 array of the same shape. Training and the runtime
    both call this."""
    if not isinstance(intensity, Intensity):
        raise PddnetError(f"normalise_intensity: expected an Intensity, got {show(intensity)}")
    if intensity.mode == "ct":
        return (np.clip(np.asarray(image, dtype=np.float32), intensity.lower, intensity.upper)
                / np.float32(intensity.scale)).astype(np.float32)
    v = np.asarray(image, dtype=np.float64)  # statistics in float64, the result float32
    fg = v[v > v.mean()] if v.size else v
    std = float(fg.std()) if fg.size else 0.0
    if not std > 0 or not math.isfinite(std):
        raise PddnetError(
            f"normalise_intensity (mr): the image has no foreground spread (values "
            f"{float(v.min()) if v.size else 'none'}..{float(v.max()) if v.size else 'none'}); "
            "a constant or two-valued image cannot be normalised -- is it the right scan?")
    z = (v - float(fg.mean())) / std
    return np.clip(z, intensity.z_lower, intensity.z_upper).astype(np.float32)


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
        intensity: the intensity normalisation (:class:`Intensity`: ``ct`` or ``mr``).
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
        if not (is_int(self.channels) and MIN_CHANNELS <= self.channels <= MAX_CHANNELS):
            problems.append(f"channels must be an integer in [{MIN_CHANNELS}, {MAX_CHANNELS}], "
                            f"got {show(self.channels)}")
        grid_ok = isinstance(self.grid, (list, tuple)) and len(self.grid) == 3 and all(
            is_int(g) and MIN_GRID <= g <= MAX_GRID for g in self.grid)
        if not grid_ok:
            problems.append(f"grid must be three integers in [{MIN_GRID}, {MAX_GRID}], got "
                            f"{show(self.grid)}")
        disp_ok = is_int(self.disp_size) and MIN_DISP_SIZE <= self.disp_size <= MAX_DISP_SIZE \
            and self.disp_size % 2 == 1
        if not disp_ok:
            problems.append(f"disp_size must be an odd integer in [{MIN_DISP_SIZE}, "
                            f"{MAX_DISP_SIZE}], got {show(self.disp_size)}")
        if not (is_real(self.capture) and 0.0 < self.capture <= MAX_CAPTURE):
            problems.append(f"capture must be a number in (0, {MAX_CAPTURE:g}], got "
                            f"{show(self.capture)}")
        if not (isinstance(self.minconv, str) and self.minconv in MINCONV_MODES):
            problems.append(f"minconv must be one of {MINCONV_MODES}, got {show(self.minconv)}")
        if not isinstance(self.alpha_init, (list, tuple)) or len(self.alpha_init) != 6 or \
                not all(is_real(a) for a in self.alpha_init):
            problems.append(f"alpha_init must be 6 finite numbers, got {show(self.alpha_init)}")
        if not is_real(self.penalty_init):
            problems.append(f"penalty_init must be a finite number, got "
                            f"{show(self.penalty_init)}")
        if not isinstance(self.intensity, Intensity):
            problems.append(f"intensity must be {{mode, ...}} (mode ct: lower, upper, scale; "
                            f"mr: z_lower, z_upper), got "
                            f"{show(self.intensity)}")
        if grid_ok and disp_ok:
            volume = math.prod(int(g) for g in self.grid) * int(self.disp_size) ** 3
            if volume > MAX_COST_VOLUME:
                problems.append(f"grid {[int(g) for g in self.grid]} with disp_size "
                                f"{self.disp_size} needs a cost volume of {volume:.3g} elements, "
                                f"more than {MAX_COST_VOLUME:.3g} (use a coarser grid or fewer "
                                "displacements)")
        if problems:
            raise PddnetError("invalid PDDConfig: " + "; ".join(problems))
        object.__setattr__(self, "channels", int(self.channels))
        object.__setattr__(self, "grid", tuple(int(g) for g in self.grid))
        object.__setattr__(self, "disp_size", int(self.disp_size))
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
        d["intensity"] = self.intensity.as_dict()
        d["grid"] = list(self.grid)
        d["alpha_init"] = list(self.alpha_init)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PDDConfig":
        """The config a checkpoint or a model's metadata stores (:meth:`as_dict`); wrong types,
        unknown keys or values outside the bounds above raise :class:`PddnetError`."""
        if not isinstance(d, dict):
            raise PddnetError(f"invalid PDDConfig: expected a dict of its fields, got {show(d)}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = [k for k in d if k not in known]
        if unknown:
            names = sorted(_repr.repr(k) if not isinstance(k, str) else k for k in unknown)
            raise PddnetError(f"unknown PDDConfig keys {_repr.repr(names)}; this pddnet knows "
                              f"{sorted(known)}")
        d = dict(d)
        if isinstance(d.get("intensity"), dict):
            try:
                d["intensity"] = Intensity.from_dict(d["intensity"])
            except PddnetError as exc:
                raise PddnetError(f"invalid PDDConfig: {exc}") from None
        for key in ("grid", "alpha_init"):
            if isinstance(d.get(key), list):
                d[key] = tuple(d[key])
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
