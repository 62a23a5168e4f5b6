#!/usr/bin/env python
"""CPU speed of INT8 against FP32 in ONNX Runtime at one geometry, in one run (docs/benchmarks.md).

    python scripts/bench_precision.py --preset paper --data /work/train-data --out bench_prec.json \
        [--threads 2] [--repeats 3] [--variant default=conv1,conv2,conv3 --variant ...] \
        [--checkpoint CKPT] [--calib-pairs 2]

For each variant (a named list of blocks in INT8, ``pddnet.calibration.int8``; calibrated once on
``--calib-pairs`` training pairs of ``--data``, pre-processed onto the model grid as the runtime
does) and for FP32:

* the feature network (``runtime.split``: one scan) and the whole model execution
  (``Registrar.run_model``: both scans' features and the head), ``--repeats`` timed runs after
  one warm-up, **interleaved** across variants so that load changes affect all alike; medians;
* ONNX Runtime's per-block kernel times (``pddnet.calibration.blocks.profile_blocks``; one
  warm-up and two profiled runs), i.e. what INT8 buys (or costs) in each block;
* max |disp - disp_FP32| on the timed pair (voxels of the model grid).

The network is the preset randomly initialised (seed 0) unless ``--checkpoint``: timing does not
depend on the weights, and the calibration ranges only set the scales.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="paper", choices=["paper", "small", "tiny"])
    ap.add_argument("--shape", nargs=3, type=int)
    ap.add_argument("--checkpoint", dest="model", help="checkpoint (default: the preset, random, seed 0)")
    ap.add_argument("--data", required=True, help="Learn2Reg dataset (calibration and timing)")
    ap.add_argument("--out", required=True, help="JSON result")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--calib-pairs", type=int, default=2)
    ap.add_argument("--variant", action="append", default=[],
                    help="NAME=block,block,... (default: default=conv1,conv2,conv3)")
    ap.add_argument("--no-profile", action="store_true")
    args = ap.parse_args(argv)
    logging.getLogger().setLevel(logging.ERROR)

    import onnx

    from pddnet.backends import create_backend
    from pddnet.calibration import int8 as Q
    from pddnet.calibration.blocks import profile_blocks
    from pddnet.calibration.data import PairReader
    from pddnet.calibration.search import load_average, timestamp
    from pddnet.export.onnx_export import check_model, export_model
    from pddnet.graph.model import load_model
    from pddnet.graph.split import split_model
    from pddnet.model.network import PDDNet
    from pddnet.runtime.session import Registrar
    from pddnet.spec.config import PRESET_IMAGE_SHAPES, preset
    from pddnet.spec.contract import FEATURES_INPUT

    variants = {}
    for v in args.variant or ["default=conv1,conv2,conv3"]:
        name, _, blocks = v.partition("=")
        variants[name] = [b for b in blocks.split(",") if b]
    shape = tuple(args.shape or PRESET_IMAGE_SHAPES[args.preset])
    result = {"schema": "pddnet.bench_precision/1", "created": timestamp(),
              "load_average_start": load_average(), "preset": args.preset,
              "image_shape": list(shape), "threads": args.threads, "repeats": args.repeats,
              "variants": variants, "machine": {"cpu": _cpu(), "cores": os.cpu_count()}}
    say = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    with tempfile.TemporaryDirectory(prefix="pddnet-bench-prec-") as tmp:
        tmp = Path(tmp)
        if args.model:
            from pddnet.model.checkpoint import load_model as load_ckpt

            net, _ = load_ckpt(args.model)
            net.eval()
        else:
            net = PDDNet(preset(args.preset), seed=0).eval()
        say(f"exporting {args.preset} at {shape}")
        fp32 = check_model(export_model(net, shape))
        paths = {"fp32": tmp / "fp32.onnx"}
        onnx.save(fp32, str(paths["fp32"]))
        info = load_model(paths["fp32"]).info
        reader = PairReader(args.data, info, pairs=args.calib_pairs, progress=False)
        union = sorted({b for bl in variants.values() for b in bl})
        work, names = Q.prepare(fp32, union)
        say(f"calibrating {len(names)} nodes of {union} on {len(reader)} pair(s)")
        t0 = time.perf_counter()
        ranges = Q.calibrate_tensors(work, reader, Q.node_tensors(work, names))
        result["calibration_s"] = round(time.perf_counter() - t0, 1)
        for name, blocks in variants.items():
            w, n = Q.prepare(fp32, blocks)
            q = Q.quantise(w, n, ranges)
            Q.check_qdq(q)
            paths[name] = tmp / f"{name}.onnx"
            onnx.save(q, str(paths[name]))
            say(f"{name}: {len(n)} quantised nodes")
        feeds = reader.feeds(0)
        feats = {}
        for name, p in paths.items():
            parts = split_model(load_model(p).proto)
            be = create_backend("onnxruntime", parts.features, label="features",
                                threads=args.threads)
            be.activate()
            feats[name] = be
        regs = {name: Registrar(p, threads=args.threads) for name, p in paths.items()}
        t_feat = {k: [] for k in paths}
        t_full = {k: [] for k in paths}
        outs = {}
        say(f"timing: 1 warm-up + {args.repeats} runs each, interleaved")
        for i in range(args.repeats + 1):
            for name in paths:
                feats[name].run({FEATURES_INPUT: feeds["fixed"]})
                if i:
                    t_feat[name].append(feats[name].last_run_ms)
                o, ms = regs[name].run_model(feeds["fixed"], feeds["moving"])
                if i:
                    t_full[name].append(ms)
                outs[name] = o["disp"]
                say(f"  run {i} {name}: features {feats[name].last_run_ms:.0f} ms, "
                    f"model {ms:.0f} ms")
        for b in feats.values():
            b.deactivate()
        for r in regs.values():
            r.close()
        timing = {}
        for name in paths:
            timing[name] = {
                "features_ms": statistics.median(t_feat[name]),
                "model_ms": statistics.median(t_full[name]),
                "features_samples_ms": [round(x, 1) for x in t_feat[name]],
                "model_samples_ms": [round(x, 1) for x in t_full[name]],
                "max_abs_disp_diff_vox": float(np.abs(outs[name] - outs["fp32"]).max()),
            }
        for name in paths:
            timing[name]["features_speedup"] = timing["fp32"]["features_ms"] / \
                timing[name]["features_ms"]
            timing[name]["model_speedup"] = timing["fp32"]["model_ms"] / timing[name]["model_ms"]
        result["timing"] = timing
        if not args.no_profile:
            result["profile"] = {}
            for name, p in paths.items():
                say(f"profiling {name}")
                result["profile"][name] = profile_blocks(onnx.load(str(p)), feeds,
                                                         threads=args.threads, runs=2)
    result["load_average_end"] = load_average()
    result["finished"] = timestamp()
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    for name, t in result["timing"].items():
        print(f"{name:<12} features {t['features_ms']:8.0f} ms ({t['features_speedup']:.2f}x)  "
              f"model {t['model_ms']:8.0f} ms ({t['model_speedup']:.2f}x)  "
              f"max|ddisp| {t['max_abs_disp_diff_vox']:.3g} vox")
    print(f"load average {result['load_average_start']} -> {result['load_average_end']}")
    return 0


def _cpu() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "?"


if __name__ == "__main__":
    sys.exit(main())
