"""The pair runner: one model run on one pre-processed pair, used by every registration path.

A model is split into ``features`` (one image -> its features) and ``head`` (both feature maps
-> the outputs) where it can be (:mod:`pddnet.graph.split`), so that a fixed scan's features are
computed once and reused; where it cannot be split, the whole model runs per pair. The
:class:`~pddnet.runtime.session.Registrar` (stage one) and the
:class:`~pddnet.runtime.stages.StagePipeline` (stage two, sharing stage one's feature backend
when the two models' feature graphs are the same) both run models through this class only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from pddnet.backends import create_backend
from pddnet.errors import PddnetError
from pddnet.graph.split import split_model
from pddnet.spec import contract as C


@dataclass
class PairRun:
    """What :meth:`PairRunner.run_pair` returns.

    ``features_ms`` is the time of the feature runs this call made (``None`` when the whole
    model ran); ``head_ms`` the head's (or the whole model's) time, both in milliseconds.
    ``fixed_features`` / ``moving_features`` are the two feature maps the head ran on (``None``
    when the whole model ran): refinement on image evidence works on them.
    ``kernel_ms``: the C head's share of ``head_ms`` (``None`` where ONNX Runtime ran the head).
    """

    outputs: dict[str, np.ndarray]
    features_ms: float | None
    head_ms: float
    fixed_features: np.ndarray | None = None
    moving_features: np.ndarray | None = None
    kernel_ms: float | None = None


class PairRunner:
    """Backends for one model: ``features`` + ``head`` where the model splits, else ``full``.

    Args:
        proto: the model (``onnx.ModelProto``).
        backend, options: the backend name and its options (:func:`pddnet.backends.create_backend`).
        split: ``False`` runs the whole model even where it could be split.
        share: another runner whose feature backend this one reuses when the feature graphs
            are identical (the stage-two model of the same weights).
        suffix: appended to the backends' labels (``"2"`` for stage two).
        native: run the head's cost-volume part in the C kernel library
            (:mod:`pddnet.backends.native`) where it is built, the backend is ONNX Runtime on the
            CPU and the head is the standard float32 one; else (or with ``False``, or
            ``PDDNET_NATIVE=off``) ONNX Runtime runs the head's function bodies.
            :attr:`head_impl` says which ran and why. The same switch runs the features'
            OBELISK sampling (the two ``DeformableSample3D`` nodes and their difference) in
            the library, between two ONNX Runtime sessions
            (:class:`pddnet.backends.native.features.NativeFeaturesBackend`), where the
            features part is the standard float32 one; :attr:`sampling_impl` says which ran.
    """

    def __init__(self, proto: Any, backend: str, options: dict[str, Any], *, split: bool = True,
                 share: "PairRunner | None" = None, suffix: str = "", native: bool = True):
        self.split_error: PddnetError | None = None
        self.head_impl: dict[str, Any] = {"implementation": "onnxruntime",
                                          "reason": "the model is not split"}
        self.sampling_impl: dict[str, Any] = dict(self.head_impl)
        self.features_graph = None
        self._features = self._head = self._full = None
        self._owns_features = False
        parts = None
        if split:
            try:
                parts = split_model(proto)
            except PddnetError as exc:
                self.split_error = exc
        try:
            if parts is None:
                self._full = create_backend(backend, proto, label=f"full{suffix}",
                                            **options).activate()
                return
            self.features_graph = parts.features
            if share is not None and share.features_graph is not None and \
                    _same_graph(parts.features, share.features_graph):
                self._features = share._features
                self.sampling_impl = dict(share.sampling_impl)
            else:
                self._features = self._native_features(parts.features, backend, options,
                                                       suffix, native)
                if self._features is None:
                    self._features = create_backend(backend, parts.features,
                                                    label=f"features{suffix}",
                                                    **options).activate()
                self._owns_features = True
            self._head = self._native_head(parts.head, backend, options, suffix, native)
            if self._head is None:
                self._head = create_backend(backend, parts.head, label=f"head{suffix}",
                                            **options).activate()
        except BaseException:
            self.close()
            raise

    def _native_features(self, features: Any, backend: str, options: dict[str, Any],
                         suffix: str, native: bool):
        """The features backend with the C sampling, or ``None`` with the reason in
        :attr:`sampling_impl`."""
        from pddnet.backends.native import features as natf

        why = _not_native("the C sampling", backend, options, native)
        if why is None:
            ok, why = natf.sampling_status()
        if why is not None:
            self.sampling_impl = {"implementation": backend, "reason": why}
            return None
        ort_opts = {k: v for k, v in options.items() if k not in ("threads", "stages")}
        try:
            b = natf.NativeFeaturesBackend(features, label=f"features{suffix}",
                                           threads=options.get("threads"),
                                           **ort_opts).activate()
        except PddnetError as exc:
            self.sampling_impl = {"implementation": "onnxruntime",
                                  "reason": f"the C sampling does not run this model: {exc}"}
            return None
        self.sampling_impl = {"implementation": "native", "reason": None,
                              "threads": b.threads, "nodes": list(b.plan.nodes),
                              "conv": b.conv_status()}
        return b

    def _native_head(self, head: Any, backend: str, options: dict[str, Any], suffix: str,
                     native: bool):
        """The C head backend, or ``None`` with the reason in :attr:`head_impl`."""
        from pddnet.backends import native as nat

        why = _not_native("the C head", backend, options, native)
        if why is None:
            st = nat.status()
            if st["isa"] is None:
                why = st["reason"]
        if why is not None:
            self.head_impl = {"implementation": backend, "reason": why}
            return None
        ort_opts = {k: v for k, v in options.items() if k not in ("threads", "stages")}
        try:
            b = nat.NativeHeadBackend(head, label=f"head{suffix}", threads=options.get("threads"),
                                      **ort_opts).activate()
        except PddnetError as exc:
            self.head_impl = {"implementation": "onnxruntime",
                              "reason": f"the C head does not run this model: {exc}"}
            return None
        d = b.describe()
        self.head_impl = {"implementation": f"native-{d['isa']}", "reason": None,
                          "isa": d["isa"], "threads": d["threads"],
                          "scratch_mb": d["scratch_mb"], "minconv": d["plan"]["minconv"]}
        return b

    @property
    def head_implementation(self) -> str:
        """``"native-avx2"`` / ``"native-sse2"`` / ``"native-portable"``, or the backend that ran
        it (``"onnxruntime"``, ``"torch"``, ...)."""
        return self.head_impl["implementation"]

    @property
    def sampling_implementation(self) -> str:
        """``"native"`` (the features' OBELISK sampling ran in the C library) or the backend that
        ran it (``"onnxruntime"``, ``"torch"``, ...)."""
        return self.sampling_impl["implementation"]

    @property
    def is_split(self) -> bool:
        """True when features and head run separately (fixed features can be reused)."""
        return self._full is None

    @property
    def shares_features(self) -> bool:
        """True when the feature backend is another runner's (see ``share``)."""
        return self.is_split and not self._owns_features

    def features(self, image: np.ndarray) -> tuple[np.ndarray | None, float]:
        """``(features, ms)`` of one ``(1, 1, I, J, K)`` image; ``(None, 0.0)`` unsplit."""
        if self._features is None:
            return None, 0.0
        out = self._features.run({C.FEATURES_INPUT: image})[C.FEATURES_OUTPUT]
        return out, self._features.last_run_ms

    def run_pair(self, fixed: np.ndarray, moving: np.ndarray,
                 fixed_features: np.ndarray | None = None) -> PairRun:
        """Run the model on ``(fixed, moving)``; ``fixed_features`` (from :meth:`features` of
        this runner or of the runner it shares features with) skips the fixed branch."""
        if self._full is not None:
            outs = self._full.run({C.INPUT_FIXED: fixed, C.INPUT_MOVING: moving})
            return PairRun(outs, None, self._full.last_run_ms)
        feat_ms = 0.0
        if fixed_features is None:
            fixed_features, feat_ms = self.features(fixed)
        moving_features, ms = self.features(moving)
        outs = self._head.run({C.FIXED_FEATURES: fixed_features,
                               C.MOVING_FEATURES: moving_features})
        return PairRun(outs, feat_ms + ms, self._head.last_run_ms, fixed_features,
                       moving_features, getattr(self._head, "last_kernel_ms", None))

    def describe(self) -> dict[str, Any]:
        """The backend's description (the feature backend's when split), with ``head``: which
        implementation ran the head (:attr:`head_impl`), and ``sampling``: which ran the
        features' OBELISK sampling (:attr:`sampling_impl`)."""
        d = (self._features if self._full is None else self._full).describe()
        d["head"] = dict(self.head_impl)
        d["sampling"] = dict(self.sampling_impl)
        return d

    def close(self) -> None:
        """Release the backends this runner created (a shared feature backend stays)."""
        for b in (self._features if self._owns_features else None, self._head, self._full):
            if b is not None:
                b.deactivate()


def _not_native(what: str, backend: str, options: dict[str, Any], native: bool) -> str | None:
    """Why the C library may not replace part of ONNX Runtime's work here (``None``: it may,
    where it is built and not switched off)."""
    if not native:
        return f"{what} was not asked for"
    if backend != "onnxruntime":
        return f"{what} serves the onnxruntime backend only"
    if options.get("profile") is not None:
        return "profiling ONNX Runtime's nodes"
    provs = options.get("providers") or ["cpu"]
    provs = [p for p in (provs.split(",") if isinstance(provs, str) else provs) if p]
    if any(str(p).strip().lower() not in ("cpu", "cpuexecutionprovider") for p in provs):
        return f"providers {provs} ({what} replaces the CPU provider only)"
    return None


def _same_graph(a: Any, b: Any) -> bool:
    """Two feature parts compute the same thing (graph and initializers; metadata ignored)."""
    return a.graph.SerializeToString(deterministic=True) == \
        b.graph.SerializeToString(deterministic=True)
