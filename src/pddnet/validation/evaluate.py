"""``pddnet evaluate``: the PyTorch reference on a dataset split, per pair and on average.

Per pair: initial Dice (no registration), registered Dice, HD95, SDlogJ, folding % and the
forward time, using the Learn2Reg definitions of :mod:`pddnet.metrics`: the moving labels are
warped as the official evaluation warps them (:func:`pddnet.metrics.warp_labels`: nearest
neighbour, 0 outside the grid), so the numbers are the leaderboard's for the same fields.

With ``modes`` (``pddnet evaluate --modes ff,inst,2stage,2stage+inst``) every pair is registered
in each mode of :data:`pddnet.spec.refine.MODES` -- feed-forward, instance optimisation,
two stages, two refined stages (:func:`pddnet.model.refine.register_stages`), and the paper's
probability fit as ``inst-probs`` / ``2stage+inst-probs`` -- and the result holds them side by
side under ``"modes"`` with the time of every stage; the top-level ``pairs``/``mean``/``dsc30``
are those of the first mode.
"""

from __future__ import annotations

import time

import numpy as np

from pddnet import metrics
from pddnet.errors import PddnetError


def _summary(rows: list[dict], keys) -> dict:
    out = {}
    for k in keys:
        vals = np.array([r[k] for r in rows if r.get(k) is not None], dtype=np.float64)
        out[k] = float(np.nanmean(vals)) if len(vals) else None
    return out


def evaluate_checkpoint(checkpoint, data_dir, *, split: str = "test", max_pairs: int | None = None,
                        threads: int | None = None, progress: bool = True, modes=("ff",),
                        refine=None, stage2: dict | None = None) -> dict:
    """Register every pair of ``split`` with the checkpoint's network and measure it.

    Args:
        modes: names from :data:`pddnet.spec.refine.MODES` (or ``"ff,inst"``).
        refine: :class:`~pddnet.spec.refine.RefineOptions` or a number of steps for the
            refined modes (default: ``RefineOptions()``, the ``features`` method with its
            defaults; the ``-probs`` modes switch to the ``probs`` method, keeping the steps:
            :func:`pddnet.spec.refine.mode_options`).
        stage2: config overrides of the stage-two network (default:
            :func:`pddnet.spec.refine.stage2_overrides`).
    """
    import torch
    from tqdm import tqdm

    from pddnet.data.learn2reg import Learn2RegDataset
    from pddnet.model.checkpoint import load_model
    from pddnet.model.network import normalise_intensity
    from pddnet.model.refine import register_stages, stage2_network
    from pddnet.spec.refine import MODES, RefineOptions, mode_options, parse_modes

    mode_list = parse_modes(modes)
    ropts = RefineOptions.coerce(refine) or RefineOptions()

    if threads:
        torch.set_num_threads(threads)
    model, ckpt = load_model(checkpoint)
    dataset = Learn2RegDataset(data_dir)
    pairs = dataset.pairs(split)[:max_pairs] if max_pairs else dataset.pairs(split)
    if not pairs:
        raise PddnetError(f"{data_dir} has no {split} pairs to evaluate")
    net2 = stage2_network(model, stage2).eval() if any(MODES[m][0] == 2 for m in mode_list) \
        else None
    rows: dict[str, list] = {m: [] for m in mode_list}
    for pair in tqdm(pairs, desc=f"evaluate {split}", disable=not progress, unit="pair"):
        fixed, moving, fixed_lab, moving_lab = dataset.load_pair(pair)
        if fixed_lab is None or moving_lab is None:
            raise PddnetError(f"pair {pair} has no label maps; evaluation needs labels for both")
        if fixed.shape != moving.shape:
            raise PddnetError(f"pair {pair}: fixed {fixed.shape} and moving {moving.shape} differ; "
                              f"use 'pddnet validate' on an exported model, whose runtime resamples")
        f = torch.from_numpy(normalise_intensity(fixed.array, model.config.intensity))[None, None]
        m = torch.from_numpy(normalise_intensity(moving.array, model.config.intensity))[None, None]
        initial = metrics.mean_dice(fixed_lab.array, moving_lab.array, moving_lab.array)
        for mode in mode_list:
            n_stages = MODES[mode][0]
            t0 = time.perf_counter()
            res = register_stages(model, f, m, refine=mode_options(mode, ropts),
                                  stages=n_stages, stage2=net2)
            disp = res.disp
            elapsed = time.perf_counter() - t0
            # labels warped as the official evaluation warps them (nearest, 0 outside the grid)
            field = disp.detach().cpu().numpy()
            warped = metrics.warp_labels(moving_lab.array, field)
            pm = metrics.pair_metrics(fixed_lab.array, moving_lab.array, warped, field)
            rows[mode].append({
                "fixed": pair.fixed.name, "moving": pair.moving.name, "initial_dice": initial,
                "dice": pm["dice_mean"], "dice_per_label": pm["dice_per_label"],
                "hd95": pm["hd95_mean"], "sdlogj": pm["sdlogj"],
                "folding_percent": pm["folding_percent"], "num_foldings": pm["num_foldings"],
                "time_s": elapsed,
                "times_ms": res.times_ms,
                "refine_energy": [s.refined.energy for s in res.stages if s.refined],
            })
    keys = ("initial_dice", "dice", "hd95", "sdlogj", "folding_percent", "time_s")
    per_mode = {}
    for mode in mode_list:
        mean = _summary(rows[mode], keys)
        stage_keys = sorted({k for r in rows[mode] for k in r["times_ms"]})
        mean["times_ms"] = {k: float(np.mean([r["times_ms"].get(k, np.nan) for r in rows[mode]]))
                            for k in stage_keys}
        per_mode[mode] = {"pairs": rows[mode], "mean": mean,
                          "dsc30": metrics.dsc30([r["dice"] for r in rows[mode]])}
    first = per_mode[mode_list[0]]
    return {
        "model": str(checkpoint), "data": str(data_dir), "split": split,
        "config": ckpt["config"], "pairs": first["pairs"], "mean": first["mean"],
        "dsc30": first["dsc30"],
        "label_names": {int(k): v for k, v in dataset.label_names.items()},
        "modes": per_mode,
        "mode_settings": {
            "refine": ropts.as_dict() if any(MODES[m][1] for m in mode_list) else None,
            "refine_per_mode": {m: mode_options(m, ropts).as_dict() for m in mode_list
                                if MODES[m][1]},
            "stage2_config": net2.config.as_dict() if net2 is not None else None,
        },
    }


