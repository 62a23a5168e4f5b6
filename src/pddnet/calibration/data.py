"""Representative data for calibration: registration pairs of a Learn2Reg dataset, pre-processed
exactly as the runtime pre-processes them.

:class:`PairReader` is an ``onnxruntime.quantization.CalibrationDataReader``: ``get_next()``
returns ``{"fixed": (1, 1, I, J, K), "moving": (1, 1, I, J, K)}`` float32 feeds of the full
model (``prepare_fixed`` / ``prepare_moving`` of :mod:`pddnet.runtime.preprocess`: reoriented,
resampled onto the model grid, intensities normalised), one pair per call, ``None`` at the end.

Which pairs: ``split`` (default ``train``: calibrate on training data, never on the test pairs
that validation reports) and ``pairs`` of them (default :data:`DEFAULT_PAIRS`), drawn with a
fixed seed from the split's ordered pairs so that many subjects appear (the first pairs of a
``train`` split share one fixed scan). Asking for more pairs than the split has is an error; the
default takes every pair when the split has fewer (and says so in ``notes``).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from pddnet.errors import PddnetError

#: default number of calibration pairs: activation ranges of this model settle after a few
#: pairs (the feature ranges move by < 2 % between 8 and 16 pairs of the synthetic data; see
#: docs/precision.md), and every pair costs one full-model run per calibration pass
DEFAULT_PAIRS = 16
#: seed of the pair draw
PAIR_SEED = 0


def select_pairs(data_dir: str | os.PathLike, *, split: str = "train", pairs: int | None = None,
                 seed: int = PAIR_SEED) -> tuple[list, list[str]]:
    """``(pairs, notes)``: ``pairs`` pairs of ``split`` (see the module docstring).

    Raises :class:`PddnetError` for a folder without a dataset, a split without pairs, a
    non-positive count, or more pairs asked for than the split has."""
    from pddnet.data.learn2reg import Learn2RegDataset

    if pairs is not None and pairs < 1:
        raise PddnetError(f"calibration needs at least one pair, got --pairs {pairs}")
    ds = Learn2RegDataset(data_dir)
    available = ds.pairs(split)
    if not available:
        raise PddnetError(f"{data_dir}: the {split} split has no registration pairs to calibrate "
                          "on; choose another --split")
    notes: list[str] = []
    want = DEFAULT_PAIRS if pairs is None else int(pairs)
    if want > len(available):
        if pairs is not None:
            raise PddnetError(f"{data_dir}: asked for {pairs} calibration pairs but the {split} "
                              f"split has only {len(available)}; pass --pairs "
                              f"{len(available)} or fewer (or another --split)")
        notes.append(f"the {split} split has {len(available)} pairs, fewer than the default "
                     f"{DEFAULT_PAIRS}: calibrating on all of them")
        want = len(available)
    order = np.random.default_rng(seed).permutation(len(available))[:want]
    return [available[i] for i in sorted(order)], notes


def _reader_base():
    from onnxruntime.quantization import CalibrationDataReader

    return CalibrationDataReader


class PairReader(_reader_base()):
    """Calibration feeds over dataset pairs (module docstring).

    Args:
        data_dir: a Learn2Reg dataset folder (or its ``*_dataset.json``).
        info: the model's :class:`~pddnet.graph.model.ModelInfo` (grid, intensity window).
        split, pairs, seed: as :func:`select_pairs`.
        progress: show a progress bar while pairs are read (each pass of the calibrator).
        spacing_tolerance: as the runtime's (a model trained at another spacing is refused).
    """

    def __init__(self, data_dir, info, *, split: str = "train", pairs: int | None = None,
                 seed: int = PAIR_SEED, progress: bool = True, spacing_tolerance: float = 0.3,
                 cache: bool = True):
        self.info = info
        self.pairs, self.notes = select_pairs(data_dir, split=split, pairs=pairs, seed=seed)
        self.split = split
        self.progress = progress
        self.spacing_tolerance = spacing_tolerance
        self._cache: dict[int, dict[str, np.ndarray]] | None = {} if cache else None
        self._i = 0
        self._bar = None

    def __len__(self) -> int:
        return len(self.pairs)

    def feeds(self, i: int) -> dict[str, np.ndarray]:
        """The full model's feeds of pair ``i`` (pre-processed as the runtime does)."""
        from pddnet.runtime.preprocess import prepare_fixed, prepare_moving

        if self._cache is not None and i in self._cache:
            return self._cache[i]
        p = self.pairs[i]
        try:
            fixed = prepare_fixed(str(p.fixed.image), self.info,
                                  spacing_tolerance=self.spacing_tolerance)
            moving = prepare_moving(str(p.moving.image), fixed, self.info)
        except PddnetError as exc:
            raise PddnetError(f"calibration pair {p}: {exc}") from exc
        out = {"fixed": fixed.array, "moving": moving.array}
        if self._cache is not None:
            self._cache[i] = out
        return out

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._i == 0 and self.progress:
            from tqdm import tqdm

            self._bar = tqdm(total=len(self.pairs), desc="calibrate", unit="pair")
        if self._i >= len(self.pairs):
            if self._bar is not None:
                self._bar.close()
                self._bar = None
            return None
        out = self.feeds(self._i)
        self._i += 1
        if self._bar is not None:
            self._bar.update(1)
        return out

    def rewind(self) -> None:
        self._i = 0

    def describe(self) -> dict[str, Any]:
        return {"split": self.split, "pairs": len(self.pairs),
                "pair_names": [str(p) for p in self.pairs], "seed": PAIR_SEED,
                "notes": list(self.notes)}


class ArrayReader(_reader_base()):
    """Calibration feeds from a list of ready dicts (tests, synthetic inputs)."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]):
        self._feeds = list(feeds)
        self._i = 0
        self.notes: list[str] = []

    def __len__(self) -> int:
        return len(self._feeds)

    def get_next(self):
        if self._i >= len(self._feeds):
            return None
        self._i += 1
        return self._feeds[self._i - 1]

    def rewind(self) -> None:
        self._i = 0

    def describe(self) -> dict[str, Any]:
        return {"split": None, "pairs": len(self._feeds), "pair_names": [], "notes": []}
