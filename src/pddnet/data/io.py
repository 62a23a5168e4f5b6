"""File I/O shared by every part: atomic writes, NIfTI volumes.

All writers go through :func:`atomic_write`: data lands in a temporary file in the destination
folder and is renamed into place only when complete, so an error or Ctrl-C never leaves a
partial output.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

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
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
