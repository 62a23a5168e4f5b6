"""A thin, checked wrapper over the CUDA runtime API of cuda-python (no torch, no pycuda).

cuda-python's runtime bindings live in ``cuda.bindings.runtime`` from cuda-python 12.6 (the
``cuda-bindings`` package) and in ``cuda.cudart`` before; both return a tuple
``(cudaError_t, *results)`` from every call, which :func:`call` checks and unpacks. Used
calls (CUDA runtime API, as NVIDIA's TensorRT Python samples use them): ``cudaSetDevice``,
``cudaGetDeviceProperties`` (``name``, ``major``, ``minor``, ``multiProcessorCount``),
``cudaMalloc``/``cudaFree``, ``cudaMallocHost``/``cudaFreeHost`` (pinned host memory),
``cudaMemcpyAsync`` with ``cudaMemcpyKind``, ``cudaStreamCreate``/``cudaStreamSynchronize``/
``cudaStreamDestroy``, ``cudaEventCreate``/``cudaEventRecord``/``cudaEventElapsedTime``, and for
CUDA graphs ``cudaStreamBeginCapture`` (``cudaStreamCaptureModeGlobal``),
``cudaStreamEndCapture``, ``cudaGraphInstantiate(graph, 0)`` (CUDA 12 signature),
``cudaGraphLaunch``, ``cudaGraphExecDestroy``, ``cudaGraphDestroy``.

Nothing here has run on a GPU in this repository's CI (there is none); see docs/tensorrt.md.
"""

from __future__ import annotations

import ctypes
from types import ModuleType
from typing import Any

import numpy as np

from pddnet.errors import PddnetError

_HINT = ("pip install 'pddnet[gpu]'  (cuda-python; needs an NVIDIA driver and a CUDA 12+ "
         "capable GPU)")


def runtime_module() -> ModuleType:
    """``cuda.bindings.runtime`` (cuda-python >= 12.6) or ``cuda.cudart`` (older)."""
    try:
        from cuda.bindings import runtime as rt  # type: ignore[import-not-found]
        return rt
    except ImportError:
        pass
    try:
        from cuda import cudart as rt  # type: ignore[import-not-found,attr-defined]
        return rt
    except ImportError as exc:
        raise PddnetError(f"the TensorRT backend needs cuda-python, which is not importable here "
                          f"({exc}). Install it with: {_HINT}") from exc


def call(result: Any) -> Any:
    """Check a cuda-python result tuple ``(err, *values)``; return ``None``, the value, or the
    tuple of values."""
    rt = runtime_module()
    if isinstance(result, tuple):
        err, values = result[0], result[1:]
    else:
        err, values = result, ()
    if int(err) != int(rt.cudaError_t.cudaSuccess):
        try:
            _, name = rt.cudaGetErrorName(err)
            _, text = rt.cudaGetErrorString(err)
            msg = f"{name.decode() if isinstance(name, bytes) else name}: " \
                  f"{text.decode() if isinstance(text, bytes) else text}"
        except Exception:  # pragma: no cover - only on a broken driver
            msg = str(err)
        raise PddnetError(f"CUDA error {msg}")
    if not values:
        return None
    return values[0] if len(values) == 1 else values


