"""Reading and writing the ``pddnet.*`` metadata of a model (keys: :mod:`pddnet.spec.contract`).

Every value is stored as JSON text in the model's ``metadata_props``. The functions take any
object with ``metadata_props`` (an ``onnx.ModelProto``) without importing onnx, so the contract
stays importable everywhere.
"""

from __future__ import annotations

import json
from typing import Any

from pddnet.errors import PddnetError

_MISSING = object()


def raw_metadata(model: Any) -> dict[str, str]:
    """``{key: JSON text}`` of every metadata entry."""
    return {p.key: p.value for p in model.metadata_props}


def read_metadata(model: Any) -> dict[str, Any]:
    """Every metadata entry JSON-decoded; a value that is not JSON is kept as its text (for
    reports and lenient readers; the runtime uses :func:`metadata_value`)."""
    out: dict[str, Any] = {}
    for key, text in raw_metadata(model).items():
        try:
            out[key] = json.loads(text)
        except ValueError:
            out[key] = text
    return out


def metadata_value(model: Any, key: str, *, where: str = "model", default: Any = _MISSING) -> Any:
    """The JSON-decoded value of ``key``; ``default`` when absent (an error without one).

    ``model`` is a model or the dict :func:`raw_metadata` returned. A value that is not valid
    JSON is refused with a message naming the model and the key: the file was not written by
    ``pddnet export`` or was edited.
    """
    meta = model if isinstance(model, dict) else raw_metadata(model)
    if key not in meta:
        if default is _MISSING:
            raise PddnetError(f"{where}: the model lacks the metadata {key!r}; re-export the model "
                              "with `pddnet export`")
        return default
    try:
        return json.loads(meta[key])
    except (ValueError, TypeError) as exc:
        raise PddnetError(f"{where}: metadata {key!r} is not valid JSON ({exc}); re-export the "
                          "model with `pddnet export`") from exc


def set_metadata(model: Any, key: str, value: Any) -> None:
    """Set (replace) one entry to ``json.dumps(value)`` (keys sorted, so files are stable)."""
    for p in list(model.metadata_props):
        if p.key == key:
            model.metadata_props.remove(p)
    model.metadata_props.add(key=key, value=json.dumps(value, sort_keys=True))


def copy_metadata(src: Any, dst: Any, *, replace: bool = False) -> None:
    """Copy every entry of ``src`` to ``dst``; entries ``dst`` already has are kept unless
    ``replace``."""
    have = {p.key for p in dst.metadata_props}
    for p in src.metadata_props:
        if p.key in have:
            if not replace:
                continue
            for q in list(dst.metadata_props):
                if q.key == p.key:
                    dst.metadata_props.remove(q)
        dst.metadata_props.add(key=p.key, value=p.value)
