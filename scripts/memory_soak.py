"""Memory growth of a long-running registration session (the deployment issue's benchmark).

    .venv/bin/python scripts/memory_soak.py --model BUNDLE_OR_ONNX --data DATA [--pairs 500]
        [--warmup 20] [--threads 1] [--sample-every 10] [--save] [--json out.json]

One :class:`pddnet.runtime.session.Registrar` (a bundle is verified once, like a service at
start-up) registers ``--pairs`` pairs, cycling through every ordered (fixed, moving) pair of
the dataset (all splits), each loaded from its NIfTI files with both label maps, so the whole
pipeline runs per pair: reading, pre-processing, features, head, post-processing, warping,
Dice/HD95/SDlogJ; with ``--save`` each result is also written (overwriting one folder). No
``gc.collect()`` is forced: this is what a service would see.

Every ``--sample-every`` pairs two numbers are recorded: the resident set size (``VmRSS``) at
that instant, and the window peak -- the high-water mark ``VmHWM`` since the previous sample
(reset through ``/proc/self/clear_refs``). The instant RSS swings by tens of MB from pair to
pair (large arrays come and go: the allocator returns them to the system or keeps them); the
window peak is what every pair reaches and is stable, and a leak raises both. For each: the
baseline is the median of the first tenth of the samples after ``--warmup`` pairs (at least
3), growth is ``(value - baseline) / baseline``; reported are the median growth of the last
tenth, the largest single sample and the least-squares slope (MB per 100 pairs). PASS when the
last tenth's growth is below ``--limit`` (5%) for both.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"{key} not in /proc/self/status")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="bundle folder/.tar.gz or .onnx")
    ap.add_argument("--data", required=True, help="Learn2Reg-layout dataset with labels")
    ap.add_argument("--pairs", type=int, default=500)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--sample-every", type=int, default=10)
    ap.add_argument("--limit", type=float, default=5.0, help="growth limit, percent")
    ap.add_argument("--save", action="store_true", help="also write every result")
    ap.add_argument("--json", help="write the samples and the verdict here")
    a = ap.parse_args(argv)

    from pddnet.data.learn2reg import Learn2RegDataset
    from pddnet.runtime.session import Registrar
    from pddnet.validation.machine import machine_info, reset_peak_rss

    ds = Learn2RegDataset(a.data)
    pairs = [p for split in ("train", "val", "test") for p in _pairs(ds, split)]
    if not pairs:
        print(f"{a.data}: no pairs", file=sys.stderr)
        return 2
    out = Path(tempfile.mkdtemp(prefix="pddnet-soak-")) if a.save else None
    samples: list[tuple[int, float, float, float]] = []  # (pairs done, RSS, window peak, s)
    t0 = time.perf_counter()
    with Registrar(a.model, threads=a.threads) as reg:
        what = (f"{reg.selection.backend} {reg.selection.precision} from the bundle"
                if reg.selection is not None else "onnxruntime")
        print(f"{a.model}: {what}; {len(pairs)} distinct pairs, cycling to {a.pairs}; "
              f"RSS at start {_status_mb('VmRSS'):.1f} MB", flush=True)
        reset_peak_rss()
        dice = []
        for n, pair in enumerate(itertools.islice(itertools.cycle(pairs), a.pairs), 1):
            res = reg.register(pair.fixed.image, pair.moving.image, pair.moving.label,
                               pair.fixed.label)
            dice.append(res.metrics.get("dice_mean"))
            if out is not None:
                res.save(out, overwrite=True)
            del res
            if n % a.sample_every == 0 or n == a.pairs:
                rss, peak = _status_mb("VmRSS"), _status_mb("VmHWM")
                reset_peak_rss()  # the next window's peak starts from here
                samples.append((n, rss, peak, time.perf_counter() - t0))
                print(f"  {n:4d} pairs  RSS {rss:7.1f} MB  window peak {peak:7.1f} MB  "
                      f"{time.perf_counter() - t0:7.0f} s", flush=True)

    def growth_of(col: int) -> tuple[float, float, int, float, float]:
        after = [(s_[0], s_[col]) for s_ in samples if s_[0] > a.warmup]
        k = max(3, len(after) // 10)   # first and last tenth of the samples after warm-up
        base = float(np.median([v for _, v in after[:k]]))
        later = [(n, 100.0 * (v - base) / base) for n, v in after[k:]] or [(after[-1][0], 0.0)]
        worst_n, worst = max(later, key=lambda g: g[1])
        end = 100.0 * (float(np.median([v for _, v in after[-k:]])) - base) / base
        xs = np.array([n for n, _ in after], np.float64)
        slope = float(np.polyfit(xs, [v for _, v in after], 1)[0] * 100) if len(xs) > 1 else 0.0
        return base, worst, worst_n, end, slope

    pb, pw, pwn, pe, ps = growth_of(2)
    rb, rw, rwn, re_, rs = growth_of(1)
    verdict = {
        "model": a.model, "pairs": a.pairs, "distinct_pairs": len(pairs), "warmup": a.warmup,
        "threads": a.threads, "save": a.save, "sample_every": a.sample_every,
        "window_peak": {"baseline_mb": pb, "max_growth_percent": pw, "max_growth_at": pwn,
                        "last_tenth_growth_percent": pe, "slope_mb_per_100_pairs": ps},
        "rss": {"baseline_mb": rb, "max_growth_percent": rw, "max_growth_at": rwn,
                "last_tenth_growth_percent": re_, "slope_mb_per_100_pairs": rs},
        "seconds": samples[-1][3], "seconds_per_pair": samples[-1][3] / a.pairs,
        "mean_dice": float(np.nanmean([d for d in dice if d is not None])),
        "limit_percent": a.limit, "passed": pe < a.limit and re_ < a.limit,
        "machine": machine_info(a.threads), "samples": samples,
    }
    for name, (b, w, wn, e, sl) in (("window peak", (pb, pw, pwn, pe, ps)),
                                     ("RSS", (rb, rw, rwn, re_, rs))):
        print(f"{name}: baseline {b:.1f} MB (median of the first tenth after {a.warmup} "
              f"warm-up pairs); last tenth {e:+.2f}%; largest single sample {w:+.2f}% (pair "
              f"{wn}); slope {sl:+.2f} MB per 100 pairs")
    print(f"{verdict['seconds_per_pair']:.2f} s/pair, mean Dice {verdict['mean_dice']:.3f} -> "
          f"{'PASS' if verdict['passed'] else 'FAIL'} (growth of the last tenth below "
          f"{a.limit:g}% for both)")
    if a.json:
        from pddnet._files import atomic_write

        with atomic_write(a.json) as tmp:
            tmp.write_text(json.dumps(verdict, indent=1) + "\n")
    return 0 if verdict["passed"] else 1


def _pairs(ds, split):
    try:
        return ds.pairs(split)
    except Exception:
        return []


if __name__ == "__main__":
    sys.exit(main())
