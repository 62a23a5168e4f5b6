"""Runtime backends behind one interface (:class:`~pddnet.runtime.backends.base.Backend`).

``create_backend(name, model, **options)`` builds one by name. Backends register in
:data:`BACKENDS` as ``name -> "module:Class"`` and are imported only when asked for, so a
TensorRT backend (``"tensorrt"``, alias ``"trt"``) never loads tensorrt unless it is
selected.
"""

from __future__ import annotations

import importlib
from typing import Any

from pddnet.errors import PddnetError
from pddnet.runtime.backends.base import Backend, TensorSpec

BACKENDS: dict[str, str] = {
    "onnxruntime": "pddnet.runtime.backends.onnxrt:OnnxRuntimeBackend",
    "tensorrt": "pddnet.runtime.backends.trt:TensorRTBackend",
    "trt": "pddnet.runtime.backends.trt:TensorRTBackend",
}

__all__ = ["BACKENDS", "Backend", "TensorSpec", "create_backend"]


def create_backend(name: str, model: Any, **options: Any) -> Backend:
    """Instantiate the backend registered as ``name`` (not yet activated)."""
    if name not in BACKENDS:
        raise PddnetError(f"unknown backend {name!r}; available: {sorted(BACKENDS)}")
    module, cls = BACKENDS[name].split(":")
    return getattr(importlib.import_module(module), cls)(model, **options)
