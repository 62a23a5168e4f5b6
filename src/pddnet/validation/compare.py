"""``pddnet validate``: every deployed form of a model against the PyTorch reference.

A comparator in the Polygraphy sense: a list of :class:`Candidate` s -- each a runtime backend
(``torch``, ``onnxruntime``, later ``tensorrt``), a model file and a precision label, with its
own :class:`Gate` s -- is run on the same registration pairs, and each is compared with the
reference candidate (the PyTorch network of the checkpoint, itself just the ``torch`` backend).

Every candidate goes through the same :class:`~pddnet.runtime.session.Registrar` pipeline:
the same NIfTI pre-processing onto the model grid, the same split into features and head, the
same post-processing (field onto the fixed file's grid, warping of the moving labels) and the
same Learn2Reg metrics, so differences come only from the model execution.

Two phases:

1. *Accuracy* (this process), pair by pair: every candidate registers the pair; per candidate
   and pair: mean and per-label Dice, HD95, SDlogJ, % folding; against the reference: the
   displacement difference at full resolution (fixed-file voxels; ``|du(x)|`` is the Euclidean
   norm of the difference vector, max and mean over voxels; in mm through the fixed file's
   affine, p99 and max over voxels: :func:`displacement_difference`) and the Dice difference
   in points.
2. *Performance*, per candidate in a fresh child process (:func:`~pddnet.validation.machine.
   run_isolated`, unless ``isolate=False``): the pairs' inputs are pre-processed, then the
   peak-RSS counter is reset, the model loaded, run ``warmup`` times untimed and ``repeats``
   times timed (the model execution only: both feature passes and the head,
   :meth:`Registrar.run_model`). Latency is :func:`~pddnet.metrics.latency_stats`
   of the timed runs, memory :class:`~pddnet.validation.machine.PeakRss`.

Gates are evaluated per pair; a gate passes when every pair passes (the worst pair is reported).
The report's schema is documented in ``docs/validation.md``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from pddnet._files import sha256_file
from pddnet.errors import PddnetError
from pddnet.spec import contract as C
from pddnet.spec.metadata import read_metadata

if TYPE_CHECKING:
    from pddnet.runtime.session import Registrar

SCHEMA = "pddnet.validation.report/1"

#: per-pair metrics a gate can be set on: key -> (description, unit)
GATE_METRICS: dict[str, tuple[str, str]] = {
    "disp_diff_max_vox": ("max |delta disp| at full resolution vs the reference", "voxel"),
    "disp_diff_mean_vox": ("mean |delta disp| at full resolution vs the reference", "voxel"),
    "delta_dice_points": ("|delta mean Dice| vs the reference", "points"),
    "disp_diff_p99_mm": ("p99 |delta u| over the pair's voxels vs the reference", "mm"),
    "disp_diff_max_mm": ("max |delta u| vs the reference", "mm"),
}

#: short names of the gate metrics in explanations ("p99 |Δu| 2.24 mm > 1 mm gate")
GATE_LABELS: dict[str, str] = {
    "disp_diff_max_vox": "max |Δu|", "disp_diff_mean_vox": "mean |Δu|",
    "delta_dice_points": "|ΔDice|", "disp_diff_p99_mm": "p99 |Δu|",
    "disp_diff_max_mm": "max |Δu|",
}


def gate_phrase(g: dict[str, Any]) -> str:
    """One failed gate as a short phrase: ``"p99 |Δu| 2.24 mm > 1 mm gate"``."""
    label = GATE_LABELS.get(str(g.get("metric")), str(g.get("metric")))
    v, unit = g.get("measured"), g.get("unit") or ""
    shown = (f"{v:.3g} {unit}" if isinstance(v, (int, float)) and not isinstance(v, bool)
             and math.isfinite(v) else "undefined")
    thr = g.get("threshold")
    thr = f"{thr:g}" if isinstance(thr, (int, float)) else str(thr)
    return f"{label} {shown} > {thr} {unit} gate"


#: the displacement gates in mm of the FP16 / INT8 candidates (``--max-disp-p99-mm``,
#: ``--max-disp-mm``): ``|delta u|`` is clinically meaningful in mm, not in voxels
DEFAULT_DISP_GATES_MM = {"disp_diff_p99_mm": 1.0, "disp_diff_max_mm": 2.0}

PAIR_KEYS = ("dice_mean", "hd95_mean", "sdlogj", "folding_percent", "dice_mean_before",
             "delta_dice_points", "disp_diff_max_vox", "disp_diff_mean_vox",
             "disp_diff_p99_mm", "disp_diff_max_mm", "model_ms")


def displacement_difference(disp, ref, affine) -> dict[str, float]:
    """How far a field ``disp`` moves from ``ref`` (both ``(i, j, k, 3)``, voxels of the grid
    whose 4x4 ``affine`` is given, channel a along axis a).

    ``du(x) = disp(x) - ref(x)``; in mm it is ``A du(x)`` with ``A`` the affine's 3x3 part (for
    an axis-aligned or rotated grid: each component times that axis's voxel spacing), and
    ``|du|`` its Euclidean norm. Returns, over the voxels of the grid: ``disp_diff_max_vox``,
    ``disp_diff_mean_vox`` (norm in voxel units), ``disp_diff_max_abs_component_vox``,
    ``disp_diff_p99_mm`` (99th percentile, numpy's linear interpolation) and
    ``disp_diff_max_mm``. Raises :class:`PddnetError` on shapes that do not match."""
    a = np.asarray(disp, np.float64)
    b = np.asarray(ref, np.float64)
    m = np.asarray(affine, np.float64)
    if a.shape != b.shape or a.ndim != 4 or a.shape[-1] != 3:
        raise PddnetError(f"displacement_difference: fields must both be (i, j, k, 3), got "
                          f"{a.shape} and {b.shape}")
    if m.shape != (4, 4):
        raise PddnetError(f"displacement_difference: affine must be 4x4, got {m.shape}")
    diff = a - b
    vox = np.sqrt(np.einsum("...a,...a->...", diff, diff))
    mm_vec = diff @ m[:3, :3].T
    mm = np.sqrt(np.einsum("...a,...a->...", mm_vec, mm_vec))
    return {"disp_diff_max_vox": float(vox.max()), "disp_diff_mean_vox": float(vox.mean()),
            "disp_diff_max_abs_component_vox": float(np.abs(diff).max()),
            "disp_diff_p99_mm": float(np.percentile(mm, 99)),
            "disp_diff_max_mm": float(mm.max())}


@dataclass(frozen=True)
class Gate:
    """Pass when ``|pair[metric]| <= threshold`` for every pair (``metric`` in
    :data:`GATE_METRICS`). A pair where the candidate failed fails the gate; a pair where the
    value is undefined for both candidate and reference (no label shared by the fixed and the
    moving map) is skipped, and a gate with no defined pair fails."""

    metric: str
    threshold: float

    def __post_init__(self) -> None:
        if self.metric not in GATE_METRICS:
            raise PddnetError(f"unknown gate metric {self.metric!r}; choose from "
                              f"{sorted(GATE_METRICS)}")
        if not (isinstance(self.threshold, (int, float)) and self.threshold >= 0
                and math.isfinite(self.threshold)):
            raise PddnetError(f"gate {self.metric}: threshold must be a finite number >= 0, got "
                              f"{self.threshold!r}")

    @property
    def description(self) -> str:
        return GATE_METRICS[self.metric][0]

    @property
    def unit(self) -> str:
        return GATE_METRICS[self.metric][1]

    def evaluate(self, pairs: Sequence[dict[str, Any]]) -> dict[str, Any]:
        values: list[float | None] = []
        worst, worst_pair, failed_runs, defined = -1.0, None, [], 0
        for rec in pairs:
            if rec.get("error"):
                failed_runs.append(rec["pair"])
                values.append(None)
                continue
            v = rec.get(self.metric)
            if v is None or not math.isfinite(v):
                values.append(None)
                continue
            defined += 1
            values.append(float(v))
            if abs(v) > worst:
                worst, worst_pair = abs(float(v)), rec["pair"]
        passed = not failed_runs and defined > 0 and worst <= self.threshold
        if failed_runs:
            reason = f"the candidate failed on {len(failed_runs)} pair(s): {failed_runs[0]}"
        elif defined == 0:
            reason = "no pair where the metric is defined"
        elif passed:
            reason = f"{worst:.4g} <= {self.threshold:g} {self.unit} on all {defined} pair(s)"
        else:
            n_bad = sum(1 for v in values if v is not None and abs(v) > self.threshold)
            reason = (f"{worst:.4g} > {self.threshold:g} {self.unit} (worst pair {worst_pair}; "
                      f"{n_bad} of {defined} pair(s) over)")
        return {"metric": self.metric, "description": self.description, "unit": self.unit,
                "threshold": float(self.threshold), "measured": worst if defined else None,
                "worst_pair": worst_pair, "per_pair": values, "passed": passed,
                "reason": reason}


@dataclass
class Candidate:
    """One deployed form: a backend name (``pddnet.backends.BACKENDS``), the model
    file it runs (for ``torch`` the ONNX model whose interface and pre-processing contract it
    mirrors; the weights come from ``options["checkpoint"]``), a precision label, backend
    options, further :class:`~pddnet.runtime.session.Registrar` keyword arguments
    (``registrar``; e.g. a refined or two-stage mode) and gates against the reference.

    ``compare_with`` names the candidate its differences and gates are computed against
    (default: the reference); it must come earlier in the list -- e.g. ONNX Runtime with
    refinement against the PyTorch reference with refinement (:func:`mode_candidates`)."""

    name: str
    backend: str
    model: Path
    precision: str = "fp32"
    options: dict[str, Any] = field(default_factory=dict)
    gates: tuple[Gate, ...] = ()
    registrar: dict[str, Any] = field(default_factory=dict)
    compare_with: str | None = None

    @property
    def mode(self) -> str:
        """The registration mode (``pddnet.spec.refine.MODES``) its ``registrar`` selects."""
        two = int(self.registrar.get("stages", 1)) == 2
        refine = self.registrar.get("refine")
        refined = bool(refine)
        probs = isinstance(refine, dict) and refine.get("method") == "probs"
        return ("2stage" if two else "") + ("+inst" if two and refined else
                                             "inst" if refined else "") + \
            ("-probs" if probs else "") or "ff"

    def spec(self) -> dict[str, Any]:
        """Picklable description (what a child process needs to rebuild it)."""
        return {"name": self.name, "backend": self.backend, "model": str(self.model),
                "precision": self.precision, "options": dict(self.options),
                "registrar": dict(self.registrar)}

    def open(self, threads: int | None):
        """The candidate's :class:`~pddnet.runtime.session.Registrar` (loaded)."""
        from pddnet.runtime.session import Registrar

        return Registrar(self.model, backend=self.backend, threads=threads,
                         backend_options=self.options, **self.registrar)


def default_candidates(checkpoint, onnx_model, *, gate_disp: float = 0.05,
                       gate_dice: float = 0.1) -> tuple[Candidate, list[Candidate]]:
    """The reference (``pytorch``: the checkpoint on the torch backend) and ONNX Runtime FP32
    with its gates: max |delta disp| <= ``gate_disp`` voxel and |delta Dice| <= ``gate_dice``
    points on every pair. Later precisions/backends append candidates to the list."""
    ref = Candidate("pytorch", "torch", Path(onnx_model), "fp32",
                    {"checkpoint": str(checkpoint)})
    ort = Candidate("onnxruntime-fp32", "onnxruntime", Path(onnx_model), "fp32", {},
                    (Gate("disp_diff_max_vox", gate_disp), Gate("delta_dice_points", gate_dice)))
    return ref, [ort]


def mode_candidates(checkpoint, onnx_model, modes, *, refine_steps: int | None = None,
                    gate_disp: float = 0.05, gate_dice: float = 0.1,
                    gate_dice_refined: float = 0.5) -> list[Candidate]:
    """Candidates for the registration modes beyond feed-forward (``docs/refinement.md``).

    For every mode of ``modes`` other than ``ff`` (``inst``, ``2stage``, ``2stage+inst``):
    ``pytorch+MODE`` -- the reference checkpoint in that mode, compared with the feed-forward
    reference and without gates, so its Dice/SDlogJ deltas are the mode's effect -- and
    ``onnxruntime-fp32+MODE`` compared with ``pytorch+MODE``. Gates of the latter: without
    refinement, the feed-forward gates (max |delta disp| <= ``gate_disp``, |delta Dice| <=
    ``gate_dice``); with refinement only |delta Dice| <= ``gate_dice_refined``, because the
    refinement is not smooth in its inputs (a control point crossing a lattice plane one Adam
    step apart; the networks' outputs already differ by ~1e-6), so the fields of two backends
    differ by tenths of a voxel in places -- the runtime's parity with the reference on the
    same inputs is a unit test (``tests/model/test_refine.py``). ``onnx_model`` must be exported with
    ``--probs`` (refined modes) and ``--stage2`` (two-stage modes).
    """
    from pddnet.spec.refine import MODE_METHODS, MODES, RefineOptions, parse_modes

    out: list[Candidate] = []
    for mode in parse_modes(modes):
        if mode == "ff":
            continue
        stages, refined = MODES[mode]
        method = MODE_METHODS.get(mode)
        # the JSON form; steps and method left out take the method's defaults (docs/refinement.md)
        refine = RefineOptions(**({"steps": int(refine_steps)} if refine_steps else {}),
                               **({"method": method} if method else {})).as_dict()
        reg = {"stages": stages, **({"refine": refine} if refined else {})}
        gates = ((Gate("delta_dice_points", gate_dice_refined),) if refined else
                 (Gate("disp_diff_max_vox", gate_disp), Gate("delta_dice_points", gate_dice)))
        out.append(Candidate(f"pytorch+{mode}", "torch", Path(onnx_model), "fp32",
                             {"checkpoint": str(checkpoint)}, (), dict(reg)))
        out.append(Candidate(f"onnxruntime-fp32+{mode}", "onnxruntime", Path(onnx_model), "fp32",
                             {}, gates, dict(reg), compare_with=f"pytorch+{mode}"))
    return out


# --------------------------------------------------------------------------------------------
# the comparison
# --------------------------------------------------------------------------------------------
def compare(reference: Candidate, candidates: Sequence[Candidate], data_dir, *,
            split: str = "test", max_pairs: int | None = None, threads: int | None = None,
            warmup: int = 2, repeats: int = 10, isolate: bool = True,
            progress: bool = True, echo: Callable[[str], None] | None = None,
            observe: Callable[..., None] | None = None) -> dict[str, Any]:
    """Run ``reference`` and ``candidates`` on the pairs of ``split`` and build the report
    (a dict; ``docs/validation.md``). Raises :class:`PddnetError` on unusable inputs (missing
    labels, a model that does not load, a failing reference) before or while measuring; a
    candidate failing on a pair is recorded and fails its gates.

    ``observe(name, pair_index, pair, result, (fixed, moving, fixed_labels, moving_labels))``,
    if given, is called after every successful registration of the accuracy phase (the
    reference first on each pair); the report's figures are collected this way
    (:class:`pddnet.validation.render.FigureCollector`)."""
    from pddnet.validation import machine

    say = echo or (lambda s: None)
    everyone = _resolve_candidates(reference, candidates, warmup, repeats)
    dataset, pairs = _read_pairs(data_dir, split, max_pairs)

    started = datetime.now(timezone.utc)
    mach = machine.machine_info(threads)
    notes: list[str] = list(_provenance_notes(reference, candidates))

    # -- phase 1: accuracy, pair by pair ------------------------------------------------------
    say(f"accuracy: {len(pairs)} {split} pair(s) x {len(everyone)} backend(s)")
    records, describe, initial = _run_accuracy(reference, candidates, dataset, pairs,
                                               threads=threads, progress=progress,
                                               observe=observe)

    # -- phase 2: latency and memory, one process per candidate ------------------------------
    inputs = [(str(p.fixed.image), str(p.moving.image)) for p in pairs[:MAX_TIMING_INPUTS]]
    perf = _run_performance(everyone, inputs, threads=threads, warmup=warmup,
                            repeats=repeats, isolate=isolate, say=say)

    # -- the report -----------------------------------------------------------------------------
    out_candidates: dict[str, Any] = {
        c.name: _candidate_report(c, reference, records[c.name], describe, perf)
        for c in everyone}
    failed = _failed_gates(out_candidates)
    mach["load_average_end"] = machine.load_average()
    return {
        "schema": SCHEMA,
        "created": started.isoformat(timespec="seconds"),
        "duration_s": round((datetime.now(timezone.utc) - started).total_seconds(), 1),
        "status": "failed" if failed else "passed",
        "failed_gates": failed,
        "reference": reference.name,
        "settings": {"data": str(data_dir), "dataset_json": str(dataset.json_path),
                     "split": split, "pairs": len(pairs), "max_pairs": max_pairs,
                     "threads": threads, "warmup": warmup, "repeats": repeats,
                     "timing_inputs": len(inputs), "isolated": bool(isolate)},
        "machine": mach,
        "pairs": initial,
        "label_names": _label_names(dataset),
        "candidates": out_candidates,
        "notes": notes,
    }


# --------------------------------------------------------------------------------------------
# the comparison's steps
# --------------------------------------------------------------------------------------------
def _resolve_candidates(reference: Candidate, candidates: Sequence[Candidate], warmup: int,
                        repeats: int) -> list[Candidate]:
    """The reference and the candidates, in order, after checking the settings: unique names,
    existing model files, ``compare_with`` naming an earlier one."""
    names = [reference.name] + [c.name for c in candidates]
    if len(set(names)) != len(names):
        raise PddnetError(f"candidate names must be unique, got {names}")
    if warmup < 0 or repeats < 1:
        raise PddnetError(f"warmup must be >= 0 and repeats >= 1, got {warmup} and {repeats}")
    everyone = [reference, *candidates]
    for i, c in enumerate(everyone):
        if not Path(c.model).is_file():
            raise PddnetError(f"candidate {c.name}: model file {c.model} does not exist")
        if c.compare_with is not None and c.compare_with not in names[:i]:
            raise PddnetError(f"candidate {c.name}: compare_with={c.compare_with!r} must name "
                              f"the reference or an earlier candidate ({names[:i]})")
    return everyone


def _read_pairs(data_dir, split: str, max_pairs: int | None):
    """The dataset of ``data_dir`` and its (first ``max_pairs``) ``split`` pairs, each with
    label maps for both scans."""
    from pddnet.data.learn2reg import Learn2RegDataset

    dataset = Learn2RegDataset(data_dir)
    pairs = dataset.pairs(split)
    if max_pairs:
        pairs = pairs[:max_pairs]
    if not pairs:
        raise PddnetError(f"{data_dir} has no {split} pairs to validate on")
    for p in pairs:
        if p.fixed.label is None or p.moving.label is None:
            raise PddnetError(f"pair {p} has no label maps; validation compares Dice and needs "
                              "labels for both scans (labelsTr/)")
    return dataset, pairs


def _run_accuracy(reference: Candidate, candidates: Sequence[Candidate], dataset, pairs, *,
                  threads: int | None, progress: bool,
                  observe: Callable[..., None] | None):
    """Phase 1: open every candidate, register every pair with each (the reference first).
    Returns the per-candidate pair records, the backend descriptions and the report's pair
    list."""
    from tqdm import tqdm

    everyone = [reference, *candidates]
    regs: dict[str, Registrar] = {}
    records: dict[str, list[dict[str, Any]]] = {c.name: [] for c in everyone}
    describe: dict[str, dict[str, Any]] = {}
    initial: list[dict[str, Any]] = []
    try:
        for c in everyone:
            regs[c.name] = c.open(threads)
            describe[c.name] = regs[c.name].describe_backend()
        for pair in tqdm(pairs, desc="validate", unit="pair", disable=not progress):
            fixed, moving, fl, ml = dataset.load_pair(pair)
            images = (fixed, moving, fl, ml)
            label = str(pair)
            index = len(initial)
            ref = _run_reference(regs[reference.name], reference, label, pair, images, index,
                                 records, observe)
            initial.append({"pair": label, "fixed": pair.fixed.name, "moving": pair.moving.name,
                            "dice_mean_before": ref.metrics.get("dice_mean_before")})
            _run_candidates(regs, reference, candidates, label, pair, images, index, ref,
                            records, observe)
            del ref
    finally:
        for r in regs.values():
            r.close()
        regs.clear()
    return records, describe, initial


def _run_reference(reg: Registrar, reference: Candidate, label: str, pair, images, index: int,
                   records: dict[str, list[dict[str, Any]]],
                   observe: Callable[..., None] | None):
    """Register one pair with the reference and record it; a failure ends the validation."""
    fixed, moving, fl, ml = images
    try:
        ref = reg.register(fixed, moving, ml, fl)
    except PddnetError as exc:
        raise PddnetError(f"the reference ({reference.name}) failed on pair {label}: "
                          f"{exc}") from exc
    records[reference.name].append(_pair_record(label, pair, ref, None))
    if observe is not None:
        observe(reference.name, index, pair, ref, (fixed, moving, fl, ml))
    return ref


def _run_candidates(regs: dict[str, Registrar], reference: Candidate,
                    candidates: Sequence[Candidate], label: str, pair, images, index: int, ref,
                    records: dict[str, list[dict[str, Any]]],
                    observe: Callable[..., None] | None) -> None:
    """Register one pair with every candidate and record each against the candidate it is
    compared with; a failure is recorded (and fails the candidate's gates)."""
    fixed, moving, fl, ml = images
    results = {reference.name: ref}
    for c in candidates:
        try:
            res = regs[c.name].register(fixed, moving, ml, fl)
        except PddnetError as exc:
            records[c.name].append(_error_record(label, pair, str(exc)))
            continue
        results[c.name] = res
        if observe is not None:
            observe(c.name, index, pair, res, (fixed, moving, fl, ml))
        base = results.get(c.compare_with or reference.name)
        if base is None:  # what it is compared with failed on this pair
            records[c.name].append(_error_record(label, pair,
                                                 f"{c.compare_with} failed on this pair"))
            continue
        records[c.name].append(_pair_record(label, pair, res, base))


def _error_record(label: str, pair, error: str) -> dict[str, Any]:
    """The record of a pair a candidate has no result for."""
    return {"pair": label, "fixed": pair.fixed.name, "moving": pair.moving.name, "error": error}


def _run_performance(everyone: Sequence[Candidate], inputs: Sequence[tuple[str, str]], *,
                     threads: int | None, warmup: int, repeats: int, isolate: bool,
                     say: Callable[[str], None]) -> dict[str, dict[str, Any]]:
    """Phase 2: :func:`measure_candidate` for every candidate (in its own process when
    ``isolate``)."""
    from pddnet.validation import machine

    perf: dict[str, dict[str, Any]] = {}
    for c in everyone:
        say(f"latency: {c.name} ({warmup} warm-up + {repeats} timed runs"
            f"{', own process' if isolate else ''})")
        args = (c.spec(), inputs, threads, warmup, repeats, isolate)
        try:
            perf[c.name] = (machine.run_isolated(measure_candidate, *args) if isolate
                            else measure_candidate(*args))
        except PddnetError:
            raise
        except Exception as exc:  # a crashed child (e.g. killed for memory)
            raise PddnetError(f"measuring {c.name} failed: {type(exc).__name__}: {exc}") from exc
    return perf


def _candidate_report(c: Candidate, reference: Candidate, recs: list[dict[str, Any]],
                      describe: dict[str, dict[str, Any]],
                      perf: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """A candidate's entry of the report: provenance, summary, performance and gates."""
    is_ref = c is reference
    gates = [g.evaluate(recs) for g in c.gates]
    ref_p50 = perf[reference.name]["latency"]["p50_ms"]
    lat = perf[c.name]["latency"]
    return {
        "name": c.name, "backend": c.backend, "model": str(c.model),
        "model_sha256": _sha256(c.model), "precision": c.precision,
        "options": {k: str(v) if isinstance(v, Path) else v for k, v in c.options.items()},
        "registrar": dict(c.registrar),
        "mode": c.mode,
        "compared_with": None if is_ref else (c.compare_with or reference.name),
        "reference": is_ref,
        "describe": describe.get(c.name, {}),
        "summary": _summarise(recs),
        "latency": lat,
        "speedup_vs_reference": (ref_p50 / lat["p50_ms"]) if lat["p50_ms"] > 0 else None,
        "memory": perf[c.name]["memory"],
        "load_ms": perf[c.name]["load_ms"],
        "gates": gates,
        "passed": all(g["passed"] for g in gates),
        "pairs": recs,
    }


def _failed_gates(out_candidates: dict[str, Any]) -> list[dict[str, Any]]:
    """Every failed gate of every candidate, for the report's ``failed_gates``."""
    return [{"candidate": n, **{k: g[k] for k in ("metric", "description", "threshold",
                                                  "measured", "unit", "worst_pair", "reason")}}
            for n, cand in out_candidates.items() for g in cand["gates"] if not g["passed"]]


#: per-registration stage timings recorded per pair (``Registrar`` timings; ``refine`` and
#: ``stage2`` only in the refined / two-stage modes); ``model_ms`` is their sum
STAGE_KEYS = ("features", "head", "refine", "stage2")

#: the timing phase pre-processes at most this many pairs and cycles through them
MAX_TIMING_INPUTS = 4


def measure_candidate(spec: dict[str, Any], inputs: Sequence[tuple[str, str]],
                      threads: int | None, warmup: int, repeats: int,
                      isolated: bool) -> dict[str, Any]:
    """Latency and peak memory of one candidate (runs in a child process by default).

    Pre-processes ``inputs`` (fixed, moving NIfTI paths) as the Registrar does, resets the
    peak-RSS counter, loads the candidate, runs the model ``warmup`` times untimed and
    ``repeats`` times timed, cycling through the inputs."""
    import sys

    from pddnet.graph.model import load_model
    from pddnet.metrics import latency_stats
    from pddnet.runtime.preprocess import prepare_fixed, prepare_moving
    from pddnet.runtime.session import Registrar
    from pddnet.validation import machine

    info = load_model(spec["model"]).info
    feeds = []
    for f, m in inputs:
        pf = prepare_fixed(f, info)
        feeds.append((pf.array, prepare_moving(m, pf, info).array))
    with machine.PeakRss() as mem:
        reg = Registrar(spec["model"], backend=spec["backend"], threads=threads,
                        backend_options=spec["options"], **spec.get("registrar", {}))
        try:
            samples = []
            for i in range(warmup + repeats):
                f, m = feeds[i % len(feeds)]
                _, ms = reg.run_model(f, m)
                samples.append(ms / 1e3)
        finally:
            reg.close()
    lat = latency_stats(samples, warmup=warmup)
    lat["samples_ms"] = [round(s * 1e3, 3) for s in samples[warmup:]]
    lat["warmup_ms"] = [round(s * 1e3, 3) for s in samples[:warmup]]
    memory = mem.as_dict(isolated=isolated)
    memory["torch_loaded"] = "torch" in sys.modules  # False for an isolated ONNX Runtime run
    return {"latency": lat, "memory": memory, "load_ms": reg.load_ms}


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def _pair_record(label: str, pair, res, ref) -> dict[str, Any]:
    m = res.metrics
    t = res.timings_ms
    rec: dict[str, Any] = {
        "pair": label, "fixed": pair.fixed.name, "moving": pair.moving.name,
        "dice_mean": m.get("dice_mean"), "dice_per_label": m.get("dice_per_label", {}),
        "hd95_mean": m.get("hd95_mean"), "hd95_per_label": m.get("hd95_per_label", {}),
        "sdlogj": m.get("sdlogj"), "folding_percent": m.get("folding_percent"),
        "dice_mean_before": m.get("dice_mean_before"),
        "stage_ms": {k: t.get(k) for k in STAGE_KEYS},
        "model_ms": sum(t.get(k) or 0.0 for k in STAGE_KEYS),
        "delta_dice_points": None, "delta_dice_per_label_points": None,
        "disp_diff_max_vox": None, "disp_diff_mean_vox": None,
        "disp_diff_max_abs_component_vox": None, "disp_diff_p99_mm": None,
        "disp_diff_max_mm": None,
        "spacing_mm": [float(v) for v in np.sqrt((np.asarray(res.affine, np.float64)[:3, :3]
                                                  ** 2).sum(axis=0))],
    }
    if ref is not None:
        rec.update(displacement_difference(res.disp, ref.disp, res.affine))
        rec["delta_dice_points"] = _points(m.get("dice_mean"), ref.metrics.get("dice_mean"))
        ref_pl = ref.metrics.get("dice_per_label", {})
        rec["delta_dice_per_label_points"] = {
            k: _points(v, ref_pl.get(k)) for k, v in m.get("dice_per_label", {}).items()}
    return rec


def _points(a: float | None, b: float | None) -> float:
    if a is None or b is None:
        return math.nan
    return 100.0 * (float(a) - float(b))  # NaN propagates (label absent in both)


def _nanmean(vals) -> float | None:
    arr = np.array([v for v in vals if v is not None], np.float64)
    arr = arr[np.isfinite(arr)] if arr.size else arr
    return float(arr.mean()) if arr.size else None


def _nanmax_abs(vals) -> float | None:
    arr = np.array([abs(v) for v in vals if v is not None], np.float64)
    arr = arr[np.isfinite(arr)] if arr.size else arr
    return float(arr.max()) if arr.size else None


def _summarise(recs: list[dict[str, Any]]) -> dict[str, Any]:
    """Means over pairs (undefined values skipped); worst values for the differences."""
    from pddnet.metrics import dsc30

    ok = [r for r in recs if not r.get("error")]
    out: dict[str, Any] = {"pairs": len(recs), "failed_pairs": len(recs) - len(ok)}
    for k in ("dice_mean", "hd95_mean", "sdlogj", "folding_percent", "dice_mean_before",
              "model_ms"):
        out[k] = _nanmean(r.get(k) for r in ok)
    dice = [r["dice_mean"] for r in ok if r.get("dice_mean") is not None]
    out["dsc30"] = dsc30(dice) if dice else None
    labels = sorted({int(k) for r in ok for k in (r.get("dice_per_label") or {})})
    out["dice_per_label"] = {lab: _nanmean((r.get("dice_per_label") or {}).get(lab) for r in ok)
                             for lab in labels}
    out["stage_ms"] = {k: _nanmean((r.get("stage_ms") or {}).get(k) for r in ok)
                       for k in STAGE_KEYS}
    out["delta_dice_points_mean"] = _nanmean(r.get("delta_dice_points") for r in ok)
    out["delta_dice_points_max_abs"] = _nanmax_abs(r.get("delta_dice_points") for r in ok)
    out["disp_diff_max_vox"] = _nanmax_abs(r.get("disp_diff_max_vox") for r in ok)
    out["disp_diff_mean_vox"] = _nanmean(r.get("disp_diff_mean_vox") for r in ok)
    # per pair: p99 / max over its voxels; over pairs: the worst pair (what the gates check)
    out["disp_diff_p99_mm"] = _nanmax_abs(r.get("disp_diff_p99_mm") for r in ok)
    out["disp_diff_max_mm"] = _nanmax_abs(r.get("disp_diff_max_mm") for r in ok)
    return out


def _label_names(dataset) -> dict[str, str]:
    names = dataset.label_names
    names = names() if callable(names) else names  # a property today; tolerate a method
    return {str(k): str(v) for k, v in (names or {}).items()}


def _sha256(path) -> str | None:
    """The file's SHA-256, or ``None`` where it cannot be read (provenance is best-effort)."""
    try:
        return sha256_file(path)
    except OSError:
        return None


def _provenance_notes(reference: Candidate, candidates: Sequence[Candidate]) -> list[str]:
    """Say when an ONNX model was not exported from the reference checkpoint (by its
    ``pddnet.source.checkpoint_sha256``); the comparison still runs (its gates decide)."""

    from pddnet.graph.model import parse_model_bytes

    ckpt = reference.options.get("checkpoint")
    if not ckpt:
        return []
    want = _sha256(ckpt)
    notes = []
    for c in candidates:
        try:
            proto = parse_model_bytes(Path(c.model).read_bytes(), where=str(c.model))
        except (PddnetError, OSError):
            continue  # the Registrar reports it properly
        src = read_metadata(proto).get(C.META_SOURCE) or {}
        got = src.get("checkpoint_sha256")
        if got is None:
            notes.append(f"{c.name}: {c.model} does not record the checkpoint it was exported "
                         "from")
        elif got != want:
            notes.append(f"{c.name}: {c.model} was exported from another checkpoint file "
                         f"(sha256 {got[:12]}..., the reference is {want[:12]}...)")
    return notes
