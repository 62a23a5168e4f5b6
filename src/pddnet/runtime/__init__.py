"""Torch-free registration: preprocess NIfTI pairs, run a model, refine, post-process, write.

Imports numpy, scipy, nibabel, onnx and onnxruntime only; never torch (a test imports every
module with ``import torch`` blocked). Models are loaded and split by :mod:`pddnet.graph` and run
by :mod:`pddnet.backends`. Modules, in the order data flows through them:

- :mod:`~pddnet.runtime.bundle`      verify a deployment bundle, choose its backend and precision
- :mod:`~pddnet.runtime.preprocess`  NIfTI in any orientation/spacing -> model-grid arrays
- :mod:`~pddnet.runtime.resample`    the interpolation primitives (numpy/scipy)
- :mod:`~pddnet.runtime.runner`      one model run on one pair (features + head, or whole)
- :mod:`~pddnet.runtime.refine`      instance optimisation (numpy)
- :mod:`~pddnet.runtime.stages`      refinement and the second stage around the runner
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
    "register_files": "pddnet.runtime.batch",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'pddnet.runtime' has no attribute {name!r}")
