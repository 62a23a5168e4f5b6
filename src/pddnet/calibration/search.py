"""Sensitivity search: which blocks may run in FP16 / INT8, decided by Dice.

Two parts:

* :func:`choose` -- the decision, a pure function: given each block's measured effect alone
  (worst-pair |ΔDice|) and its saving, and a way to measure any combination end to end, pick
  the assignment. Blocks whose saving is not positive, or whose effect alone exceeds the gate,
  stay FP32. The remaining candidates are first measured all together (if that passes it is
  the fastest assignment); otherwise they are added greedily in order of saving (largest
  first), each kept only if the *combination* still passes the gate when measured end to
  end. Greedy by saving is exact when effects add up and savings do not interact; it is a
  heuristic otherwise -- every kept combination is measured, so the final ΔDice is a
  measurement, never a sum.
* :class:`Evaluator` -- the measurements, with the runtime: a candidate graph registers the
  search pairs through :class:`pddnet.runtime.session.Registrar` (the same pre- and
  post-processing as ``pddnet register`` and ``pddnet validate``) and is compared with the FP32
  graph on the same pairs: worst-pair and mean |ΔDice| in points, max and mean |Δdisp| in
  voxels at full resolution; :meth:`Evaluator.time` times graphs interleaved on one pair
  (medians of ``Registrar.run_model``, the model execution).

``run_search`` (in :mod:`pddnet.calibration.api`) wires these to the FP16 and INT8 graph
builders. Torch-free.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from pddnet.errors import PddnetError

#: default gates: worst-pair |ΔDice| in points against the FP32 graph
DEFAULT_GATES = {"fp16": 0.5, "int8": 1.0}


@dataclass(frozen=True)
class DispGates:
    """The displacement gates in mm of a reduced precision against FP32 (``None``: not set).

    ``p99_mm`` bounds, on every pair, the 99th percentile over the full-resolution voxels of
    ``|Δu|`` in mm (:func:`pddnet.validation.compare.displacement_difference`); ``max_mm`` its
    maximum. What is compared is the worst pair's value."""

    p99_mm: float | None = 1.0
    max_mm: float | None = 2.0

    def __post_init__(self) -> None:
        for name in ("p99_mm", "max_mm"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v)
                                      and v >= 0):
                raise PddnetError(f"displacement gate {name} must be a finite number >= 0 mm "
                                  f"or None, got {v!r}")

    def checks(self, m: "Measure") -> list[tuple[str, float | None, float]]:
        out = []
        if self.p99_mm is not None:
            out.append(("p99 |Δu|", m.disp_p99_mm, float(self.p99_mm)))
        if self.max_mm is not None:
            out.append(("max |Δu|", m.disp_max_mm, float(self.max_mm)))
        return out

    def as_dict(self) -> dict[str, float | None]:
        return {"disp_diff_p99_mm": self.p99_mm, "disp_diff_max_mm": self.max_mm}


@dataclass
class Measure:
    """Accuracy of one candidate graph against the FP32 graph over the search pairs."""

    delta_dice_max: float          # worst pair |ΔDice|, points
    delta_dice_mean: float         # mean over pairs of ΔDice (signed), points
    disp_max: float                # max over pairs of max |Δu|, voxels (full resolution)
    disp_mean: float               # mean over pairs of mean |Δu|, voxels
    dice_mean: float | None = None  # the candidate's mean Dice (fraction)
    pairs: int = 0
    error: str | None = None
    disp_p99_mm: float | None = None  # max over pairs of the p99 over voxels of |Δu|, mm
    disp_max_mm: float | None = None  # max over pairs of max |Δu|, mm

    def failures(self, gate: float, disp_gates: DispGates | None = None) -> list[str]:
        """Why this measure does not pass (empty: it passes): the Dice gate ``gate`` (points)
        and the displacement gates in mm, each as ``"p99 |Δu| 1.8 mm > 1 mm"``."""
        if self.error is not None:
            return [self.error]
        out = []
        if not (math.isfinite(self.delta_dice_max) and self.delta_dice_max <= gate):
            out.append(f"|ΔDice| {self.delta_dice_max:.3f} > {gate:g} points")
        for label, value, limit in (disp_gates or DispGates(None, None)).checks(self):
            if value is None or not math.isfinite(value) or value > limit:
                shown = "undefined" if value is None or not math.isfinite(value) else \
                    f"{value:.2f} mm"
                out.append(f"{label} {shown} > {limit:g} mm")
        return out

    def passes(self, gate: float, disp_gates: DispGates | None = None) -> bool:
        return not self.failures(gate, disp_gates)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Decision:
    """The outcome of :func:`choose`."""

    precision: str
    gate: float
    chosen: list[str]
    measure: Measure | None           # end-to-end measure of ``chosen`` (None: nothing chosen)
    steps: list[dict[str, Any]] = field(default_factory=list)
    excluded: dict[str, str] = field(default_factory=dict)  # block -> reason
    disp_gates_mm: dict[str, float | None] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"precision": self.precision, "gate_points": self.gate,
                "disp_gates_mm": dict(self.disp_gates_mm), "chosen": self.chosen,
                "measure": self.measure.as_dict() if self.measure else None,
                "steps": self.steps, "excluded": self.excluded}


