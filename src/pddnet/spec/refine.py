"""Refinement and registration-mode settings shared by the PyTorch reference and the runtime.

Instance optimisation ("pdd+inst") and the two-stage mode ("2 warps") are defined in
``docs/refinement.md``; :mod:`pddnet.model.refine` implements them with PyTorch and
:mod:`pddnet.runtime.refine` with numpy. Both take their settings from here, so neither imports
the other. numpy only (for integer checks).

Two refinement methods (:data:`METHODS`): ``features`` (the default) fits a dense field on the
feature grid to the fixed and moving scans' features; ``probs`` is the paper's fit of the
control-grid field to the network's displacement probabilities.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pddnet.errors import PddnetError

#: registration modes reported side by side by ``pddnet evaluate`` / ``pddnet validate``:
#: name -> (stages, refined). ``ff`` is the network alone; ``inst`` the paper's pdd+inst;
#: ``2stage`` two warps without and ``2stage+inst`` with refinement (of the stages
#: :attr:`RefineOptions.stages_refined` names: by default the last one for ``features``, both
#: for ``probs`` as the authors' two-warp script).
#: ``inst-probs`` / ``2stage+inst-probs`` refine with the paper's probability fit
#: (:data:`MODE_METHODS`); the other refined modes use the options' method (default
#: ``features``).
MODES: dict[str, tuple[int, bool]] = {"ff": (1, False), "inst": (1, True), "2stage": (2, False),
                                      "2stage+inst": (2, True), "inst-probs": (1, True),
                                      "2stage+inst-probs": (2, True)}

#: refined modes bound to one refinement method
MODE_METHODS: dict[str, str] = {"inst-probs": "probs", "2stage+inst-probs": "probs"}


def parse_modes(modes) -> list[str]:
    """``"ff,inst"`` or a sequence -> a list of known mode names (order kept, no repeats)."""
    items = modes.split(",") if isinstance(modes, str) else list(modes)
    out = []
    for m in (str(x).strip() for x in items):
        if not m:
            continue
        if m not in MODES:
            raise PddnetError(f"unknown registration mode {m!r}; choose from {list(MODES)}")
        if m not in out:
            out.append(m)
    if not out:
        raise PddnetError(f"no registration mode given; choose from {list(MODES)}")
    return out


#: stage two: control grid per axis = round(GRID_SCALE * stage-one grid)
STAGE2_GRID_SCALE = 1.5
#: stage two: capture range = CAPTURE_SCALE * stage-one capture range
STAGE2_CAPTURE_SCALE = 0.5


#: refinement methods: ``features`` (image evidence: the features of both scans, on a dense
#: field at feature resolution) and ``probs`` (the paper's fit to the network's probabilities)
METHODS = ("features", "probs")

#: per-method defaults of :class:`RefineOptions` (``docs/refinement.md`` says how they were
#: chosen: ``probs`` as the authors' two-warp script, ``features`` on a selection set)
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    "features": {"steps": 40, "lr": 0.02, "weight": 4.0, "components": 4,
                 "stages_refined": "last"},
    "probs": {"steps": 50, "lr": 0.02, "weight": 1.5, "stages_refined": "all"},
}

#: which stages of a multi-stage registration are refined: ``last`` (only the last stage; the
#: earlier ones feed it unrefined) or ``all`` (every stage)
STAGES_REFINED = ("last", "all")


@dataclass(frozen=True)
class RefineOptions:
    """Instance optimisation settings (``docs/refinement.md`` has the exact energies).

    ``steps``, ``lr`` and ``weight`` left at ``None`` take the method's defaults
    (:data:`METHOD_DEFAULTS`), so ``RefineOptions(steps=30)`` is the default method with 30
    steps and ``RefineOptions(method="probs")`` the paper's fit with the authors' settings.

    Attributes:
        steps: Adam iterations (0: the initial field, smoothed).
        lr: Adam learning rate, normalised units per step.
        weight: ``lam``, weight of the diffusion penalty (``probs``: of the control-grid field
            in normalised units; ``features``: of the feature-grid field in feature voxels).
        betas, eps: Adam's moment decay rates and denominator offset.
        method: ``"features"`` (default) or ``"probs"`` (:data:`METHODS`).
        components: ``features`` only: the number of principal components of the normalised
            fixed features the SSD is measured in (``None`` for ``probs``).
        stages_refined: in two stages, ``"last"`` (refine stage two only; stage one's network
            field feeds stage two unrefined) or ``"all"`` (refine both). Default per method:
            ``features`` ``"last"`` (selection set, docs/benchmarks.md), ``probs`` ``"all"``
            (the authors' two-warp script). One stage is always refined.
    """

    steps: int | None = None
    lr: float | None = None
    weight: float | None = None
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    method: str = "features"
    components: int | None = None
    stages_refined: str | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise PddnetError(f"RefineOptions: method must be one of {list(METHODS)}, got "
                              f"{self.method!r}")
        for key, value in METHOD_DEFAULTS[self.method].items():
            if getattr(self, key) is None:
                object.__setattr__(self, key, value)
        if isinstance(self.steps, bool) or not isinstance(self.steps, (int, np.integer)) \
                or self.steps < 0:
            raise PddnetError(f"RefineOptions: steps must be an integer >= 0, got {self.steps!r}")
        if not self.lr > 0 or not self.weight >= 0 or not self.eps > 0:
            raise PddnetError(f"RefineOptions: need lr > 0, weight >= 0, eps > 0; got lr="
                              f"{self.lr}, weight={self.weight}, eps={self.eps}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise PddnetError(f"RefineOptions: betas must be two values in [0, 1), got "
                              f"{self.betas}")
        if self.method == "probs" and self.components is not None:
            raise PddnetError("RefineOptions: components applies to method 'features' only")
        if self.components is not None and (isinstance(self.components, bool) or not isinstance(
                self.components, (int, np.integer)) or self.components < 1):
            raise PddnetError(f"RefineOptions: components must be an integer >= 1, got "
                              f"{self.components!r}")
        if self.stages_refined not in STAGES_REFINED:
            raise PddnetError(f"RefineOptions: stages_refined must be one of "
                              f"{list(STAGES_REFINED)}, got {self.stages_refined!r}")
        object.__setattr__(self, "steps", int(self.steps))
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def coerce(cls, value: "RefineOptions | int | None") -> "RefineOptions | None":
        """``None``/``0``/``False`` -> ``None`` (no refinement); an int -> that many steps; a
        dict -> ``RefineOptions(**value)`` (the JSON form, e.g. ``{"steps": 50, "method":
        "probs"}``)."""
        if value is None or value is False:
            return None
        if isinstance(value, RefineOptions):
            return value
        if isinstance(value, dict):
            known = set(cls.__dataclass_fields__)
            if set(value) - known:
                raise PddnetError(f"refine: unknown settings {sorted(set(value) - known)}; "
                                  f"known: {sorted(known)}")
            d = dict(value)
            if "betas" in d:
                d["betas"] = tuple(d["betas"])
            return cls(**d)
        if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
            return cls(steps=int(value)) if value > 0 else None
        raise PddnetError(f"refine must be None, a number of steps or RefineOptions, got "
                          f"{value!r}")

    def refined_stages(self, stages: int) -> list[int]:
        """The stages (1-based) refined in a registration of ``stages`` stages: ``[stages]``
        for ``"last"``, ``[1, ..., stages]`` for ``"all"``."""
        if isinstance(stages, bool) or not isinstance(stages, (int, np.integer)) or stages < 1:
            raise PddnetError(f"refined_stages: stages must be an integer >= 1, got {stages!r}")
        return [int(stages)] if self.stages_refined == "last" else list(range(1, int(stages) + 1))

    def with_method(self, method: str) -> "RefineOptions":
        """The same number of steps (and Adam constants) with ``method``'s lr, weight and
        ``stages_refined``."""
        if method == self.method:
            return self
        return RefineOptions(steps=self.steps, betas=self.betas, eps=self.eps, method=method)


def mode_options(mode: str, options: "RefineOptions | None") -> "RefineOptions | None":
    """The refinement a registration mode runs: ``None`` for an unrefined mode, else
    ``options`` (default :class:`RefineOptions`) switched to the mode's method where the mode
    names one (:data:`MODE_METHODS`)."""
    if not MODES[mode][1]:
        return None
    opts = options or RefineOptions()
    return opts.with_method(MODE_METHODS[mode]) if mode in MODE_METHODS else opts


def stage2_overrides(config: dict[str, Any], *, grid_scale: float = STAGE2_GRID_SCALE,
                     capture_scale: float = STAGE2_CAPTURE_SCALE) -> dict[str, Any]:
    """Config overrides of the stage-two model: a finer grid and a smaller capture range.

    ``grid = round(grid_scale * G)`` per axis, ``capture = capture_scale * q``; the number of
    displacements ``L`` and every weight stay the same (the lattice step shrinks with ``q``).
    """
    grid = [max(2, int(round(grid_scale * int(g)))) for g in config["grid"]]
    return {"grid": grid, "capture": round(float(config["capture"]) * capture_scale, 6)}


def stage2_path(model_path: str | os.PathLike) -> Path:
    """Where ``pddnet export --stage2`` writes the stage-two model: ``m.onnx`` -> ``m.stage2.onnx``."""
    p = Path(model_path)
    stem = p.name[:-5] if p.name.lower().endswith(".onnx") else p.name
    return p.with_name(f"{stem}.stage2.onnx")
