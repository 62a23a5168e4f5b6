"""Torch-free registration: load an artefact, preprocess NIfTI pairs, run a backend, post-process.

Imports numpy, scipy, nibabel, onnx and onnxruntime only; never torch (a test runs the whole
runtime with ``import torch`` blocked).

Modules, in the order data flows through them:

- :mod:`~pddnet.graph.model`       load and check an exported ``.onnx``, parse its metadata
- :mod:`~pddnet.graph.split`       cut it into ``features`` and ``head`` for fixed-scan reuse
- :mod:`~pddnet.backends`    inference engines behind one interface (ONNX Runtime)
- :mod:`~pddnet.runtime.preprocess`  NIfTI in any orientation/spacing -> model-grid arrays
- :mod:`~pddnet.runtime.resample`    the interpolation primitives (numpy/scipy)
- :mod:`~pddnet.runtime.postprocess` model-grid field -> fixed-file field; warping
- :mod:`~pddnet.runtime.outputs`     atomic writing of fields, warped scans and summary.json
- :mod:`~pddnet.runtime.session`     :class:`Registrar` / :class:`RegistrationResult`
- :mod:`~pddnet.runtime.batch`       one fixed, many moving scans (``pddnet register``)

The main names are importable from here lazily, so ``import pddnet.runtime`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "Registrar": "pddnet.runtime.session",
    "RegistrationResult": "pddnet.runtime.session",
    "load_model": "pddnet.graph.model",
    "ModelInfo": "pddnet.graph.model",
    "split_model": "pddnet.graph.split",
    "create_backend": "pddnet.backends",
    "register_files": "pddnet.runtime.batch",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'pddnet.runtime' has no attribute {name!r}")
