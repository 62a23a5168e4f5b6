"""Runtime backends behind one interface (:class:`~pddnet.backends.base.Backend`).

``create_backend(name, model, **options)`` builds one by name. Backends register in
:data:`BACKENDS` as ``name -> "module:Class"`` and are imported only when asked for, so a
TensorRT backend (``"tensorrt"``, alias ``"trt"``) never loads tensorrt unless it is
selected.

``"torch"`` is the PyTorch reference (:class:`pddnet.backends.torch.TorchBackend`):
it lives outside the runtime and is registered here only by its import string, so the runtime
never imports torch unless that backend is asked for. Other packages add backends with
:func:`register_backend`.
"""

from __future__ import annotations

import importlib
from typing import Any

from pddnet.backends.base import Backend, TensorSpec
from pddnet.errors import PddnetError

BACKENDS: dict[str, str] = {
    "onnxruntime": "pddnet.backends.onnxrt:OnnxRuntimeBackend",
    "tensorrt": "pddnet.backends.trt.runner:TensorRTBackend",
    "trt": "pddnet.backends.trt.runner:TensorRTBackend",
    "torch": "pddnet.backends.torch:TorchBackend",
}

__all__ = ["BACKENDS", "Backend", "TensorSpec", "create_backend", "register_backend"]


def register_backend(name: str, target: str, *, replace: bool = False) -> None:
    """Register a backend class by its import string ``"package.module:Class"`` (imported
    only when :func:`create_backend` asks for ``name``)."""
    if ":" not in target:
        raise PddnetError(f"register_backend: target must be 'module:Class', got {target!r}")
    if name in BACKENDS and BACKENDS[name] != target and not replace:
        raise PddnetError(f"backend {name!r} is already registered as {BACKENDS[name]!r}; pass "
                          "replace=True to override it")
    BACKENDS[name] = target


def create_backend(name: str, model: Any, **options: Any) -> Backend:
    """Instantiate the backend registered as ``name`` (not yet activated)."""
    if name not in BACKENDS:
        raise PddnetError(f"unknown backend {name!r}; available: {sorted(BACKENDS)}")
    module, cls = BACKENDS[name].split(":")
    return getattr(importlib.import_module(module), cls)(model, **options)
