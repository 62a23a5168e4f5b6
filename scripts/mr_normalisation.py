"""Which intensity normalisation suits MR: z-score within the foreground (the ``mr`` mode) or a
foreground percentile window mapped onto the ``ct`` mode's output range [-2, 3]?

    PYTHONPATH=src .venv/bin/python scripts/mr_normalisation.py [--subjects 8] [--seed 0]

Renders ``--subjects`` synthetic MR-like subjects (`pddnet.data.synth`, small preset: each with
its own intensity scale, offset and bias field) and, for each candidate, prints

- tissue spread: for each of the 13 labels the median normalised value per subject; the SD of
  that median across subjects, averaged over the labels, divided by the SD between the labels'
  means (lower: the same tissue lands at the same value whatever the scanner scale and bias
  field, which is what a network trained on other subjects relies on);
- the largest change of the output under three random ``a * v + b`` rescalings (a > 0) of the
  float32 input;
- the fraction of foreground voxels (above the image mean) at a clip bound (every candidate's
  output range is [-2, 3]).

The ``ct`` mode (HU window) is printed as the control that motivates the ``mr`` mode.
"""

from __future__ import annotations

import argparse

import numpy as np

from pddnet.data.synth import synthesize_subject
from pddnet.spec.config import Intensity, normalise_intensity


def _percentile_window(low: float, high: float):
    def f(img: np.ndarray) -> np.ndarray:
        v = np.asarray(img, np.float64)
        lo, hi = np.percentile(v[v > v.mean()], [low, high])
        return np.clip(-2.0 + (v - lo) / (hi - lo) * 5.0, -2.0, 3.0).astype(np.float32)
    return f


CANDIDATES = {
    "mr: z-score in the foreground, clip [-2, 3]":
        lambda img: normalise_intensity(img, Intensity(mode="mr")),
    "foreground percentiles 1-99 -> [-2, 3]": _percentile_window(1, 99),
    "foreground percentiles 5-95 -> [-2, 3]": _percentile_window(5, 95),
    "ct: clip(v, -1000, 1500) / 500 (control)": lambda img: normalise_intensity(img, Intensity()),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--subjects", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    medians = {k: [] for k in CANDIDATES}
    change = dict.fromkeys(CANDIDATES, 0.0)
    clipped = {k: [] for k in CANDIDATES}
    for i in range(args.subjects):
        img, lab, _ = synthesize_subject("small", args.seed, i, contrast="mr")
        fg = img > img.mean()
        for name, f in CANDIDATES.items():
            y = f(img)
            medians[name].append([np.median(y[lab == k]) for k in range(1, 14)])
            clipped[name].append(float(np.mean((y[fg] <= -2.0) | (y[fg] >= 3.0))))
            for _ in range(3):
                a = 10 ** rng.uniform(-2, 3)
                z = f((img.astype(np.float64) * a + a * rng.uniform(0, 1)).astype(np.float32))
                change[name] = max(change[name], float(np.abs(z - y).max()))
    print(f"{args.subjects} synthetic MR subjects (small preset, seed {args.seed})")
    print(f"{'candidate':44s} {'tissue spread':>13s} {'max change a*v+b':>17s} "
          f"{'fg clipped':>10s}")
    for name in CANDIDATES:
        m = np.asarray(medians[name])  # subjects x labels
        spread = m.std(axis=0).mean() / max(m.mean(axis=0).std(), 1e-12)
        print(f"{name:44s} {spread:13.3f} {change[name]:17.2g} "
              f"{100 * np.mean(clipped[name]):9.1f}%")


if __name__ == "__main__":
    main()
