"""ONNX Runtime backend: runs an ONNX (sub-)model on the CPU, CUDA or TensorRT execution provider.

Local functions (the ``ai.pddnet`` custom ops) are inlined by ONNX Runtime, so the canonical
model runs here with no plugin.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np

from pddnet.backends.base import Backend, TensorSpec
from pddnet.errors import PddnetError

PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
}
OPT_LEVELS = ("disable", "basic", "extended", "all")
_ORT_TYPES = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_,
}


def resolve_providers(providers: Sequence[str] | str | None) -> list[str]:
    """Map aliases (``cpu``, ``cuda``, ``tensorrt``) to ONNX Runtime provider names.

    The CPU provider is always appended last (it runs nodes the others cannot). Raises
    :class:`PddnetError` for an unknown name or a provider this onnxruntime build lacks.
    """
    import onnxruntime as ort

    if providers is None:
        providers = ["cpu"]
    elif isinstance(providers, str):
        providers = [p for p in providers.split(",") if p.strip()]
    names = []
    for p in providers:
        full = PROVIDER_ALIASES.get(p.strip().lower(), p.strip())
        if not full.endswith("ExecutionProvider"):
            raise PddnetError(f"unknown execution provider {p!r}; use one of "
                              f"{sorted(set(PROVIDER_ALIASES))} or a full ONNX Runtime name")
        if full not in names:
            names.append(full)
    available = ort.get_available_providers()
    missing = [n for n in names if n not in available]
    if missing:
        hint = ""
        if any(n in ("CUDAExecutionProvider", "TensorrtExecutionProvider") for n in missing):
            hint = (" GPU providers need onnxruntime-gpu instead of onnxruntime (never both): "
                    "pip uninstall -y onnxruntime && pip install 'pddnet[gpu]'")
        raise PddnetError(f"execution provider(s) {missing} are not available in this onnxruntime "
                          f"{ort.__version__} build (available: {available}).{hint}")
    if "CPUExecutionProvider" not in names:
        names.append("CPUExecutionProvider")
    return names


class OnnxRuntimeBackend(Backend):
    """Run a model with ``onnxruntime.InferenceSession``.

    Args:
        model: serialised ONNX bytes, an ``onnx.ModelProto`` or a path (external data must
            already be inlined for bytes/ModelProto; :func:`pddnet.graph.model.load_model`
            does that).
        providers: ``["cpu"]`` (default), ``["cuda"]``, ``["tensorrt", "cuda"]``, ...
        threads: intra-op threads (``None``: ONNX Runtime's default, one per physical core).
        optimization: graph optimisation level, one of ``disable|basic|extended|all``.
        mem_arena: keep ONNX Runtime's CPU memory arena. Off by default: the arena grows in
            powers of two and keeps its peak for the session's life, which for the cost volume
            (G^3 x L^3 floats, ~440 MB at the paper's size) can double the resident memory,
            for somewhat faster features and head (docs/benchmarks.md).
        mem_pattern: ONNX Runtime's memory-pattern planning (``enable_mem_pattern``): from
            the second run on, one block laid out for all intermediate tensors is allocated per
            run. Its effect depends on the arena. With the arena *on* it is harmful (it nearly
            doubled the peak at the paper's size, with erratic run times). With the arena
            *off* (our default) it lowers the peak at every size measured and was faster at the
            paper's size, slower at the ``small`` size. On by default (the better at the
            paper's size); ``pddnet bench`` measures both; the figures are in
            ``docs/benchmarks.md``.
        profile: a file-name prefix: turn on ONNX Runtime's profiler; :meth:`end_profiling`
            returns the JSON trace (node kernel times in microseconds).
        provider_options: per-provider dicts, e.g. ``{"cuda": {"device_id": 1}}``; CUDA
            defaults to ``arena_extend_strategy=kSameAsRequested`` for the same reason.
        stages: run a model that holds mean-field steps as two sessions cut after the first
            step (:func:`pddnet.graph.split.split_after_first_step`): ONNX Runtime keeps the
            second half's cost volumes resident otherwise (paper size: 4.6 GB peak in one
            session; see ``docs/benchmarks.md``). Same outputs; off while profiling.
    """

    name = "onnxruntime"

    def __init__(self, model: Any, *, label: str = "model",
                 providers: Sequence[str] | str | None = None, threads: int | None = None,
                 optimization: str = "all", mem_arena: bool = False, mem_pattern: bool = True,
                 profile: str | os.PathLike | None = None,
                 provider_options: dict[str, dict[str, Any]] | None = None,
                 stages: bool = True):
        super().__init__(model, label=label)
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int)
                                    or threads < 1):
            raise PddnetError(f"threads must be a positive integer or None, got {threads!r}")
        if optimization not in OPT_LEVELS:
            raise PddnetError(f"optimization must be one of {OPT_LEVELS}, got {optimization!r}")
        self.providers = resolve_providers(providers)
        self.threads = threads
        self.optimization = optimization
        self.mem_arena = bool(mem_arena)
        self.mem_pattern = bool(mem_pattern)
        self.profile = None if profile is None else os.fspath(profile)
        self._provider_options = {PROVIDER_ALIASES.get(k.lower(), k): dict(v)
                                  for k, v in (provider_options or {}).items()}
        self.stages = bool(stages)
        self._session = None

    def _load_impl(self) -> None:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.graph_optimization_level = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[self.optimization]
        so.enable_cpu_mem_arena = self.mem_arena
        so.enable_mem_pattern = self.mem_pattern
        if self.profile is not None:
            so.enable_profiling = True
            so.profile_file_prefix = self.profile
        if self.threads is not None:
            so.intra_op_num_threads = self.threads
        so.inter_op_num_threads = 1
        opts = []
        for p in self.providers:
            o = dict(self._provider_options.get(p, {}))
            if p == "CUDAExecutionProvider":
                o.setdefault("arena_extend_strategy", "kSameAsRequested")
            opts.append(o)
        model = self._model
        parts = self._stage_parts(model) if self.stages and self.profile is None else None
        if hasattr(model, "SerializeToString"):
            model = model.SerializeToString()
        elif isinstance(model, os.PathLike):
            model = os.fspath(model)
        try:
            if parts is None:
                self._session = ort.InferenceSession(model, so, providers=self.providers,
                                                     provider_options=opts)
            else:
                first, second, order = parts
                self._session = _StagedSession(
                    *(ort.InferenceSession(m.SerializeToString(), so, providers=self.providers,
                                           provider_options=opts) for m in (first, second)),
                    order)
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types
            raise PddnetError(f"onnxruntime could not load the {self.label} model: "
                              f"{type(exc).__name__}: {exc}") from exc
        used = self._session.get_providers()
        dropped = [p for p in self.providers if p not in used]
        if dropped:
            raise PddnetError(f"onnxruntime could not initialise {dropped} (session uses {used}); "
                              "check the CUDA/cuDNN/TensorRT libraries, or run with the cpu "
                              "provider")

    @staticmethod
    def _stage_parts(model):
        """``(first, second, (input names, output names))`` of a model (``ModelProto``,
        bytes or path) with mean-field steps, else ``None`` (one session)."""
        import onnx

        from pddnet.graph.split import split_after_first_step

        if isinstance(model, onnx.ModelProto):
            proto = model
        else:
            try:
                proto = (onnx.load_from_string(model) if isinstance(model, bytes)
                         else onnx.load(os.fspath(model)))
            except Exception:  # unreadable here: let InferenceSession report it
                return None
        parts = split_after_first_step(proto)
        if parts is None:
            return None
        inits = {t.name for t in proto.graph.initializer}
        order = ([i.name for i in proto.graph.input if i.name not in inits],
                 [o.name for o in proto.graph.output])
        return (*parts, order)

    def _unload_impl(self) -> None:
        self._session = None

    def end_profiling(self) -> str:
        """Stop the profiler (``profile=...``) and return the path of its JSON trace."""
        self._require_active("end_profiling")
        if self.profile is None:
            raise PddnetError(f"onnxruntime backend ({self.label}): end_profiling needs a "
                              "backend created with profile=PREFIX")
        return self._session.end_profiling()

    def _input_specs_impl(self) -> list[TensorSpec]:
        specs = []
        for i in self._session.get_inputs():
            if i.type not in _ORT_TYPES:
                raise PddnetError(f"{self.label} model input {i.name!r} has unsupported type "
                                  f"{i.type}")
            specs.append(TensorSpec(i.name, np.dtype(_ORT_TYPES[i.type]),
                                    tuple(d if isinstance(d, int) else None for d in i.shape)))
        return specs

    @property
    def output_names(self) -> list[str]:
        self._require_active("output_names")
        return [o.name for o in self._session.get_outputs()]

    def _run_impl(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = [o.name for o in self._session.get_outputs()]
        try:
            values = self._session.run(names, feeds)
        except Exception as exc:
            raise PddnetError(f"onnxruntime failed running the {self.label} model: "
                              f"{type(exc).__name__}: {exc}") from exc
        return dict(zip(names, values))

    def _describe_impl(self) -> dict[str, Any]:
        import onnxruntime as ort

        return {
            "onnxruntime": ort.__version__,
            "providers": self._session.get_providers(),
            "threads": self.threads,
            "optimization": self.optimization,
            "mem_arena": self.mem_arena,
            "mem_pattern": self.mem_pattern,
            "stages": 2 if isinstance(self._session, _StagedSession) else 1,
        }


class _StagedSession:
    """Two ``InferenceSession`` s that run as one (the part of its interface the backend
    uses): the first's outputs feed the second, and are dropped as soon as it has run."""

    def __init__(self, first, second, order: tuple[list[str], list[str]]):
        self.first, self.second = first, second
        args = {a.name: a for s in (first, second) for a in s.get_inputs()}
        outs = {a.name: a for s in (first, second) for a in s.get_outputs()}
        self._inputs = [args[n] for n in order[0] if n in args]
        self._outputs = [outs[n] for n in order[1]]

    def get_inputs(self):
        return self._inputs

    def get_outputs(self):
        return self._outputs

    def get_providers(self):
        return self.first.get_providers()

    def run(self, names, feeds):
        first_out = [o.name for o in self.first.get_outputs()]
        mid = dict(zip(first_out, self.first.run(
            first_out, {a.name: feeds[a.name] for a in self.first.get_inputs()})))
        second_in = {a.name: mid[a.name] if a.name in mid else feeds[a.name]
                     for a in self.second.get_inputs()}
        wanted = set(names)
        mid = {k: v for k, v in mid.items() if k in wanted}  # release the carried volumes
        second_out = [o.name for o in self.second.get_outputs()]
        values = self.second.run(second_out, second_in)
        del second_in
        mid.update(zip(second_out, values))
        return [mid[n] for n in names]
