"""Shipped weights: trained checkpoints packaged with pddnet (see MODEL_CARD.md here)."""

from __future__ import annotations

from pathlib import Path

from pddnet.errors import PddnetError

_HERE = Path(__file__).parent
SHIPPED = {"small": "pddnet_small.pt"}
#: the validated deployment bundle of each shipped checkpoint (FP32/FP16/INT8 graphs with their
#: validation evidence; ``scripts/build_shipped_bundle.py``): the default ``--model`` of
#: ``pddnet register``, so the core install registers scans with no torch and no model argument
SHIPPED_BUNDLES = {"small": "pddnet_small.bundle.tar.gz"}


def shipped_checkpoint(name: str = "small") -> Path:
    """Path of a shipped checkpoint; a clear error when the name or the file is missing."""
    if name not in SHIPPED:
        raise PddnetError(f"no shipped weights named {name!r}; available: {sorted(SHIPPED)}")
    path = _HERE / SHIPPED[name]
    if not path.is_file():
        raise PddnetError(f"the shipped weights {path} are missing from this installation; "
                          f"reinstall pddnet or pass a checkpoint explicitly")
    return path


def shipped_bundle(name: str = "small") -> Path:
    """Path of a shipped deployment bundle (``.tar.gz``); a clear error when it is missing."""
    if name not in SHIPPED_BUNDLES:
        raise PddnetError(f"no shipped bundle named {name!r}; available: "
                          f"{sorted(SHIPPED_BUNDLES)}")
    path = _HERE / SHIPPED_BUNDLES[name]
    if not path.is_file():
        raise PddnetError(f"the shipped model bundle {path} is missing from this installation "
                          f"(a source checkout builds it with `python scripts/build_shipped_bundle"
                          f".py`); reinstall pddnet or pass --model MODEL.onnx|BUNDLE")
    return path
