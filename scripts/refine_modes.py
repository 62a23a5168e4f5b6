"""Feed-forward, refined and two-stage registration with the torch-free runtime, side by side.

    .venv/bin/python scripts/refine_modes.py --model model.onnx --data DATA [--split test]
        [--modes ff,inst,inst-probs] [--checkpoint CKPT] [--threads 2] [--max-pairs N]
        [--steps N] [--json out.json]

``model.onnx`` must be exported with ``--probs`` (``--stage2`` for the two-stage modes). Per
mode (:data:`pddnet.spec.refine.MODES`; ``inst`` refines on the features, ``inst-probs`` with
the paper's probability fit) and pair: mean Dice, HD95, SDlogJ, folding (Learn2Reg
definitions, on the fixed scan's grid, as ``pddnet register`` computes them) and the
milliseconds of every stage (``Registrar`` timings: ``features`` counts both scans, the fixed
scan's features are not reused across pairs here). The latency ratio the issue bounds is
``refine / (features + head)`` of each refined one-stage mode, per pair, in the same run.

With ``--checkpoint`` the refined modes are also checked against the PyTorch reference
end to end: :func:`~pddnet.model.refine.register_stages` on the same pre-processed arrays, where
the ONNX Runtime and PyTorch networks already differ by ~1e-6 (docs/refinement.md); model-grid
voxels, max and 99th percentile of ``|du|``. The same-input parity is a unit test.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

STAGES = ("features", "head", "refine", "stage2")


def main() -> None:
    from pddnet.data.learn2reg import Learn2RegDataset
    from pddnet.runtime.session import Registrar
    from pddnet.spec.refine import MODES as SPEC
    from pddnet.spec.refine import RefineOptions, mode_options, parse_modes

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--split", default="test")
    ap.add_argument("--checkpoint")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-pairs", type=int)
    ap.add_argument("--modes", default="ff,inst,inst-probs")
    ap.add_argument("--steps", type=int, help="Adam steps (default: each method's)")
    ap.add_argument("--json")
    a = ap.parse_args()

    MODES = parse_modes(a.modes)
    ds = Learn2RegDataset(a.data)
    pairs = ds.pairs(a.split)[:a.max_pairs] if a.max_pairs else ds.pairs(a.split)
    opts = RefineOptions(steps=a.steps)
    regs = {m: Registrar(a.model, threads=a.threads, stages=SPEC[m][0],
                         refine=mode_options(m, opts)) for m in MODES}
    ref = None
    if a.checkpoint:
        import torch

        from pddnet.model.checkpoint import load_model

        torch.set_num_threads(a.threads)
        ref, _ = load_model(a.checkpoint)
    rows: dict[str, list] = {m: [] for m in MODES}
    parity: dict[str, list] = {m: [] for m in MODES if m != "ff"}
    t_start = time.perf_counter()
    for p in pairs:
        f, m, fl, ml = ds.load_pair(p)
        for mode in MODES:
            res = regs[mode].register(f, m, ml, fl)
            rows[mode].append({"pair": str(p), **{k: res.metrics.get(k) for k in (
                "dice_mean", "hd95_mean", "sdlogj", "folding_percent", "dice_mean_before")},
                "ms": {k: res.timings_ms.get(k) for k in STAGES}})
            if ref is not None and mode != "ff":
                parity[mode].append(_parity(ref, regs[mode], res, f, m, mode_options(mode, opts),
                                            SPEC[mode][0]))
        print(f"{p}: " + "  ".join(f"{mode} {100 * rows[mode][-1]['dice_mean']:.2f}"
                                   for mode in MODES), flush=True)
        if a.json:  # the pairs so far, so that an interrupted run leaves its rows
            with open(a.json + ".partial", "w") as fh:
                json.dump({"pairs": rows}, fh, indent=1, default=float)
    for r in regs.values():
        r.close()

    print(f"\n{len(pairs)} {a.split} pairs, {a.threads} threads, "
          f"{time.perf_counter() - t_start:.0f} s")
    head = (f"{'mode':<18} {'Dice':>6} {'HD95':>6} {'SDlogJ':>7} {'fold %':>7} "
            + " ".join(f"{s:>9}" for s in STAGES) + f" {'model ms':>9}")
    print(head + "\n" + "-" * len(head))
    summary = {}
    for mode in MODES:
        rs = rows[mode]
        mean = {k: float(np.nanmean([r[k] for r in rs])) for k in (
            "dice_mean", "hd95_mean", "sdlogj", "folding_percent", "dice_mean_before")}
        ms = {s: (float(np.median([r["ms"][s] for r in rs])) if rs[0]["ms"][s] is not None
                  else None) for s in STAGES}
        total = sum(v for v in ms.values() if v is not None)
        summary[mode] = {"mean": mean, "median_ms": ms, "model_ms": total}
        cells = " ".join(f"{ms[s]:9.0f}" if ms[s] is not None else f"{'-':>9}" for s in STAGES)
        print(f"{mode:<18} {100 * mean['dice_mean']:6.2f} {mean['hd95_mean']:6.2f} "
              f"{mean['sdlogj']:7.3f} {mean['folding_percent']:7.3f} {cells} {total:9.0f}")
    print(f"\ninitial Dice {100 * summary[MODES[0]]['mean']['dice_mean_before']:.2f}")
    if "ff" in summary:
        base = summary["ff"]["mean"]
        for mode in MODES:
            if mode == "ff":
                continue
            mean = summary[mode]["mean"]
            print(f"{mode}: Dice {100 * (mean['dice_mean'] - base['dice_mean']):+.2f} points "
                  f"over ff, SDlogJ x{mean['sdlogj'] / base['sdlogj']:.2f}")
    for mode in MODES:
        if SPEC[mode] != (1, True):
            continue
        ratios = [r["ms"]["refine"] / (r["ms"]["features"] + r["ms"]["head"])
                  for r in rows[mode]]
        summary[mode]["refine_over_network"] = float(np.median(ratios))
        print(f"{mode}: refinement / network (features + head), per pair, same run: median "
              f"{np.median(ratios):.2f}, max {np.max(ratios):.2f}")
    if ref is not None:
        print("\nruntime vs PyTorch reference, model-grid voxels (max / 99th percentile of |du|)")
        for mode, vals in parity.items():
            e2e = [v["end_to_end"] for v in vals]
            print(f"  {mode:<18} end to end max {max(x[0] for x in e2e):.3f}, "
                  f"p99 {max(x[1] for x in e2e):.4f}")
        summary["parity"] = parity
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"pairs": rows, "summary": summary}, fh, indent=1, default=float)


def _parity(net, reg, res, fixed, moving, opts, stages):
    """Max and 99th percentile of |runtime - reference| (model grid), end to end."""
    import torch

    from pddnet.model import refine as R
    from pddnet.runtime.preprocess import prepare_fixed, prepare_moving

    pf = prepare_fixed(fixed, reg.info)
    pm = prepare_moving(moving, pf, reg.info)
    e2e = R.register_stages(net, torch.from_numpy(pf.array), torch.from_numpy(pm.array),
                            refine=opts, stages=stages).disp.numpy()
    d = np.abs(res.disp_model - e2e)
    return {"end_to_end": (float(d.max()), float(np.quantile(d, 0.99)))}


if __name__ == "__main__":
    main()
