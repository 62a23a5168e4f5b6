"""The ground floor for files: atomic writes of files and folders, SHA-256 checksums, JSON.

Every writer in pddnet goes through :func:`atomic_write` or :func:`atomic_directory`: data
lands in a temporary file (or folder) beside the destination and is renamed into place only when
complete, so an error or Ctrl-C never leaves a partial output. Standard library only.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Iterator

from pddnet.errors import PddnetError


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it to ``path`` when the block succeeds.

    The temporary file keeps the final suffixes (so writers that infer the format from the name,
    such as nibabel, still work). On any exception, including KeyboardInterrupt, it is removed.
    """
    final = Path(path)
    if final.exists() and not overwrite:
        raise PddnetError(f"{final} already exists; remove it or pass --overwrite")
    final.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(final.suffixes)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=f".partial{suffix}",
                                    dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # mkstemp creates 0600; give the result the permissions a plain open() would
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty staging folder beside ``path``; it becomes ``path`` when the block succeeds.

    The folder version of :func:`atomic_write` (files inside it are still written with
    ``atomic_write``): a bundle, a Triton repository. An existing ``path`` is refused unless
    ``overwrite``; it is then replaced only after the block succeeded (renamed aside, the new
    folder renamed in, the old one removed). On any exception, KeyboardInterrupt included, the
    staging folder is removed and ``path`` is left as it was.
    """
    import shutil

    final = Path(path)
    if final.exists() and not final.is_dir():
        raise PddnetError(f"{final} exists and is not a folder; choose another output path")
    if final.exists() and not overwrite:
        raise PddnetError(f"{final} already exists; remove it or pass --overwrite")
    final.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
    try:
        yield stage
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(stage, 0o777 & ~umask)
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".old", dir=final.parent))
            os.replace(final, old / final.name)
            os.replace(stage, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(stage, final)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def sha256_bytes(data: bytes) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks (models and engines can be large)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def jsonable(obj: Any) -> Any:
    """Deep-copy ``obj`` into strict-JSON-safe types: NaN/inf -> ``None``, numpy scalars and
    arrays (anything with ``tolist``) -> Python numbers and lists, dict keys -> ``str``. Use when
    writing a report; metric functions themselves keep NaN/inf so that means and checks stay
    honest."""
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if hasattr(obj, "tolist") and not isinstance(obj, (str, bytes)):
        return jsonable(obj.tolist())
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, bool):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    return obj


def write_json(path: str | os.PathLike, obj: Any, *, overwrite: bool = True) -> Path:
    """Write ``jsonable(obj)`` as strict, indented JSON to ``path``, atomically."""
    with atomic_write(path, overwrite=overwrite) as tmp:
        tmp.write_text(json.dumps(jsonable(obj), indent=2, allow_nan=False) + "\n")
    return Path(path)


def read_json(path: str | os.PathLike) -> Any:
    """The JSON in ``path``, or ``None`` when it is missing or not JSON (callers that must
    refuse such a file check for ``None`` and say why)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
