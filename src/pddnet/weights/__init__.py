"""Shipped weights: trained checkpoints packaged with pddnet (see MODEL_CARD.md here)."""

from __future__ import annotations

from pathlib import Path

from pddnet.errors import PddnetError

_HERE = Path(__file__).parent
SHIPPED = {"small": "pddnet_small.pt"}


def shipped_checkpoint(name: str = "small") -> Path:
    """Path of a shipped checkpoint; a clear error when the name or the file is missing."""
    if name not in SHIPPED:
        raise PddnetError(f"no shipped weights named {name!r}; available: {sorted(SHIPPED)}")
    path = _HERE / SHIPPED[name]
    if not path.is_file():
        raise PddnetError(f"the shipped weights {path} are missing from this installation; "
                          f"reinstall pddnet or pass a checkpoint explicitly")
    return path
