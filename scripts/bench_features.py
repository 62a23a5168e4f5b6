"""Speed of one image's features: ONNX Runtime alone vs the OBELISK sampling in C.

    PYTHONPATH=src .venv/bin/python scripts/bench_features.py [--preset paper] [--threads 2]
        [--repeats 7]

Exports the preset (random initialisation, seed 0) at its image shape, splits off the features
part, and runs it on one random image as ONNX Runtime alone
(:class:`pddnet.backends.onnxrt.OnnxRuntimeBackend`) and as
:class:`pddnet.backends.native.features.NativeFeaturesBackend` (ONNX Runtime before and after
the sampling, the two ``DeformableSample3D`` nodes and their difference in C), one warm-up
each, then ``--repeats`` runs of each, interleaved; prints the medians, the C backend's three
parts, ONNX Runtime on the sampling alone (the three nodes as their own model, fed the same
map), the largest difference of the two outputs, the UTC time and the load average.
Timings are wall-clock; on a shared machine compare numbers from one run only.
"""

from __future__ import annotations

import argparse
import os
import statistics
from datetime import datetime, timezone

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="paper")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()

    from pddnet.backends.native.features import NativeFeaturesBackend
    from pddnet.backends.onnxrt import OnnxRuntimeBackend
    from pddnet.export.onnx_export import export_model
    from pddnet.graph.split import _make_part, _value_types, split_model
    from pddnet.model.network import PDDNet
    from pddnet.spec.config import PRESET_IMAGE_SHAPES, PRESETS

    shape = PRESET_IMAGE_SHAPES[args.preset]
    net = PDDNet(PRESETS[args.preset], seed=0).eval()
    features = split_model(export_model(net, shape)).features
    del net
    ort_b = OnnxRuntimeBackend(features, threads=args.threads).activate()
    nat_b = NativeFeaturesBackend(features, threads=args.threads).activate()
    plan = nat_b.plan
    types = _value_types(features)
    nodes = [n for n in features.graph.node if n.name in plan.nodes]
    sampling = _make_part(features, nodes, "sampling", inputs=[(plan.x_name, plan.x_name)],
                          outputs=[(plan.y_name, plan.y_name)], types=types)
    smp_b = OnnxRuntimeBackend(sampling, threads=args.threads).activate()
    img = {"image": np.random.default_rng(0).uniform(0, 1, (1, 1, *shape)).astype(np.float32)}
    x = {plan.x_name: nat_b._pre.run(img)[plan.x_name]}
    smp_b.run(x)
    start = datetime.now(timezone.utc), os.getloadavg()
    ort_b.run(img)
    nat_b.run(img)
    times: dict[str, list[float]] = {"onnxruntime": [], "with C sampling": [], "pre": [],
                                     "sampling": [], "post": [], "ORT sampling": []}
    for _ in range(args.repeats):
        a = ort_b.run(img)["features"]
        times["onnxruntime"].append(ort_b.last_run_ms)
        b = nat_b.run(img)["features"]
        times["with C sampling"].append(nat_b.last_run_ms)
        for k, v in nat_b.last_parts_ms.items():
            times[k].append(v)
        smp_b.run(x)
        times["ORT sampling"].append(smp_b.last_run_ms)
    end = datetime.now(timezone.utc), os.getloadavg()
    print(f"{args.preset} {shape}, {args.threads} thread(s), {args.repeats} runs each; "
          f"{start[0]:%Y-%m-%d %H:%M:%S}-{end[0]:%H:%M:%S} UTC, load average "
          f"{start[1][0]:.2f} -> {end[1][0]:.2f}")
    for k, v in times.items():
        print(f"  {k:16s} median {statistics.median(v):8.1f} ms  min {min(v):8.1f}  "
              f"[{', '.join(f'{x:.0f}' for x in v)}]")
    print(f"  max |features difference| {float(np.abs(a - b).max()):.2e} "
          f"(max |features| {float(np.abs(a).max()):.3g})")


if __name__ == "__main__":
    main()
