"""Lazy imports of heavy optional dependencies, each failing with the pip extra to install.

Nothing here imports torch, tensorrt or triton at module import time.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from pddnet.errors import PddnetError

_HINTS = {
    "torch": ("pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu && "
              "pip install 'pddnet[train]'  (a CPU build is enough; tested with 2.13.0)"),
    "matplotlib": "pip install 'pddnet[report]'",
    "tensorrt": ("pip install 'pddnet[gpu]'  (needs an NVIDIA GPU and CUDA 12; TensorRT >= 10.9 for "
                 "the AOT plugins, >= 10.0 for native engines, >= 11.2 for 5D GridSample)"),
    "triton": "pip install 'pddnet[dev]'  (or: pip install triton)",
    "tritonclient": "pip install 'tritonclient[grpc]'",
    "cuda": "pip install 'pddnet[gpu]'  (cuda-python)",
}


def install_hint(module: str) -> str:
    """How to install the package that provides ``module`` (its top-level name)."""
    root = module.split(".")[0]
    return _HINTS.get(root, f"pip install {root}")


def require(module: str, purpose: str) -> ModuleType:
    """Import ``module`` or raise PddnetError naming what needs it and how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:  # also raised when sys.modules[module] is None
        root = module.split(".")[0]
        raise PddnetError(f"{purpose} needs the '{root}' package, which is not importable here "
                          f"({exc}). Install it with: {install_hint(root)}") from exc


def torch() -> ModuleType:
    return require("torch", "the PyTorch reference model")


def available(module: str) -> bool:
    """True when ``module`` imports; never raises."""
    try:
        importlib.import_module(module)
    except Exception:
        return False
    return True
