"""What the input checks cost: `pddnet.data.io.load_nifti` (gzip CRC/length streamed first, the
header's voxel budget, validation) against nibabel reading the same file, median of N runs.

    .venv/bin/python scripts/bench_nifti_load.py [--shape 512 512 100] [--repeats 5]

Writes a CT-like int16 volume (smooth structures plus noise, so it compresses like a scan) to a
temporary .nii.gz, then times, alternating: nibabel alone (`np.asarray(img.dataobj)`), the
gzip check alone, and `load_nifti`. Prints medians and the ratio load_nifti / nibabel.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", nargs=3, type=int, default=(512, 512, 100))
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    from pddnet.data import io as dio

    rng = np.random.default_rng(0)
    vol = ndimage.gaussian_filter(rng.standard_normal(args.shape).astype(np.float32), 4) * 3000
    vol = (vol + rng.normal(0, 20, args.shape)).clip(-1024, 3071).astype(np.int16)
    with tempfile.TemporaryDirectory() as td:
        path = Path(td) / "ct.nii.gz"
        nib.save(nib.Nifti1Image(vol, np.diag([0.8, 0.8, 2.5, 1.0])), path)
        size = path.stat().st_size
        times: dict[str, list[float]] = {"nibabel": [], "gzip check": [], "load_nifti": []}
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            np.asarray(nib.load(path).dataobj)
            times["nibabel"].append(time.perf_counter() - t0)
            if hasattr(dio, "_check_gzip"):  # (absent before the input checks existed)
                t0 = time.perf_counter()
                dio._check_gzip(path, None)  # the streaming check alone, no size limit
                times["gzip check"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            dio.load_nifti(path)
            times["load_nifti"].append(time.perf_counter() - t0)
    print(f"{'x'.join(map(str, args.shape))} int16, {size / 1e6:.1f} MB .nii.gz, "
          f"{vol.nbytes / 1e6:.1f} MB raw, {args.repeats} runs each")
    for name, ts in times.items():
        if not ts:
            continue
        print(f"  {name:11s} median {1e3 * statistics.median(ts):7.0f} ms  "
              f"min {1e3 * min(ts):7.0f} ms")
    ratio = statistics.median(times["load_nifti"]) / statistics.median(times["nibabel"])
    print(f"  load_nifti / nibabel: {ratio:.2f}x")


if __name__ == "__main__":
    main()
