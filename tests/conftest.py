"""Test-wide hooks: skip the ``gpu`` and ``trt`` markers (declared in pyproject) with a reason
where CUDA or TensorRT is missing, so the default run passes on a machine without a GPU.

- ``gpu``: needs torch with CUDA (the Triton kernels run on torch CUDA tensors);
- ``trt``: needs the ``tensorrt`` package, cuda-python and a CUDA device.

The probes run once, lazily (only when a marked test is collected), and never import tensorrt
or torch for unmarked runs.
"""

from __future__ import annotations

import functools

import pytest


@functools.lru_cache(maxsize=None)
def _gpu_missing() -> str | None:
    try:
        import torch
    except ImportError as exc:
        return f"needs torch with CUDA (torch not importable: {exc})"
    if not torch.cuda.is_available():
        return f"needs an NVIDIA GPU with CUDA (torch {torch.__version__}: no CUDA device)"
    return None


@functools.lru_cache(maxsize=None)
def _trt_missing() -> str | None:
    try:
        import tensorrt  # noqa: F401
    except ImportError as exc:
        return f"needs TensorRT (pip install 'pddnet[gpu]'; not importable: {exc})"
    try:
        from pddnet.backends.trt.cuda import device_properties

        device_properties(0)
    except Exception as exc:  # PddnetError from a missing cuda-python or device
        return f"needs cuda-python and a CUDA device ({exc})"
    return None


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "gpu" in item.keywords:
            reason = _gpu_missing()
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))
        if "trt" in item.keywords:
            reason = _trt_missing()
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))
