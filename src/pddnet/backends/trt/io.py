"""Buffer and shape bookkeeping of the TensorRT backend, separated from TensorRT and CUDA.

The backend asks the engine for its I/O tensors (``ICudaEngine.num_io_tensors``,
``get_tensor_name(i)``, ``get_tensor_mode(name)``, ``get_tensor_shape(name)``,
``get_tensor_dtype(name)``; TensorRT >= 8.5, the only API in 10.x/11.x) and hands plain
:class:`TensorDesc` records to :class:`IOPlan`, which decides everything that does not need a
GPU: the numpy dtype of each TensorRT data type, that every shape is static (pddnet exports
fixed shapes; a dynamic engine is refused with the fix), the byte size of every buffer, the
:class:`~pddnet.backends.base.TensorSpec` list the base class checks feeds against, and
how feeds are copied into the pinned host buffers. ``tests/backends/test_trt_backend.py`` runs it with
fake engines.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

import numpy as np

from pddnet.backends.base import TensorSpec
from pddnet.errors import PddnetError

#: ``tensorrt.DataType`` member name -> numpy dtype (``trt.nptype`` does the same for these).
TRT_DTYPES: dict[str, np.dtype] = {
    "FLOAT": np.dtype(np.float32),
    "HALF": np.dtype(np.float16),
    "INT8": np.dtype(np.int8),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
}


def numpy_dtype(trt_dtype: object) -> np.dtype:
    """The numpy dtype of a ``tensorrt.DataType`` (or its member name)."""
    name = getattr(trt_dtype, "name", None) or str(trt_dtype).split(".")[-1]
    if name not in TRT_DTYPES:
        raise PddnetError(f"TensorRT I/O tensor type {name} has no numpy equivalent here "
                          f"(supported: {sorted(TRT_DTYPES)}); keep model inputs and outputs "
                          "float32/float16")
    return TRT_DTYPES[name]


@dataclass(frozen=True)
class TensorDesc:
    """One engine I/O tensor as TensorRT describes it."""

    name: str
    is_input: bool
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        return self.size * np.dtype(self.dtype).itemsize


class IOPlan:
    """What to allocate and copy for one engine; built once, at load time."""

    def __init__(self, descs: Iterable[TensorDesc], *, label: str = "model"):
        descs = list(descs)
        self.label = label
        names = [d.name for d in descs]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise PddnetError(f"tensorrt backend ({label}): duplicate I/O tensor names {dup}")
        self.inputs = [d for d in descs if d.is_input]
        self.outputs = [d for d in descs if not d.is_input]
        if not self.inputs or not self.outputs:
            raise PddnetError(f"tensorrt backend ({label}): the engine has "
                              f"{len(self.inputs)} inputs and {len(self.outputs)} outputs; "
                              "expected at least one of each")
        for d in descs:
            if any(int(s) < 0 for s in d.shape):
                raise PddnetError(
                    f"tensorrt backend ({label}): {'input' if d.is_input else 'output'} "
                    f"{d.name!r} has a dynamic shape {tuple(d.shape)}; pddnet builds "
                    "fixed-shape engines only (export without dynamic shapes, then "
                    "`pddnet build`)")

    @classmethod
    def from_engine(cls, engine, trt, *, label: str = "model") -> "IOPlan":
        """Read the I/O tensors of a ``tensorrt.ICudaEngine`` (TensorRT >= 8.5 API)."""
        descs = []
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            mode = engine.get_tensor_mode(name)
            descs.append(TensorDesc(name, mode == trt.TensorIOMode.INPUT,
                                    tuple(int(s) for s in engine.get_tensor_shape(name)),
                                    numpy_dtype(engine.get_tensor_dtype(name))))
        return cls(descs, label=label)

    @property
    def all(self) -> list[TensorDesc]:
        return self.inputs + self.outputs

    @property
    def total_bytes(self) -> int:
        """Device memory for the I/O buffers (the engine's own activations come on top)."""
        return sum(d.nbytes for d in self.all)

    def specs(self) -> list[TensorSpec]:
        return [TensorSpec(d.name, np.dtype(d.dtype), tuple(d.shape)) for d in self.inputs]

    def stage_inputs(self, feeds: Mapping[str, np.ndarray],
                     host: Mapping[str, np.ndarray]) -> None:
        """Copy checked feeds into the pinned host arrays (same shape and dtype, no casts)."""
        for d in self.inputs:
            src = feeds[d.name]
            dst = host[d.name]
            if src.shape != dst.shape or src.dtype != dst.dtype:
                raise PddnetError(f"tensorrt backend ({self.label}): input {d.name!r} is "
                                  f"{src.dtype.name}{tuple(src.shape)}, the engine takes "
                                  f"{dst.dtype.name}{tuple(dst.shape)}")
            np.copyto(dst, src, casting="no")

    def collect_outputs(self, host: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Copies of the output host arrays (the buffers are reused by the next run)."""
        return {d.name: np.array(host[d.name], copy=True) for d in self.outputs}

    def describe(self) -> list[dict]:
        return [{"name": d.name, "io": "input" if d.is_input else "output",
                 "shape": list(d.shape), "dtype": np.dtype(d.dtype).name} for d in self.all]


__all__ = ["TensorDesc", "IOPlan", "numpy_dtype", "TRT_DTYPES"]
