"""Checkpoints: the config plus a state_dict, loadable with ``torch.load(weights_only=True)``.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts (nothing that
needs unpickling of arbitrary objects):

``{"format": "pddnet-checkpoint", "version": 1, "config": {...}, "state_dict": {...},
"image_shape": [I, J, K], "train": {...} | None, "metadata": {...}}``
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from pddnet._files import atomic_write
from pddnet.errors import PddnetError
from pddnet.model.network import PDDNet
from pddnet.spec.config import PDDConfig

FORMAT = "pddnet-checkpoint"
VERSION = 1


def save_checkpoint(path, model: PDDNet, *, image_shape, train: dict | None = None,
                    metadata: dict | None = None, overwrite: bool = True) -> Path:
    """Write ``model`` (config + weights) and optional training state atomically."""
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "config": model.config.as_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "image_shape": [int(n) for n in image_shape],
        "train": train,
        "metadata": metadata or {},
    }
    with atomic_write(path, overwrite=overwrite) as tmp:
        torch.save(payload, tmp)
    return Path(path)


def read_checkpoint(path) -> dict[str, Any]:
    """Load the raw checkpoint dict safely (``weights_only=True``) and check its format."""
    path = Path(path)
    if not path.is_file():
        raise PddnetError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if "GLOBAL" in text or "allowed global" in text:
            offender = next((ln.strip() for ln in text.splitlines() if "GLOBAL" in ln), "")
            raise PddnetError(f"refusing to load {path}: it needs unpickling of arbitrary "
                              f"Python objects, which can run code; pddnet checkpoints hold "
                              f"only tensors and plain values. {offender}") from exc
        raise PddnetError(f"cannot read checkpoint {path}: it is truncated or not a torch "
                          f"file. Is it a pddnet checkpoint written by 'pddnet train'?") from exc
    except Exception as exc:  # truncated or not a torch file
        raise PddnetError(f"cannot read checkpoint {path}: {exc}. Is it a pddnet checkpoint "
                          f"written by 'pddnet train'?") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise PddnetError(f"{path} is not a pddnet checkpoint (missing format tag {FORMAT!r})")
    if ckpt.get("version", 0) > VERSION:
        raise PddnetError(f"{path} has checkpoint version {ckpt['version']}; this pddnet reads "
                          f"up to {VERSION}. Upgrade pddnet.")
    return ckpt


def load_model(path, *, eval_mode: bool = True) -> tuple[PDDNet, dict[str, Any]]:
    """Rebuild the network from a checkpoint; returns ``(model, checkpoint dict)``."""
    ckpt = read_checkpoint(path)
    config = PDDConfig.from_dict(ckpt["config"])
    model = PDDNet(config)
    missing, unexpected = model.load_state_dict(ckpt["state_dict"], strict=False)
    if missing or unexpected:
        raise PddnetError(f"checkpoint {path} does not match its config: missing "
                          f"{sorted(missing)}, unexpected {sorted(unexpected)}")
    if eval_mode:
        model.eval()
    return model, ckpt
