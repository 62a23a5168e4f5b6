"""``pddnet evaluate``: the PyTorch reference on a dataset split, per pair and on average.

Per pair: initial Dice (no registration), registered Dice, HD95, SDlogJ, folding % and the
forward time, using the Learn2Reg definitions of :mod:`pddnet.validation.metrics`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from pddnet.data.io import atomic_write
from pddnet.errors import PddnetError
from pddnet.validation import metrics


def _summary(rows: list[dict], keys) -> dict:
    out = {}
    for k in keys:
        vals = np.array([r[k] for r in rows if r.get(k) is not None], dtype=np.float64)
        out[k] = float(np.nanmean(vals)) if len(vals) else None
    return out


def evaluate_checkpoint(checkpoint, data_dir, *, split: str = "test", max_pairs: int | None = None,
                        threads: int | None = None, progress: bool = True) -> dict:
    """Register every pair of ``split`` with the checkpoint's network and measure it."""
    import torch
    from tqdm import tqdm

    from pddnet.data.learn2reg import Learn2RegDataset
    from pddnet.model import ops
    from pddnet.model.checkpoint import load_model
    from pddnet.model.network import normalise_intensity

    if threads:
        torch.set_num_threads(threads)
    model, ckpt = load_model(checkpoint)
    dataset = Learn2RegDataset(data_dir)
    pairs = dataset.pairs(split)[:max_pairs] if max_pairs else dataset.pairs(split)
    if not pairs:
        raise PddnetError(f"{data_dir} has no {split} pairs to evaluate")
    rows = []
    for pair in tqdm(pairs, desc=f"evaluate {split}", disable=not progress, unit="pair"):
        fixed, moving, fixed_lab, moving_lab = dataset.load_pair(pair)
        if fixed_lab is None or moving_lab is None:
            raise PddnetError(f"pair {pair} has no label maps; evaluation needs labels for both")
        if fixed.shape != moving.shape:
            raise PddnetError(f"pair {pair}: fixed {fixed.shape} and moving {moving.shape} differ; "
                              f"use 'pddnet validate' on an exported model, whose runtime resamples")
        f = torch.from_numpy(normalise_intensity(fixed.array, model.config.intensity))[None, None]
        m = torch.from_numpy(normalise_intensity(moving.array, model.config.intensity))[None, None]
        t0 = time.perf_counter()
        with torch.no_grad():
            reg = model(f, m)
            disp = reg.dense(fixed.shape)
        elapsed = time.perf_counter() - t0
        warped = ops.warp(torch.from_numpy(moving_lab.array.astype(np.float32))[None, None], disp,
                          mode="nearest")[0, 0].round().numpy().astype(np.uint8)
        pm = metrics.pair_metrics(fixed_lab.array, moving_lab.array, warped, disp.numpy())
        rows.append({
            "fixed": pair.fixed.name, "moving": pair.moving.name,
            "initial_dice": metrics.mean_dice(fixed_lab.array, moving_lab.array, moving_lab.array),
            "dice": pm["dice_mean"], "dice_per_label": pm["dice_per_label"],
            "hd95": pm["hd95_mean"], "sdlogj": pm["sdlogj"],
            "folding_percent": pm["folding_percent"], "time_s": elapsed,
        })
    keys = ("initial_dice", "dice", "hd95", "sdlogj", "folding_percent", "time_s")
    return {
        "model": str(checkpoint), "data": str(data_dir), "split": split,
        "config": ckpt["config"], "pairs": rows, "mean": _summary(rows, keys),
        "dsc30": metrics.dsc30([r["dice"] for r in rows]),
        "label_names": {int(k): v for k, v in dataset.label_names.items()},
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
    return "\n".join(lines)


def write_json(result: dict, path, *, overwrite: bool = True) -> Path:
    with atomic_write(path, overwrite=overwrite) as tmp:
        Path(tmp).write_text(json.dumps(metrics.jsonable(result), indent=2) + "\n")
    return Path(path)
