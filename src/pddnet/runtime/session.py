"""The session API: load a model once, register pairs, reuse a fixed scan's features.

>>> reg = Registrar("model.onnx", threads=4)                     # doctest: +SKIP
>>> res = reg.register("fixed.nii.gz", "moving.nii.gz")          # doctest: +SKIP
>>> res.save("out/")                                             # doctest: +SKIP

Image-guided intervention (one pre-operative fixed scan, many intra-operative moving scans):

>>> reg.set_fixed("preop.nii.gz")                                # doctest: +SKIP
>>> for m in scans: reg.register_moving(m).save(...)             # doctest: +SKIP

``set_fixed`` pre-processes the fixed scan and runs the feature network on it once; every
``register_moving`` then runs only the moving scan's pre-processing and features, the head and
post-processing. The first result after ``set_fixed`` carries the fixed scan's cost in its
timings; later ones record it as saved (``result.reuse``). Results equal those of independent
:meth:`Registrar.register` calls exactly (same arrays, same backend).

Fields follow ``docs/conventions.md``: ``(i, j, k, 3)`` float32 in voxels of the fixed file,
``warped(x) = moving(x + u(x))``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from pddnet.data.io import DEFAULT_MAX_VOXELS, Volume
from pddnet.errors import PddnetError
from pddnet.graph.model import load_model
from pddnet.runtime.bundle import is_bundle, open_bundle
from pddnet.runtime.postprocess import (
    field_to_fixed_grid,
    labels_on_fixed_grid,
    warp_labels_to_fixed,
    warp_to_fixed,
)
from pddnet.runtime.preprocess import (
    DEFAULT_SPACING_TOLERANCE,
    PreparedFixed,
    VolumeLike,
    _codes,
    prepare_fixed,
    prepare_moving,
)
from pddnet.runtime.runner import PairRunner
from pddnet.spec import contract as C

STAGES = ("load", "preprocess", "features", "head", "refine", "stage2", "postprocess", "metrics",
          "write")


@dataclass
class RegistrationResult:
    """One registered pair.

    Attributes:
        disp: ``(i, j, k, 3)`` float32 displacement in voxels of the fixed file's grid.
        affine: the fixed file's 4x4 affine (the grid of ``disp``, ``warped``...).
        warped: the moving image warped onto the fixed grid, float32 HU (trilinear, border).
        warped_labels: the moving labels warped as the Learn2Reg evaluation warps them
            (nearest, 0 outside the moving grid: :func:`pddnet.metrics.warp_labels`), the map
            Dice and HD95 are computed on, or ``None``.
        disp_model: ``(I, J, K, 3)`` the model's own output on the model grid (RAS+ voxels);
            with refinement or two stages the final (refined, composed) model-grid field.
        model_outputs: the other outputs (``grid_disp``, optionally ``probs``, ``entropy``;
            with refinement/two stages also ``disp_network``, ``grid_disp_refined``, ...).
        notes: what pre- and post-processing did, in order.
        timings_ms: per stage (``load``, ``preprocess``, ``features``, ``head``, ``refine``,
            ``stage2``, ``postprocess``, ``metrics``, ``write``; ``None`` where not run).
        stages: with ``refine``/``stages=2``: the refinement and stage-two details
            (:meth:`pddnet.runtime.stages.StagePipeline.run`), else ``None``.
        metrics: field statistics always (SDlogJ, ``num_foldings``, ``folding_voxels``,
            ``folding_percent``: :func:`pddnet.metrics.folding_counts`); Dice/HD95 with fixed
            and moving labels; all as the official Learn2Reg evaluation computes them.
        reuse: whether the fixed features were reused and the time that saved.
    """

    disp: np.ndarray
    affine: np.ndarray
    warped: np.ndarray
    warped_labels: np.ndarray | None
    disp_model: np.ndarray
    model_outputs: dict[str, np.ndarray]
    notes: list[str]
    timings_ms: dict[str, float | None]
    metrics: dict[str, Any]
    inputs: dict[str, Any]
    model: dict[str, Any]
    backend: dict[str, Any]
    reuse: dict[str, Any]
    saved_to: Path | None = field(default=None, repr=False)
    stages: dict[str, Any] | None = None

    @property
    def dice(self) -> float | None:
        """Mean Dice after registration (``None`` without labels)."""
        return self.metrics.get("dice_mean")

    def save(self, out_dir: str | os.PathLike, *, overwrite: bool = False,
             l2r_half: bool = False) -> dict[str, Path]:
        """Write the outputs (:mod:`pddnet.runtime.outputs`) as one transaction
        (:func:`pddnet._files.atomic_directory`); an existing result is refused unless
        ``overwrite``, and replaced only once the new one is complete. Returns
        ``{file name: path}``."""
        from pddnet._files import atomic_directory
        from pddnet.runtime.outputs import OUTPUT_NAMES, write_outputs

        out = Path(out_dir)  # other files in the folder are kept
        with atomic_directory(out, overwrite=overwrite,
                              keep=lambda name: name not in OUTPUT_NAMES) as stage:
            names = write_outputs(self, stage, l2r_half=l2r_half)
        self.saved_to = out
        return {n: out / n for n in names}

    def summary(self, outputs: list[str] | None = None) -> dict[str, Any]:
        """The ``summary.json`` content (strict JSON types)."""
        from pddnet import __version__
        from pddnet._files import jsonable

        norm = np.sqrt(np.einsum("...a,...a->...", self.disp, self.disp))
        return jsonable({
            "pddnet_version": __version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "inputs": self.inputs,
            "model": self.model,
            "backend": self.backend,
            "notes": self.notes,
            "timings_ms": {k: (None if v is None else round(v, 3))
                           for k, v in self.timings_ms.items()},
            "reuse": self.reuse,
            "field": {
                "file": "disp.nii.gz", "shape": list(self.disp.shape), "dtype": "float32",
                "units": "voxels of the fixed image grid",
                "convention": "warped(x) = moving(x + u(x)); channel a along array axis a",
                "max_norm_voxels": float(norm.max()), "mean_norm_voxels": float(norm.mean()),
            },
            "metrics": self.metrics,
            "stages": self.stages,
            "outputs": outputs or [],
        })


@dataclass
class _FixedState:
    prepared: PreparedFixed
    features: np.ndarray | None
    preprocess_ms: float
    features_ms: float
    uses: int = 0
    inputs: dict[str, Any] = field(default_factory=dict)


class Registrar:
    """Register CT pairs with an exported model; torch-free.

    Args:
        model_path: the ``.onnx`` written by ``pddnet export``, or a deployment bundle (folder
            or ``.tar.gz`` from ``pddnet package``): every checksum in it is verified before
            anything is loaded, and :meth:`pddnet.runtime.bundle.Bundle.select` picks the
            backend and precision (``selection`` says which and why; ``docs/bundle.md``).
        backend: a name from :data:`pddnet.backends.BACKENDS`; ``"auto"`` (default) is
            ``"onnxruntime"`` for a model file and the bundle's choice for a bundle.
        threads: intra-op threads of the backend (``None``: its default).
        providers: ONNX Runtime execution providers (``["cpu"]``, ``["cuda"]``, ...).
        spacing_tolerance: relative per-axis difference allowed between the fixed scan's
            spacing on the model grid and the training spacing (default 0.30).
        backend_options: further keyword options for the backend class.
        refine: instance optimisation after the network (``pdd+inst``): a number of Adam steps
            or :class:`~pddnet.spec.refine.RefineOptions` (default method ``features``: on the
            two scans' features; ``probs``, the paper's fit, needs the ``probs`` output).
        stages: 2 runs the stage-two model on the moving scan warped by stage one and
            composes the fields (``docs/refinement.md``).
        stage2_model: the stage-two ``.onnx`` (default: the file the model's ``pddnet.stage2``
            metadata names, written by ``pddnet export --stage2``).
        max_voxels: the voxel budget for reading scans (``pddnet.data.io.DEFAULT_MAX_VOXELS``;
            ``None``: no limit), checked from each file's header before any allocation.
        precision: for a bundle, run its model of this precision (``fp32``/``fp16``/``int8``)
            instead of the automatic choice; refused for a single model file.

    The model is split into ``features`` and ``head`` (:mod:`pddnet.graph.split`); if it cannot
    be split, the whole model runs per pair and a note says that nothing is reused.
    """

    def __init__(self, model_path: str | os.PathLike, backend: str = "auto",
                 threads: int | None = None, *, providers: list[str] | str | None = None,
                 spacing_tolerance: float = DEFAULT_SPACING_TOLERANCE,
                 backend_options: dict[str, Any] | None = None, refine: Any = None,
                 stages: int = 1, stage2_model: str | os.PathLike | None = None,
                 precision: str | None = None, max_voxels: int | None = DEFAULT_MAX_VOXELS):
        t0 = time.perf_counter()
        self.bundle = self.selection = None
        if is_bundle(model_path):
            # verify every checksum before anything is loaded, then pick what runs here
            self.bundle = open_bundle(model_path)
            try:
                self.selection = self.bundle.select(backend, precision, providers=providers)
            except BaseException:
                self.bundle.close()
                raise
            model_path, backend = self.selection.model, self.selection.backend
            backend_options = {**self.selection.backend_options, **(backend_options or {})}
            if "providers" in self.selection.backend_options:
                providers = None
        elif precision is not None:
            raise PddnetError(f"precision={precision!r} chooses a model inside a bundle; "
                              f"{model_path} is a single model (its precision is its own)")
        if backend == "auto":
            backend = "onnxruntime"
        try:
            self.loaded = load_model(model_path)
        except BaseException:
            if self.bundle is not None:
                self.bundle.close()
            raise
        if self.selection is not None and self.loaded.info.sha256 != self.selection.sha256:
            self.bundle.close()
            raise PddnetError(f"{model_path} changed after the bundle was verified (SHA-256 "
                              f"{self.loaded.info.sha256[:12]}..., manifest "
                              f"{self.selection.sha256[:12]}...); refusing to run it")
        self.info = self.loaded.info
        self.spacing_tolerance = float(spacing_tolerance)
        self.max_voxels = max_voxels
        #: the labels Dice and HD95 are averaged over (``None``: every non-zero label of the
        #: fixed or moving map); set it to a task's label list (the official evaluation
        #: takes it from the task's config) to average over exactly those
        self.metric_labels: list[int] | None = None
        opts = dict(backend_options or {})
        if threads is not None:
            opts["threads"] = threads
        if providers is not None:
            opts["providers"] = providers
        self.split_note: str | None = None
        try:
            self._runner = PairRunner(self.loaded.proto, backend, opts)
        except BaseException:
            if self.bundle is not None:
                self.bundle.close()
            raise
        if self._runner.split_error is not None:
            self.split_note = (f"model: {self._runner.split_error}; running the whole model per "
                               "pair (fixed features are not reused; 'head' timings cover the "
                               "whole network)")
        self._pipeline = None
        if refine or stages != 1:
            from pddnet.runtime.stages import StagePipeline

            try:
                self._pipeline = StagePipeline(self.loaded, refine=refine, stages=stages,
                                               stage2_model=stage2_model, backend=backend,
                                               backend_options=opts, stage1=self._runner)
            except BaseException:
                self.close()
                raise
        self.load_ms = (time.perf_counter() - t0) * 1e3
        self._fixed: _FixedState | None = None

    # -- lifecycle ------------------------------------------------------------------------
    def close(self) -> None:
        if getattr(self, "_runner", None) is not None:
            self._runner.close()
        if getattr(self, "_pipeline", None) is not None:
            self._pipeline.close()
        if getattr(self, "bundle", None) is not None:
            self.bundle.close()

    def __enter__(self) -> "Registrar":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def reuses_features(self) -> bool:
        return self._runner.is_split

    def describe_backend(self) -> dict[str, Any]:
        d = self._runner.describe()
        d.pop("label", None)
        d["mode"] = "split (features + head)" if self._runner.is_split else "full model"
        if self.selection is not None:
            d["bundle"] = {"source": str(self.bundle.source), **self.selection.as_dict()}
        return d

    # -- public API -----------------------------------------------------------------------
    def set_fixed(self, fixed: VolumeLike, fixed_labels: VolumeLike | None = None) -> None:
        """Pre-process ``fixed`` and compute its features once for :meth:`register_moving`."""
        self._fixed = self._prepare_fixed(fixed, fixed_labels)

    def register_moving(self, moving: VolumeLike,
                        moving_labels: VolumeLike | None = None) -> RegistrationResult:
        """Register ``moving`` to the fixed scan of :meth:`set_fixed`, reusing its features."""
        if self._fixed is None:
            raise PddnetError("register_moving needs a fixed scan: call set_fixed(fixed) first "
                              "(or register(fixed, moving) for a single pair)")
        return self._register(self._fixed, moving, moving_labels)

    def register(self, fixed: VolumeLike, moving: VolumeLike,
                 moving_labels: VolumeLike | None = None,
                 fixed_labels: VolumeLike | None = None) -> RegistrationResult:
        """Register one pair (independent of any :meth:`set_fixed` state)."""
        return self._register(self._prepare_fixed(fixed, fixed_labels), moving, moving_labels)

    def run_model(self, fixed: np.ndarray, moving: np.ndarray) -> tuple[dict[str, np.ndarray],
                                                                        float]:
        """The model execution alone, on pre-processed ``(1, 1, I, J, K)`` float32 arrays.

        Runs what :meth:`register` runs between pre- and post-processing: the feature network
        on both scans and the head (or the whole model when it could not be split), with no
        reuse, then the refinement and second stage when the Registrar has them. Returns the
        model's outputs (``disp`` the final model-grid field) and the summed wall time of the
        backend runs and those stages in milliseconds (the latency that ``pddnet validate``
        reports).
        """
        ff, ms = self._runner.features(fixed)
        run = self._runner.run_pair(fixed, moving, ff)
        outs = run.outputs
        ms += (run.features_ms or 0.0) + run.head_ms
        if self._pipeline is not None:
            outs, staged = self._pipeline.run(outs, fixed=fixed, moving=moving, fixed_features=ff,
                                              moving_features=run.moving_features)
            ms += sum(v for v in staged["timings_ms"].values() if v is not None)
        return outs, ms

    # -- internals ------------------------------------------------------------------------
    def _prepare_fixed(self, fixed: VolumeLike, fixed_labels: VolumeLike | None) -> _FixedState:
        t0 = time.perf_counter()
        prep = prepare_fixed(fixed, self.info, labels=fixed_labels, max_voxels=self.max_voxels,
                             spacing_tolerance=self.spacing_tolerance)
        pre_ms = (time.perf_counter() - t0) * 1e3
        feats, feat_ms = self._runner.features(prep.array)
        inputs = {"fixed": _describe_volume(prep.volume, fixed),
                  "fixed_labels": _source(fixed_labels)}
        return _FixedState(prep, feats, pre_ms, feat_ms, inputs=inputs)

    def _register(self, state: _FixedState, moving: VolumeLike,
                  moving_labels: VolumeLike | None) -> RegistrationResult:
        fixed = state.prepared
        t0 = time.perf_counter()
        mov = prepare_moving(moving, fixed, self.info, labels=moving_labels,
                             max_voxels=self.max_voxels)
        pre_ms = (time.perf_counter() - t0) * 1e3
        run = self._runner.run_pair(fixed.array, mov.array, state.features)
        outs, feat_ms, head_ms = run.outputs, run.features_ms, run.head_ms
        staged = None
        if self._pipeline is not None:
            outs, staged = self._pipeline.run(outs, fixed=fixed.array, moving=mov.array,
                                              fixed_features=state.features,
                                              moving_features=run.moving_features)

        t0 = time.perf_counter()
        disp = field_to_fixed_grid(outs[C.OUTPUT_DISP], fixed)
        warped = warp_to_fixed(mov.volume, disp, fixed.volume, order=1)
        warped_labels = (warp_labels_to_fixed(mov.labels, disp, fixed.volume)
                         if mov.labels is not None else None)
        post_ms = (time.perf_counter() - t0) * 1e3

        t0 = time.perf_counter()
        metrics = _metrics(disp, fixed, mov.labels, warped_labels, self.metric_labels)
        metrics_ms = (time.perf_counter() - t0) * 1e3

        first = state.uses == 0
        state.uses += 1
        fixed_cost = state.preprocess_ms + state.features_ms
        if first:  # this result pays for the fixed scan
            pre_ms += state.preprocess_ms
            if feat_ms is not None:
                feat_ms += state.features_ms
        notes = list(fixed.notes) + list(mov.notes)
        if self.split_note:
            notes.insert(0, self.split_note)
        if self._pipeline is not None and self._pipeline.note:
            notes.append(self._pipeline.note)
        if self.selection is not None:
            notes[:0] = [f"bundle {self.bundle.source}: {self.selection.backend} "
                         f"{self.selection.precision} ({self.selection.model_id}): "
                         f"{self.selection.reason}"] + \
                        [f"bundle: {n}" for n in self.selection.notes]
        if fixed.labels is not None and mov.labels is None:
            notes.append("metrics: fixed labels given without moving labels; no Dice")
        return RegistrationResult(
            disp=disp, affine=fixed.volume.affine, warped=warped, warped_labels=warped_labels,
            disp_model=outs[C.OUTPUT_DISP],
            model_outputs={k: v for k, v in outs.items() if k != C.OUTPUT_DISP},
            notes=notes,
            timings_ms={"load": self.load_ms, "preprocess": pre_ms, "features": feat_ms,
                        "head": head_ms,
                        "refine": staged["timings_ms"]["refine"] if staged else None,
                        "stage2": staged["timings_ms"]["stage2"] if staged else None,
                        "postprocess": post_ms, "metrics": metrics_ms, "write": None},
            metrics=metrics,
            inputs={**state.inputs, "moving": _describe_volume(mov.volume, moving),
                    "moving_labels": _source(moving_labels)},
            model=self.info.as_dict(), backend=self.describe_backend(),
            reuse={
                "fixed_features": "computed" if first else "reused",
                "fixed_preprocess_ms": state.preprocess_ms,
                "fixed_branch_ms": state.features_ms if self._runner.is_split else None,
                "saved_ms": 0.0 if first or not self._runner.is_split else fixed_cost,
            },
            stages=staged)


def _source(x: Any) -> str | None:
    if x is None:
        return None
    if isinstance(x, Volume):
        return str(x.path) if x.path else "<in-memory volume>"
    return str(Path(x))


def _describe_volume(vol: Volume, given: Any) -> dict[str, Any]:
    return {"path": _source(given), "shape": list(vol.shape),
            "spacing_mm": [round(s, 6) for s in vol.spacing], "orientation": _codes(vol.affine)}


def _metrics(disp: np.ndarray, fixed: PreparedFixed, moving_labels: Volume | None,
             warped_labels: np.ndarray | None, labels: list[int] | None = None
             ) -> dict[str, Any]:
    """Field statistics (SDlogJ, % folding) always; Learn2Reg label metrics with both labels."""
    from pddnet import metrics as M

    if fixed.labels is None or moving_labels is None or warped_labels is None:
        return {"sdlogj": M.sdlogj(disp), **M.folding_counts(disp)}
    before = labels_on_fixed_grid(moving_labels, fixed.volume)
    out = M.pair_metrics(fixed.labels.array, before, warped_labels, disp, labels=labels)
    out["dice_mean_before"] = M.mean_dice(fixed.labels.array, before, before, labels=labels)
    return out