def format_table(result: dict) -> str:
    """A fixed-width per-pair table with the mean row, Dice in percent."""
    head = f"{'pair':<28} {'init Dice':>9} {'Dice':>7} {'HD95':>7} {'SDlogJ':>7} {'fold %':>7} {'time s':>7}"
    lines = [head, "-" * len(head)]

    def row(name, r):
        def f(v, scale=1.0, fmt="{:7.2f}"):
            return fmt.format(v * scale) if v is not None and np.isfinite(v) else f"{'-':>7}"
        return (f"{name:<28} {f(r['initial_dice'], 100, '{:9.2f}')} {f(r['dice'], 100)} "
                f"{f(r['hd95'])} {f(r['sdlogj'], 1, '{:7.3f}')} {f(r['folding_percent'], 1, '{:7.3f}')} "
                f"{f(r['time_s'])}")

    for r in result["pairs"]:
        lines.append(row(f"{r['fixed']} <- {r['moving']}"[:28], r))
    lines.append("-" * len(head))
    lines.append(row("mean", result["mean"]))
    if result.get("dsc30") is not None:
        lines.append(f"DSC30 {100 * result['dsc30']:.2f}")
    if len(result.get("modes") or {}) > 1:
        lines += ["", format_modes(result["modes"])]
    return "\n".join(lines)


#: stage timings in the order they run (``pddnet.model.refine.register_stages``)
STAGE_ORDER = ("features", "head", "refine", "warp", "features2", "head2", "refine2", "compose")


def format_modes(modes: dict) -> str:
    """Registration modes side by side: mean Dice (%), HD95, SDlogJ, folding %, DSC30 and the
    mean milliseconds of every stage."""
    stages = [s for s in STAGE_ORDER if any(s in m["mean"].get("times_ms", {})
                                            for m in modes.values())]
    head = (f"{'mode':<12} {'Dice':>6} {'HD95':>6} {'SDlogJ':>7} {'fold %':>7} {'DSC30':>6} "
            + " ".join(f"{s:>9}" for s in stages) + f" {'total ms':>9}")
    lines = [head, "-" * len(head)]
    for name, m in modes.items():
        mean, t = m["mean"], m["mean"].get("times_ms", {})

        def f(v, scale=1.0, fmt="{:6.2f}"):
            return fmt.format(v * scale) if v is not None and np.isfinite(v) else f"{'-':>6}"
        cells = " ".join(f"{t[s]:9.0f}" if s in t and np.isfinite(t[s]) else f"{'-':>9}"
                         for s in stages)
        total = sum(v for v in t.values() if np.isfinite(v))
        lines.append(f"{name:<12} {f(mean['dice'], 100)} {f(mean['hd95'])} "
                     f"{f(mean['sdlogj'], 1, '{:7.3f}')} {f(mean['folding_percent'], 1, '{:7.3f}')} "
                     f"{f(m.get('dsc30'), 100)} {cells} {total:9.0f}")
    return "\n".join(lines)


