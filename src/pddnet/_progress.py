"""Progress bars (tqdm, on stderr) that ``pddnet -q`` hides.

tqdm reads its ``TQDM_*`` environment defaults once, at import, so a flag set later by the
command line cannot reach bars through the environment; every bar in pddnet is made here and
asks the process-wide verbosity (``PDDNET_VERBOSITY``, set by :mod:`pddnet.cli.output`) instead.
"""

from __future__ import annotations

import os
from typing import Any


def quiet() -> bool:
    """True when the command line asked for no progress output (``pddnet -q``)."""
    return os.environ.get("PDDNET_VERBOSITY") == "0"


def progress_bar(iterable: Any = None, **kwargs: Any):
    """``tqdm(iterable, **kwargs)``, disabled under ``-q`` as well as by ``disable=True``."""
    from tqdm import tqdm

    kwargs["disable"] = bool(kwargs.get("disable")) or quiet()
    return tqdm(iterable, **kwargs)