def device_properties(device: int = 0) -> dict[str, Any]:
    """``{"gpu_name", "compute_capability", "sm_count", "total_memory_mb"}`` of ``device``."""
    rt = runtime_module()
    count = call(rt.cudaGetDeviceCount())
    if count < 1 or device >= count:
        raise PddnetError(f"no CUDA device {device} (this machine has {count})")
    prop = call(rt.cudaGetDeviceProperties(device))
    name = prop.name
    if isinstance(name, (bytes, bytearray)):
        name = bytes(name).split(b"\0", 1)[0].decode(errors="replace")
    return {"gpu_name": str(name).strip(), "compute_capability": f"{prop.major}.{prop.minor}",
            "sm_count": int(prop.multiProcessorCount),
            "total_memory_mb": int(prop.totalGlobalMem) // (1 << 20)}


class Stream:
    def __init__(self):
        self.rt = runtime_module()
        self.handle = call(self.rt.cudaStreamCreate())

    @property
    def ptr(self) -> int:
        """The stream as an integer (what ``execute_async_v3`` takes)."""
        return int(self.handle)

    def synchronize(self) -> None:
        call(self.rt.cudaStreamSynchronize(self.handle))

    def close(self) -> None:
        if self.handle is not None:
            call(self.rt.cudaStreamDestroy(self.handle))
            self.handle = None


class DeviceBuffer:
    """``nbytes`` of device memory (``cudaMalloc``)."""

    def __init__(self, nbytes: int):
        self.rt = runtime_module()
        self.nbytes = int(nbytes)
        self.ptr = int(call(self.rt.cudaMalloc(max(1, self.nbytes))))

    def free(self) -> None:
        if self.ptr:
            call(self.rt.cudaFree(self.ptr))
            self.ptr = 0


class HostBuffer:
    """Pinned host memory (``cudaMallocHost``) with a numpy view of ``shape``/``dtype``."""

    def __init__(self, shape: tuple[int, ...], dtype: np.dtype):
        self.rt = runtime_module()
        self.dtype = np.dtype(dtype)
        self.shape = tuple(int(s) for s in shape)
        count = int(np.prod(self.shape, dtype=np.int64))
        self.nbytes = count * self.dtype.itemsize
        self.ptr = int(call(self.rt.cudaMallocHost(max(1, self.nbytes))))
        raw = (ctypes.c_byte * max(1, self.nbytes)).from_address(self.ptr)
        self.array = np.frombuffer(raw, dtype=np.uint8, count=self.nbytes).view(
            self.dtype).reshape(self.shape)

    def free(self) -> None:
        if self.ptr:
            self.array = None
            call(self.rt.cudaFreeHost(self.ptr))
            self.ptr = 0


def copy_htod_async(dst: DeviceBuffer, src: HostBuffer, stream: Stream) -> None:
    rt = runtime_module()
    call(rt.cudaMemcpyAsync(dst.ptr, src.ptr, src.nbytes,
                            rt.cudaMemcpyKind.cudaMemcpyHostToDevice, stream.handle))


def copy_dtoh_async(dst: HostBuffer, src: DeviceBuffer, stream: Stream) -> None:
    rt = runtime_module()
    call(rt.cudaMemcpyAsync(dst.ptr, src.ptr, dst.nbytes,
                            rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream.handle))


class GraphCapture:
    """Capture the work ``fn()`` enqueues on ``stream`` into an executable CUDA graph."""

    def __init__(self, stream: Stream, fn):
        rt = runtime_module()
        self.rt = rt
        self.stream = stream
        call(rt.cudaStreamBeginCapture(stream.handle,
                                       rt.cudaStreamCaptureMode.cudaStreamCaptureModeGlobal))
        try:
            fn()
        finally:
            self.graph = call(rt.cudaStreamEndCapture(stream.handle))
        self.exec = call(rt.cudaGraphInstantiate(self.graph, 0))

    def launch(self) -> None:
        call(self.rt.cudaGraphLaunch(self.exec, self.stream.handle))

    def close(self) -> None:
        if getattr(self, "exec", None) is not None:
            call(self.rt.cudaGraphExecDestroy(self.exec))
            self.exec = None
        if getattr(self, "graph", None) is not None:
            call(self.rt.cudaGraphDestroy(self.graph))
            self.graph = None


class EventTimer:
    """GPU time between two events on a stream, in milliseconds."""

    def __init__(self, stream: Stream):
        self.rt = runtime_module()
        self.stream = stream
        self.start = call(self.rt.cudaEventCreate())
        self.stop = call(self.rt.cudaEventCreate())

    def record_start(self) -> None:
        call(self.rt.cudaEventRecord(self.start, self.stream.handle))

    def record_stop(self) -> None:
        call(self.rt.cudaEventRecord(self.stop, self.stream.handle))

    def elapsed_ms(self) -> float:
        return float(call(self.rt.cudaEventElapsedTime(self.start, self.stop)))

    def close(self) -> None:
        for e in (self.start, self.stop):
            if e is not None:
                call(self.rt.cudaEventDestroy(e))
        self.start = self.stop = None


__all__ = ["runtime_module", "call", "device_properties", "Stream", "DeviceBuffer", "HostBuffer",
           "copy_htod_async", "copy_dtoh_async", "GraphCapture", "EventTimer"]
