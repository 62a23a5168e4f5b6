"""Checkpoints: the config plus a state_dict, loadable with ``torch.load(weights_only=True)``.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts (nothing that
needs unpickling of arbitrary objects):

``{"format": "pddnet-checkpoint", "version": 1, "config": {...}, "state_dict": {...},
"image_shape": [I, J, K], "train": {...} | None, "metadata": {...}}``

:func:`read_checkpoint` checks that structure before anything uses it: the config must be a
valid :class:`~pddnet.spec.config.PDDConfig` (types and the bounds of :mod:`pddnet.spec.config`:
``disp_size`` odd in [3, 31], ``grid`` in [2, 64] per axis, ``channels`` in [1, 256],
``capture`` in (0, 1], a bounded cost volume), ``image_shape`` three integers in [6, 1024],
``state_dict`` a dict of tensors. Anything else is one :class:`~pddnet.errors.PddnetError`
naming the checkpoint and the field -- raised before any network is built.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from pddnet._files import atomic_write
from pddnet.errors import PddnetError
from pddnet.model.network import PDDNet
from pddnet.spec.config import PDDConfig, check_image_shape, show

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
    version = ckpt.get("version", 0)
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise PddnetError(f"{path}: checkpoint version is {show(version)}; expected an integer "
                          f"(this pddnet reads up to {VERSION}) -- the checkpoint is damaged")
    if version > VERSION:
        raise PddnetError(f"{path} has checkpoint version {version}; this pddnet reads "
                          f"up to {VERSION}. Upgrade pddnet.")
    check_checkpoint(ckpt, where=str(path))
    return ckpt


def check_checkpoint(ckpt: dict[str, Any], *, where: str = "checkpoint") -> PDDConfig:
    """Check the fields of a checkpoint dict (module docstring) and return its config.

    Raises a one-line :class:`PddnetError` naming the field; builds no network."""
    if "config" not in ckpt:
        raise PddnetError(f"{where}: the checkpoint has no config (the network's "
                          "hyper-parameters); it was not written by `pddnet train` or is damaged")
    try:
        config = PDDConfig.from_dict(ckpt["config"])
    except PddnetError as exc:
        raise PddnetError(f"{where}: checkpoint config: {exc} -- the checkpoint is damaged or "
                          "not written by `pddnet train`") from None
    if "image_shape" in ckpt and ckpt["image_shape"] is not None:
        try:
            check_image_shape(ckpt["image_shape"], name="image_shape")
        except PddnetError as exc:
            raise PddnetError(f"{where}: checkpoint {exc} -- the checkpoint is damaged") \
                from None
    state = ckpt.get("state_dict")
    if not isinstance(state, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise PddnetError(f"{where}: checkpoint state_dict is {show(state)}; expected a dict "
                          "of named tensors -- the checkpoint is damaged")
    return config


def load_model(path, *, eval_mode: bool = True) -> tuple[PDDNet, dict[str, Any]]:
    """Rebuild the network from a checkpoint; returns ``(model, checkpoint dict)``."""
    ckpt = read_checkpoint(path)
    config = check_checkpoint(ckpt, where=str(path))
    model = PDDNet(config)
    try:
        missing, unexpected = model.load_state_dict(ckpt["state_dict"], strict=False)
    except RuntimeError as exc:  # a tensor of the wrong shape
        first = " ".join(str(exc).split())
        raise PddnetError(f"checkpoint {path} does not match its config: "
                          f"{first[:300]}") from None
    if missing or unexpected:
        raise PddnetError(f"checkpoint {path} does not match its config: missing "
                          f"{sorted(missing)}, unexpected {sorted(unexpected)}")
    if eval_mode:
        model.eval()
    return model, ckpt