def choose(blocks: Sequence[str], alone: dict[str, Measure], saving: dict[str, float],
           evaluate: Callable[[list[str]], Measure], *, gate: float, precision: str = "int8",
           min_saving: float = 0.0, disp_gates: DispGates | None = None) -> Decision:
    """The fastest assignment within ``gate`` (module docstring).

    Args:
        blocks: candidate blocks.
        alone: each block's measure when only it is reduced.
        saving: each block's saving (ms, or any positive weight; larger is better).
        evaluate: measures a list of reduced blocks end to end.
        gate: worst-pair |ΔDice| allowed, points.
        min_saving: savings at or below this count as none (measurement noise).
        disp_gates: the displacement gates in mm (default: none); a block or combination
            passes only when it is within ``gate`` and these.
    """
    dg = disp_gates or DispGates(None, None)
    if not gate >= 0:
        raise PddnetError(f"choose: the gate must be >= 0 points, got {gate!r}")
    excluded: dict[str, str] = {}
    candidates = []
    for b in blocks:
        m, s = alone.get(b), saving.get(b)
        if m is None:
            excluded[b] = "not measured"
        elif m.error:
            excluded[b] = f"failed alone: {m.error}"
        elif not m.passes(gate, dg):
            excluded[b] = "alone " + "; ".join(m.failures(gate, dg))
        elif s is None or not s > min_saving:
            excluded[b] = (f"no saving ({'-' if s is None else f'{s:.1f}'} <= {min_saving:g})")
        else:
            candidates.append(b)
    candidates.sort(key=lambda b: -saving[b])
    memo: dict[tuple[str, ...], Measure] = {(b,): alone[b] for b in candidates}

    def measure(trial: list[str]) -> Measure:
        key = tuple(sorted(trial))
        if key not in memo:
            memo[key] = evaluate(list(trial))
        return memo[key]

    steps = []
    if len(candidates) > 1:  # every candidate at once: the fastest assignment if it passes
        m = measure(candidates)
        ok = m.passes(gate, dg)
        steps.append({"try": list(candidates), "delta_dice_max": m.delta_dice_max,
                      "disp_max": m.disp_max, "disp_p99_mm": m.disp_p99_mm,
                      "disp_max_mm": m.disp_max_mm, "kept": ok, "error": m.error,
                      "failures": m.failures(gate, dg)})
        if ok:
            return Decision(precision, gate, list(candidates), m, steps, excluded, dg.as_dict())
    chosen: list[str] = []
    current: Measure | None = None
    for b in candidates:
        trial = chosen + [b]
        m = measure(trial)
        ok = m.passes(gate, dg)
        steps.append({"try": list(trial), "delta_dice_max": m.delta_dice_max,
                      "disp_max": m.disp_max, "disp_p99_mm": m.disp_p99_mm,
                      "disp_max_mm": m.disp_max_mm, "kept": ok, "error": m.error,
                      "failures": m.failures(gate, dg)})
        if ok:
            chosen, current = trial, m
        else:
            excluded[b] = f"with {chosen} " + "; ".join(m.failures(gate, dg))
    return Decision(precision, gate, chosen, current, steps, excluded, dg.as_dict())


