"""Build the validated bundle of the shipped weights that the wheel carries.

``pip install pddnet`` has no torch, so it cannot export the shipped checkpoint itself; it ships
the result instead: ``src/pddnet/weights/pddnet_small.bundle.tar.gz``, the FP32/FP16/INT8 graphs
(with the ``probs``/``entropy`` outputs refinement and the report use) and the validation evidence
that let them in, exactly as ``pddnet demo`` builds them (synthetic data of a seed of its own,
export, calibration, validation against the PyTorch reference, ``pddnet package``). Run it
whenever the shipped checkpoint changes; ``tests/deploy/test_shipped_bundle.py`` fails while the
bundle is stale (its FP32 graph names the checkpoint's SHA-256).

    python scripts/build_shipped_bundle.py [--pairs 12] [--threads 2]

Needs the dev install (torch). Takes a few minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from pddnet._files import atomic_write
from pddnet.deploy.demo import STEPS, DemoOptions, DemoState
from pddnet.weights import SHIPPED_BUNDLES, shipped_checkpoint

#: the data seed of the bundle's validation evidence (the demo's own is 0; tests use others)
SEED = 7


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--name", default="small", choices=sorted(SHIPPED_BUNDLES))
    ap.add_argument("--pairs", type=int, default=12, help="validation pairs (test split)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    dest = Path(__file__).resolve().parents[1] / "src" / "pddnet" / "weights" / \
        SHIPPED_BUNDLES[args.name]
    with tempfile.TemporaryDirectory(prefix="pddnet-shipped-") as tmp:
        opts = DemoOptions(out=Path(tmp), subjects=12, seed=SEED, max_pairs=args.pairs,
                           checkpoint=shipped_checkpoint(args.name), threads=args.threads,
                           repeats=3, figure_pairs=2, bundle_name=f"pddnet-{args.name}")
        state = DemoState(opts=opts)
        for title, step in STEPS:
            if step.__name__ == "_step_register":
                break
            print(f"== {title}", flush=True)
            print("   " + step(state), flush=True)
        tar = state.paths["tar"]
        with atomic_write(dest) as tmp_dest:
            shutil.copyfile(tar, tmp_dest)
    print(f"wrote {dest} ({dest.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
