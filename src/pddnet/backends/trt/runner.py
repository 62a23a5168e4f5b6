"""TensorRT backend: runs a (sub-)model as a TensorRT engine, with tensorrt + cuda-python only.

Registered as ``"tensorrt"`` (alias ``"trt"``), so ``pddnet register --backend trt`` and
``pddnet validate --backend trt`` use it through the same
:class:`~pddnet.backends.base.Backend` interface as ONNX Runtime. No torch.

Loading (``activate``):

1. ``model`` is an ONNX model (bytes, ``ModelProto`` or ``.onnx`` path) or a serialized engine
   (``.engine``/``.plan`` path with its metadata ``.json``). For ONNX, the engine comes from the
   cache (:mod:`pddnet.backends.trt.cache`): key = model hash, GPU name, compute capability,
   SM count, TensorRT version, precision, plugin binding. A missing, stale, foreign or corrupt
   engine is rebuilt (``build="auto"``, the default), rebuilt always (``"force"``) or refused
   (``"never"``); an explicit engine file is verified and refused unless it matches this
   machine. A mismatching engine is never deserialized.
2. ``trt.Runtime(logger).deserialize_cuda_engine(bytes)``, ``create_execution_context()``; the
   JIT plugins an engine uses (none with ``--plugins auto``) are registered first.
3. I/O buffers are allocated once (:mod:`~pddnet.backends.trt.io` decides shapes and
   sizes): device memory with ``cudaMalloc``, pinned host memory with ``cudaMallocHost``, and
   bound with ``context.set_tensor_address(name, ptr)``; one CUDA stream.
4. ``warmup`` runs on zero inputs; with ``cuda_graph=True`` the enqueue is then captured into a
   CUDA graph (TensorRT's recipe: one ``execute_async_v3`` after any shape change, then capture
   ``execute_async_v3`` between ``cudaStreamBeginCapture``/``EndCapture``) and replayed by
   ``cudaGraphLaunch``. Not with JIT plugins (their Python callbacks cannot be captured).

Each run: copy the feeds into the pinned buffers, ``cudaMemcpyAsync`` host to device,
``execute_async_v3(stream)`` (or the graph), device to host, synchronise; outputs are copies.
``last_gpu_ms`` is the GPU time of the enqueue alone (CUDA events); ``last_run_ms`` (base
class) the wall time with the copies.

Nothing here has run: no GPU or TensorRT where it was written (docs/tensorrt.md).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pddnet._optional import require
from pddnet.backends.base import Backend, TensorSpec
from pddnet.backends.trt.io import IOPlan
from pddnet.errors import PddnetError

_PURPOSE = "the TensorRT backend (--backend trt)"
BUILD_MODES = ("auto", "never", "force")
ENGINE_SUFFIXES = (".engine", ".plan", ".trt")


def _is_engine_path(model: Any) -> bool:
    return isinstance(model, (str, os.PathLike)) and \
        os.fspath(model).lower().endswith(ENGINE_SUFFIXES)


class TensorRTBackend(Backend):
    """Run a model with TensorRT (see the module docstring).

    Args:
        model: ONNX bytes / ``onnx.ModelProto`` / ``.onnx`` path, or an engine path.
        engine_cache: folder of cached engines (default ``$PDDNET_ENGINE_CACHE`` or
            ``~/.cache/pddnet/engines``; ``pddnet build --out DIR`` writes the same layout).
        build: ``auto`` (build when no matching engine), ``never`` (refuse), ``force``.
        plugins, workspace, timing_cache, hardware_compat: as ``pddnet build``.
        cuda_graph: capture the enqueue into a CUDA graph after warm-up.
        warmup: runs on zero inputs at load (>= 0).
        device: CUDA device ordinal.
        threads, providers: ONNX Runtime options; accepted and ignored (``pddnet register``
            passes them to every backend).
        echo: where build/cache messages go (default: nowhere; ``notes`` keeps them).
    """

    name = "tensorrt"

    def __init__(self, model: Any, *, label: str = "model",
                 engine_cache: str | os.PathLike | None = None, build: str = "auto",
                 plugins: str = "auto", workspace: str | int | None = None,
                 timing_cache: str | os.PathLike | None = None, hardware_compat: str = "none",
                 cuda_graph: bool = False, warmup: int = 1, device: int = 0,
                 threads: int | None = None, providers: Any = None,
                 echo: Callable[[str], None] | None = None):
        super().__init__(model, label=label)
        if build not in BUILD_MODES:
            raise PddnetError(f"tensorrt backend: build must be one of {BUILD_MODES}, got "
                              f"{build!r}")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
            raise PddnetError(f"tensorrt backend: warmup must be an integer >= 0, got {warmup!r}")
        from pddnet.backends.trt.build import BuildOptions

        self.options = BuildOptions(plugins=plugins, workspace=workspace,
                                    timing_cache=timing_cache, hardware_compat=hardware_compat,
                                    device=int(device))
        self.engine_cache = engine_cache
        self.build = build
        self.cuda_graph = bool(cuda_graph)
        self.warmup = warmup
        self.device = int(device)
        self.ignored = {k: v for k, v in (("threads", threads), ("providers", providers))
                        if v not in (None, [], ["cpu"], "cpu")}
        self._echo = echo
        self.notes: list[str] = []
        self.engine_path: Path | None = None
        self.record: dict[str, Any] | None = None
        self.built = False
        self.last_gpu_ms: float | None = None
        self._reset_handles()

    def _reset_handles(self) -> None:
        self._trt = None
        self._runtime = self._engine = self._context = None
        self._stream = self._graph = self._timer = None
        self._dev: dict[str, Any] = {}
        self._host: dict[str, Any] = {}
        self._plan: IOPlan | None = None

    def _say(self, msg: str) -> None:
        self.notes.append(msg)
        if self._echo is not None:
            self._echo(msg)

    # -- loading --------------------------------------------------------------------------
    def _load_impl(self) -> None:
        trt = require("tensorrt", _PURPOSE)
        from pddnet.backends.trt import cuda as cuda_rt

        cuda_rt.runtime_module()  # clear error naming the extra when cuda-python is missing
        cuda_rt.call(cuda_rt.runtime_module().cudaSetDevice(self.device))
        self._trt = trt
        engine_bytes = self._engine_bytes(trt)
        jit_ops = list((self.record or {}).get("binding", {}).get("jit_ops", []))
        if jit_ops:
            from pddnet.backends.trt.plugins import register_plugins

            register_plugins(jit_ops)
            if self.cuda_graph:
                raise PddnetError(f"tensorrt backend ({self.label}): the engine uses JIT "
                                  f"plugins {jit_ops}, whose Python callbacks cannot be captured "
                                  "into a CUDA graph; run without cuda_graph")
        logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(logger)
        self._engine = self._runtime.deserialize_cuda_engine(engine_bytes)
        if self._engine is None:
            raise PddnetError(f"tensorrt backend ({self.label}): TensorRT {trt.__version__} "
                              f"could not deserialize {self.engine_path}; rebuild it with "
                              "`pddnet build`")
        self._context = self._engine.create_execution_context()
        if self._context is None:
            raise PddnetError(f"tensorrt backend ({self.label}): could not create an execution "
                              "context (out of GPU memory?)")
        self._plan = IOPlan.from_engine(self._engine, trt, label=self.label)
        self._allocate()
        self._warm_up()

    def _engine_bytes(self, trt) -> bytes:
        from pddnet.backends.trt import cache as ec
        from pddnet.backends.trt.build import build_cached, current_environment

        env = current_environment(self.device)
        if _is_engine_path(self._model):
            path = Path(self._model)
            record = ec.read_record(ec.meta_path_for(path))
            if record is None:
                raise PddnetError(f"refusing to run TensorRT engine {path}: no metadata file "
                                  f"{ec.meta_path_for(path).name} beside it; build engines with "
                                  "`pddnet build`, which writes both")
            k = record.get("key", {})
            try:
                key = ec.EngineKey(k.get("model_sha256", ""), k.get("precision", "fp32"),
                                   k.get("plugins", ""), env, k.get("hardware_compat", "none"))
            except PddnetError as exc:
                raise PddnetError(f"refusing to run TensorRT engine {path}: {exc}") from exc
            self.record = ec.check_engine_file(path, key)
            self.engine_path = path
            return path.read_bytes()
        proto = self._as_proto()
        cache = ec.EngineCache(self.engine_cache)
        if self.build == "never":
            from pddnet.backends.trt.build import engine_key, make_plan

            key = engine_key(proto, make_plan(proto, self.options, trt.__version__), env,
                             self.options)
            found = cache.lookup(key, self.label)
            if not found.verdict.usable:
                raise PddnetError(
                    f"tensorrt backend ({self.label}): no usable engine in {cache.root} and "
                    f"build='never':\n{found.explain()}\nbuild one with `pddnet build --onnx "
                    f"MODEL.onnx --out {cache.root}`")
        else:
            found, self.built = build_cached(proto, cache, label=self.label,
                                             options=self.options, env=env,
                                             force=self.build == "force", echo=self._say)
        self.record = found.record
        self.engine_path = found.engine_path
        return found.engine_path.read_bytes()

    def _as_proto(self):
        import onnx

        m = self._model
        if isinstance(m, onnx.ModelProto):
            return m
        if isinstance(m, (bytes, bytearray)):
            from pddnet.graph.model import parse_model_bytes

            return parse_model_bytes(bytes(m), where=f"{self.label} model")
        if isinstance(m, (str, os.PathLike)):
            from pddnet.graph.model import load_model

            return load_model(m).proto
        raise PddnetError(f"tensorrt backend ({self.label}): model must be ONNX bytes, an "
                          f"onnx.ModelProto, an .onnx path or an engine path, got "
                          f"{type(m).__name__}")

    def _allocate(self) -> None:
        from pddnet.backends.trt import cuda as cuda_rt

        assert self._plan is not None
        self._stream = cuda_rt.Stream()
        self._timer = cuda_rt.EventTimer(self._stream)
        for d in self._plan.all:
            self._dev[d.name] = cuda_rt.DeviceBuffer(d.nbytes)
            self._host[d.name] = cuda_rt.HostBuffer(d.shape, d.dtype)
            if not self._context.set_tensor_address(d.name, self._dev[d.name].ptr):
                raise PddnetError(f"tensorrt backend ({self.label}): set_tensor_address failed "
                                  f"for {d.name!r}")

    def _enqueue(self) -> None:
        if not self._context.execute_async_v3(self._stream.ptr):
            raise PddnetError(f"tensorrt backend ({self.label}): execute_async_v3 failed (see "
                              "the TensorRT log)")

    def _warm_up(self) -> None:
        from pddnet.backends.trt import cuda as cuda_rt

        assert self._plan is not None
        for d in self._plan.inputs:
            self._host[d.name].array[...] = 0
            cuda_rt.copy_htod_async(self._dev[d.name], self._host[d.name], self._stream)
        for _ in range(max(self.warmup, 1 if self.cuda_graph else 0)):
            self._enqueue()
        self._stream.synchronize()
        if self.cuda_graph:
            self._graph = cuda_rt.GraphCapture(self._stream, self._enqueue)
            self._graph.launch()
            self._stream.synchronize()

    def _unload_impl(self) -> None:
        for obj in [self._graph, self._timer] + list(self._host.values()) + \
                list(self._dev.values()):
            if obj is None:
                continue
            for meth in ("close", "free"):
                if hasattr(obj, meth):
                    try:
                        getattr(obj, meth)()
                    except PddnetError:
                        pass
        if self._stream is not None:
            try:
                self._stream.close()
            except PddnetError:
                pass
        self._reset_handles()

    # -- hooks ----------------------------------------------------------------------------
    def _input_specs_impl(self) -> list[TensorSpec]:
        assert self._plan is not None
        return self._plan.specs()

    @property
    def output_names(self) -> list[str]:
        self._require_active("output_names")
        assert self._plan is not None
        return [d.name for d in self._plan.outputs]

    def _run_impl(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from pddnet.backends.trt import cuda as cuda_rt

        plan = self._plan
        assert plan is not None
        host = {n: b.array for n, b in self._host.items()}
        plan.stage_inputs(feeds, host)
        for d in plan.inputs:
            cuda_rt.copy_htod_async(self._dev[d.name], self._host[d.name], self._stream)
        self._timer.record_start()
        if self._graph is not None:
            self._graph.launch()
        else:
            self._enqueue()
        self._timer.record_stop()
        for d in plan.outputs:
            cuda_rt.copy_dtoh_async(self._host[d.name], self._dev[d.name], self._stream)
        self._stream.synchronize()
        self.last_gpu_ms = self._timer.elapsed_ms()
        return plan.collect_outputs(host)

    def _describe_impl(self) -> dict[str, Any]:
        rec = self.record or {}
        return {
            "tensorrt": self._trt.__version__ if self._trt is not None else None,
            "engine": os.fspath(self.engine_path) if self.engine_path else None,
            "built_now": self.built,
            "precision": rec.get("key", {}).get("precision"),
            "plugins": rec.get("key", {}).get("plugins"),
            "gpu": rec.get("env", {}).get("gpu_name"),
            "cuda_graph": self.cuda_graph,
            "warmup": self.warmup,
            "io_mb": round(self._plan.total_bytes / 1e6, 3) if self._plan else None,
            "ignored_options": sorted(self.ignored),
            "notes": list(self.notes),
        }


__all__ = ["TensorRTBackend", "BUILD_MODES"]