# ---------------------------------------------------------------------------------------------
# measurements with the runtime
# ---------------------------------------------------------------------------------------------
class Evaluator:
    """Registers the search pairs with candidate graphs and compares them with the reference.

    Args:
        reference: the FP32 ``.onnx``.
        data_dir, split, max_pairs: the pairs (they need label maps).
        threads: intra-op threads of ONNX Runtime.
    """

    def __init__(self, reference, data_dir, *, split: str = "val", max_pairs: int | None = None,
                 threads: int | None = None, progress: bool = True,
                 echo: Callable[[str], None] | None = None):
        from pddnet.data.learn2reg import Learn2RegDataset

        self.say = echo or (lambda s: None)
        self.threads = threads
        self.progress = progress
        ds = Learn2RegDataset(data_dir)
        pairs = ds.pairs(split)
        if max_pairs:
            pairs = pairs[:max_pairs]
        if not pairs:
            raise PddnetError(f"{data_dir} has no {split} pairs for the sensitivity search")
        for p in pairs:
            if p.fixed.label is None or p.moving.label is None:
                raise PddnetError(f"pair {p} has no label maps; the sensitivity search measures "
                                  "Dice and needs labels for both scans")
        self.split = split
        self.pairs = pairs
        self.loaded = [ds.load_pair(p) for p in pairs]
        self.reference = Path(reference)
        self.ref = self._register(self.reference)
        for r in self.ref:
            if r is None or isinstance(r, str):
                raise PddnetError(f"the FP32 reference failed on a search pair: {r}")
        self.runs = 0

    def _register(self, model) -> list:
        from pddnet.runtime.session import Registrar

        out = []
        with Registrar(model, threads=self.threads) as reg:
            for fixed, moving, fl, ml in self.loaded:
                try:
                    out.append(reg.register(fixed, moving, ml, fl))
                except PddnetError as exc:
                    out.append(str(exc))
        return out

    def measure(self, model) -> Measure:
        """Register every search pair with ``model`` and compare with the reference."""
        self.runs += 1
        try:
            results = self._register(model)
        except PddnetError as exc:
            return Measure(math.inf, math.nan, math.inf, math.nan, None, len(self.pairs),
                           error=str(exc))
        from pddnet.validation.compare import displacement_difference

        dd, dmax, dmean, dice, p99mm, maxmm = [], [], [], [], [], []
        for ref, res in zip(self.ref, results):
            if isinstance(res, str):
                return Measure(math.inf, math.nan, math.inf, math.nan, None, len(self.pairs),
                               error=res)
            a, b = res.metrics.get("dice_mean"), ref.metrics.get("dice_mean")
            if a is not None and b is not None and math.isfinite(a) and math.isfinite(b):
                dd.append(100.0 * (a - b))
                dice.append(a)
            d = displacement_difference(res.disp, ref.disp, res.affine)
            if not all(math.isfinite(v) for v in d.values()):
                return Measure(math.inf, math.nan, math.inf, math.nan, None, len(self.pairs),
                               error="non-finite displacement")
            dmax.append(d["disp_diff_max_vox"])
            dmean.append(d["disp_diff_mean_vox"])
            p99mm.append(d["disp_diff_p99_mm"])
            maxmm.append(d["disp_diff_max_mm"])
        if not dd:
            return Measure(math.inf, math.nan, max(dmax), float(np.mean(dmean)), None,
                           len(self.pairs), error="no pair with a defined Dice",
                           disp_p99_mm=max(p99mm), disp_max_mm=max(maxmm))
        return Measure(float(max(abs(v) for v in dd)), float(np.mean(dd)), float(max(dmax)),
                       float(np.mean(dmean)), float(np.mean(dice)), len(self.pairs),
                       disp_p99_mm=float(max(p99mm)), disp_max_mm=float(max(maxmm)))

    def reference_dice(self) -> float:
        return float(np.mean([r.metrics["dice_mean"] for r in self.ref]))

    def time(self, models: dict[str, Any], *, repeats: int = 5, warmup: int = 1,
             pair: int = 0) -> dict[str, dict[str, Any]]:
        """Median model-execution time of each graph (``Registrar.run_model`` on one search
        pair), runs interleaved across graphs so that load changes hit all alike."""
        from pddnet.graph.model import load_model
        from pddnet.runtime.preprocess import prepare_fixed, prepare_moving
        from pddnet.runtime.session import Registrar

        first = next(iter(models.values()))
        info = load_model(first).info
        fixed, moving, _, _ = self.loaded[pair]
        pf = prepare_fixed(fixed, info)
        pm = prepare_moving(moving, pf, info)
        regs = {k: Registrar(v, threads=self.threads) for k, v in models.items()}
        samples: dict[str, list[float]] = {k: [] for k in models}
        try:
            for i in range(warmup + repeats):
                for k, reg in regs.items():
                    _, ms = reg.run_model(pf.array, pm.array)
                    if i >= warmup:
                        samples[k].append(ms)
        finally:
            for reg in regs.values():
                reg.close()
        return {k: {"median_ms": statistics.median(v), "samples_ms": [round(x, 1) for x in v]}
                for k, v in samples.items()}


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def timestamp() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def blocks_of(names: Iterable[str]) -> list[str]:
    from pddnet.spec import contract as C

    names = list(names)
    bad = sorted(set(names) - set(C.BLOCKS))
    if bad:
        raise PddnetError(f"unknown block(s) {bad}; blocks are {list(C.BLOCKS)}")
    return [b for b in C.BLOCKS if b in names]
