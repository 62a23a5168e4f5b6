"""Refinement and the second stage around the runtime's backends (torch-free).

:class:`StagePipeline` is what :class:`pddnet.runtime.session.Registrar` runs after the model
when it was created with ``refine=`` or ``stages=2`` (``pddnet register --refine N --stages 2``).
It works on model-grid arrays only (``(1, 1, I, J, K)`` normalised scans, ``(I, J, K, 3)``
fields in model-grid voxels), so the pre- and post-processing of the session are unchanged:
the composed field simply replaces the model's ``disp``.

The stage-two model is a second export of the same checkpoint with a finer control grid and a
smaller capture range (``pddnet export CKPT --out m.onnx --stage2`` writes ``m.stage2.onnx`` and
records its file name and SHA-256 in ``m.onnx``'s ``pddnet.stage2`` metadata). Its feature
network is the same graph as stage one's (checked), so the fixed scan's features are reused
and only the warped moving scan's features are computed again.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from pddnet.errors import PddnetError
from pddnet.graph.model import LoadedModel, load_model
from pddnet.runtime import refine as R
from pddnet.runtime.resample import warp
from pddnet.runtime.runner import PairRunner
from pddnet.spec import contract as C
from pddnet.spec import refine as S
from pddnet.spec.metadata import metadata_value


def _meta(loaded: LoadedModel, key: str) -> Any:
    return metadata_value(loaded.proto, key, where=str(loaded.info.path), default=None)


def resolve_stage2(loaded: LoadedModel, stage2_model: str | os.PathLike | None) -> Path:
    """The stage-two model of ``loaded``: ``stage2_model`` if given, else the file its
    ``pddnet.stage2`` metadata names (next to it), else a :class:`PddnetError` saying how to
    make one."""
    if stage2_model is not None:
        return Path(stage2_model)
    link = _meta(loaded, C.META_STAGE2)
    where = loaded.info.path
    if not link:
        raise PddnetError(f"{where}: two stages need a stage-two model, and this model names "
                          "none; export both with `pddnet export CKPT --out model.onnx --probs "
                          "--stage2` or pass --stage2-model / stage2_model=")
    base = Path(where).parent if where else Path(".")
    path = base / link["file"]
    if not path.exists():
        raise PddnetError(f"{where} names the stage-two model {link['file']!r}, which is not "
                          f"in {base}; copy it next to the model or pass --stage2-model")
    return path


def check_stage2(first: LoadedModel, second: LoadedModel) -> None:
    """Refuse a stage-two model that does not fit stage one (geometry, weights, link hash)."""
    a, b = first.info, second.info
    where = f"stage-two model {b.path}"
    if a.image_shape != b.image_shape or a.intensity != b.intensity or \
            a.spacing_mm != b.spacing_mm:
        raise PddnetError(f"{where}: image grid/intensity {b.image_shape}/{b.intensity} differ "
                          f"from stage one's {a.image_shape}/{a.intensity}; export both from "
                          "one checkpoint with `pddnet export --stage2`")
    for key in ("channels", "minconv"):
        if a.config.get(key) != b.config.get(key):
            raise PddnetError(f"{where}: config {key}={b.config.get(key)!r} differs from stage "
                              f"one's {a.config.get(key)!r}; the stages must share weights")
    sa, sb = a.source.get("checkpoint_sha256"), b.source.get("checkpoint_sha256")
    if sa and sb and sa != sb:
        raise PddnetError(f"{where} was exported from another checkpoint ({sb[:12]}...) than "
                          f"stage one ({sa[:12]}...); export both with `pddnet export --stage2`")
    link = _meta(first, C.META_STAGE2)
    if link and link.get("sha256") and b.sha256 and \
            Path(str(b.path)).name == link.get("file") and link["sha256"] != b.sha256:
        raise PddnetError(f"{where}: its SHA-256 differs from the one stage one recorded at "
                          "export; the file was changed or replaced -- re-export both")


class StagePipeline:
    """Instance optimisation and/or a second stage after a model's outputs.

    Args:
        loaded: the stage-one model (for the ``probs`` method it must output ``probs``).
        refine: :class:`~pddnet.spec.refine.RefineOptions`, a number of Adam steps, or
            ``None`` (no refinement). Applied to the stages ``refine.stages_refined`` names
            (``"last"``: stage two only in two stages, stage one's network field feeding it;
            ``"all"``: every stage; :attr:`refine_stages`). The ``features`` method needs
            the two feature maps, which only a split model gives (``PairRun``); where the
            model cannot be split the pipeline falls back to the ``probs`` method and says so
            (:attr:`note`, ``describe()["refine_fallback"]``), or refuses without ``probs``.
        stages: 1 or 2.
        stage2_model: path of the stage-two model (default: the one ``loaded`` names).
        backend, backend_options: how to run the stage-two model (as the Registrar's).
        stage1: the Registrar's :class:`~pddnet.runtime.runner.PairRunner`; stage two shares
            its feature backend when the two models' feature graphs are the same, and runs
            the whole model per pair when stage one does.
    """

    def __init__(self, loaded: LoadedModel, *, refine: S.RefineOptions | int | None = None,
                 stages: int = 1, stage2_model: str | os.PathLike | None = None,
                 backend: str = "onnxruntime", backend_options: dict[str, Any] | None = None,
                 stage1: PairRunner | None = None):
        if stages not in (1, 2):
            raise PddnetError(f"stages must be 1 or 2, got {stages!r}")
        self.refine = S.RefineOptions.coerce(refine)
        self.stages = int(stages)
        #: threads of the C refinement loop: the backends' thread count (1 when unset)
        self.refine_threads = max(1, int((backend_options or {}).get("threads") or 1))
        self.config = dict(loaded.info.config)
        self.image_shape = tuple(loaded.info.image_shape)
        self.note: str | None = None
        if self.refine is not None and self.refine.method == "features" and \
                (stage1 is None or not stage1.is_split):
            why = stage1.split_error if stage1 is not None and stage1.split_error else \
                "no feature runner was given"
            if C.OUTPUT_PROBS not in loaded.info.outputs:
                raise PddnetError(f"{loaded.info.path}: refinement on features needs the model "
                                  f"split into features and head ({why}), and the probability "
                                  f"fit needs the {C.OUTPUT_PROBS!r} output, which this export "
                                  "lacks; re-export with `pddnet export CKPT --out model.onnx "
                                  "--probs`")
            self.note = (f"refinement: method 'features' needs the two feature maps, but the "
                         f"model runs whole ({why}); fell back to method 'probs' (the "
                         "probability fit)")
            self.refine = self.refine.with_method("probs")
        #: the refined stages, 1-based (``[]`` without refinement)
        self.refine_stages: list[int] = [] if self.refine is None else \
            self.refine.refined_stages(self.stages)
        if 1 in self.refine_stages:
            self._check_probs(loaded)
        self.loaded2: LoadedModel | None = None
        self.config2: dict[str, Any] | None = None
        self._runner2: PairRunner | None = None
        if self.stages == 2:
            self.loaded2 = load_model(resolve_stage2(loaded, stage2_model))
            check_stage2(loaded, self.loaded2)
            if 2 in self.refine_stages:
                self._check_probs(self.loaded2)
            self.config2 = dict(self.loaded2.info.config)
            self._runner2 = PairRunner(self.loaded2.proto, backend, dict(backend_options or {}),
                                       split=stage1 is not None and stage1.is_split,
                                       share=stage1, suffix="2")

    def _check_probs(self, loaded: LoadedModel) -> None:
        if self.refine is not None and self.refine.method == "probs" and \
                C.OUTPUT_PROBS not in loaded.info.outputs:
            raise PddnetError(f"{loaded.info.path}: refinement by the probability fit needs the "
                              f"model's {C.OUTPUT_PROBS!r} output, which this export lacks; "
                              "re-export with `pddnet export CKPT --out model.onnx --probs` "
                              "(add --stage2 for two stages), or refine on the features "
                              "(method 'features')")

    def close(self) -> None:
        if self._runner2 is not None:
            self._runner2.close()

    def describe(self) -> dict[str, Any]:
        d: dict[str, Any] = {"stages": self.stages,
                             "refine": None if self.refine is None else self.refine.as_dict(),
                             "refine_stages": list(self.refine_stages)}
        if self.note:
            d["refine_fallback"] = self.note
        if self.loaded2 is not None:
            d["stage2_model"] = {"path": str(self.loaded2.info.path),
                                 "sha256": self.loaded2.info.sha256,
                                 "grid": self.config2["grid"], "capture": self.config2["capture"],
                                 "disp_size": self.config2["disp_size"],
                                 "features": "reused from stage one"
                                 if self._runner2.shares_features else "own"}
        return d

    # ------------------------------------------------------------------------------------
    def _refined(self, outs: dict[str, np.ndarray], config: dict[str, Any], info: dict,
                 features: tuple[np.ndarray | None, np.ndarray | None]) -> np.ndarray | None:
        """The refined dense field (model-grid voxels) of stage ``info["stage"]``, or ``None``
        where that stage is not refined."""
        info["refined"] = info["stage"] in self.refine_stages
        if not info["refined"]:
            return None
        if self.refine.method == "features":
            if features[0] is None or features[1] is None:
                raise PddnetError("refinement on features needs the fixed and moving feature "
                                  "maps of the stage (PairRun.fixed_features / "
                                  "moving_features); pass them to StagePipeline.run")
            res = R.feature_optimise(features[0], features[1], outs[C.OUTPUT_GRID_DISP],
                                     self.refine, threads=self.refine_threads)
        else:
            res = R.instance_optimise(outs[C.OUTPUT_PROBS], outs[C.OUTPUT_GRID_DISP],
                                      int(config["disp_size"]), float(config["capture"]),
                                      self.refine)
        t0 = time.perf_counter()
        disp = R.to_voxels(res.grid_disp, self.image_shape)
        info["refine"] = res.describe()
        info["refine_ms"] = res.ms + (time.perf_counter() - t0) * 1e3
        info["grid_disp_refined"] = res.grid_disp
        return disp

    def run(self, outs: dict[str, np.ndarray], *, fixed: np.ndarray, moving: np.ndarray,
            fixed_features: np.ndarray | None = None,
            moving_features: np.ndarray | None = None) -> tuple[dict[str, np.ndarray],
                                                                  dict[str, Any]]:
        """Apply refinement / the second stage to stage one's outputs ``outs``.

        Args:
            outs: the model's outputs for ``(fixed, moving)``.
            fixed, moving: the ``(1, 1, I, J, K)`` normalised arrays the model ran on.
            fixed_features, moving_features: stage one's feature maps (split models; the
                ``PairRun``'s): the ``features`` method fits them, stage two reuses the fixed
                one.

        Returns:
            ``(outs, info)``: ``outs`` with ``disp`` replaced by the final field (stage one's
            network field kept as ``disp_stage1_network``, refined grids added as
            ``grid_disp_refined`` / ``grid_disp_stage2`` ...), and ``info``: :meth:`describe`
            plus ``per_stage`` (grid, capture, refinement energies and times of each stage)
            and ``timings_ms`` (``refine``: stage one's refinement; ``stage2``: all of stage
            two -- warp, features, head, refinement, composition).
        """
        outs = dict(outs)
        s1: dict[str, Any] = {"stage": 1, "grid": self.config["grid"],
                              "capture": self.config["capture"],
                              "disp_size": self.config["disp_size"]}
        disp1 = self._refined(outs, self.config, s1, (fixed_features, moving_features))
        if disp1 is None:
            disp1 = outs[C.OUTPUT_DISP]
        else:
            outs["grid_disp_refined"] = s1.pop("grid_disp_refined")
        times: dict[str, float | None] = {"refine": s1.pop("refine_ms", None), "stage2": None}
        stage_info = [s1]
        final = disp1
        if self.stages == 2:
            t_all = time.perf_counter()
            t0 = time.perf_counter()
            warped = warp(moving[0, 0], disp1, order=1)[None, None].astype(np.float32)
            t_warp = (time.perf_counter() - t0) * 1e3
            run2 = self._run_stage2(fixed, warped, fixed_features)
            outs2, t_feat, t_head = run2.outputs, run2.features_ms or 0.0, run2.head_ms
            s2: dict[str, Any] = {"stage": 2, "grid": self.config2["grid"],
                                  "capture": self.config2["capture"],
                                  "disp_size": self.config2["disp_size"]}
            disp2 = self._refined(outs2, self.config2, s2,
                                  (run2.fixed_features, run2.moving_features))
            if disp2 is None:
                disp2 = outs2[C.OUTPUT_DISP]
            else:
                outs["grid_disp_stage2_refined"] = s2.pop("grid_disp_refined")
            t0 = time.perf_counter()
            final = R.compose(disp1, disp2)
            t_comp = (time.perf_counter() - t0) * 1e3
            s2["times_ms"] = {"warp": t_warp, "features": t_feat, "head": t_head,
                              "refine": s2.pop("refine_ms", None), "compose": t_comp}
            stage_info.append(s2)
            outs["grid_disp_stage2"] = outs2[C.OUTPUT_GRID_DISP]
            if C.OUTPUT_PROBS in outs2:
                outs["probs_stage2"] = outs2[C.OUTPUT_PROBS]
            outs["disp_stage1"] = np.asarray(disp1, np.float32)
            times["stage2"] = (time.perf_counter() - t_all) * 1e3
        if final is not outs[C.OUTPUT_DISP]:
            outs["disp_network"] = outs[C.OUTPUT_DISP]
            outs[C.OUTPUT_DISP] = np.asarray(final, np.float32)
        return outs, {**self.describe(), "per_stage": stage_info, "timings_ms": times}

    def _run_stage2(self, fixed: np.ndarray, warped: np.ndarray,
                    fixed_features: np.ndarray | None):
        """Stage two on ``(fixed, warped)`` (a ``PairRun``); stage one's ``fixed_features`` are
        reused only where the feature backend is shared (the same feature graph)."""
        return self._runner2.run_pair(fixed, warped, fixed_features
                                      if self._runner2.shares_features else None)
