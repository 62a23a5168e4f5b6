"""The validation report: the summary table printed by ``pddnet validate`` and ``report.json``.

``report.json`` is the one source of truth (schema in ``docs/validation.md``); the printed
table and the later ``report.md``/``report.html`` are renderings of it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from pddnet._files import check_writable, write_json
from pddnet.errors import PddnetError

REPORT_FILE = "report.json"


def check_out_dir(out_dir, *, overwrite: bool) -> Path:
    """Refuse, before any work, an output that exists as a file or already holds a report."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise PddnetError(f"{out} exists and is not a folder; choose another --out")
    if (out / REPORT_FILE).exists() and not overwrite:
        raise PddnetError(f"{out / REPORT_FILE} already exists; pass --overwrite to replace it "
                          "or choose another --out")
    check_writable(out)
    return out


def write_report(report: dict[str, Any], out_dir, *, overwrite: bool = False) -> Path:
    """Write ``out_dir/report.json`` atomically (strict JSON: NaN/inf become null)."""
    out = check_out_dir(out_dir, overwrite=overwrite)
    out.mkdir(parents=True, exist_ok=True)
    return write_json(out / REPORT_FILE, report)


def _f(v: Any, fmt: str, scale: float = 1.0) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return fmt.format(v * scale)


def format_table(report: dict[str, Any]) -> str:
    """A fixed-width table: one row per candidate, then one line per gate."""
    cols = [("candidate", 22, "<"), ("backend", 11, "<"), ("prec", 4, "<"), ("Dice %", 7, ">"),
            ("dDice pt", 9, ">"), ("max|du|", 9, ">"), ("mean|du|", 9, ">"), ("p99 mm", 8, ">"),
            ("max mm", 8, ">"), ("HD95", 6, ">"),
            ("SDlogJ", 7, ">"), ("fold %", 7, ">"), ("p50 ms", 9, ">"), ("p95 ms", 9, ">"),
            ("p99 ms", 9, ">"), ("peak MB", 8, ">"), ("speed-up", 8, ">")]
    head = " ".join(f"{n:{a}{w}}" for n, w, a in cols)
    lines = [head, "-" * len(head)]
    for name, c in report["candidates"].items():
        s, lat, mem = c["summary"], c["latency"], c["memory"]
        cells = [
            (name + (" (ref)" if c["reference"] else ""))[:22], c["backend"][:11],
            c["precision"][:4], _f(s["dice_mean"], "{:.2f}", 100),
            _f(s["delta_dice_points_max_abs"], "{:.3f}"), _f(s["disp_diff_max_vox"], "{:.2e}"),
            _f(s["disp_diff_mean_vox"], "{:.2e}"), _f(s.get("disp_diff_p99_mm"), "{:.3g}"),
            _f(s.get("disp_diff_max_mm"), "{:.3g}"), _f(s["hd95_mean"], "{:.2f}"),
            _f(s["sdlogj"], "{:.4f}"), _f(s["folding_percent"], "{:.3f}"),
            _f(lat["p50_ms"], "{:.1f}"), _f(lat["p95_ms"], "{:.1f}"), _f(lat["p99_ms"], "{:.1f}"),
            _f(mem["peak_rss_mb"], "{:.0f}"), _f(c["speedup_vs_reference"], "{:.2f}x"),
        ]
        lines.append(" ".join(f"{v:{a}{w}}" for v, (_, w, a) in zip(cells, cols)))
    lines.append("-" * len(head))
    st = report["settings"]
    lines.append(f"{st['pairs']} {st['split']} pair(s); dDice pt: worst |delta mean Dice| in "
                 "points; |du|: displacement difference vs the reference at full resolution "
                 "(voxels; max over pairs of the per-pair max, mean over pairs of the mean; mm: worst "
                 "pair's p99 and max over voxels); "
                 f"latency: model execution, {st['warmup']} warm-up + {st['repeats']} timed runs, "
                 f"threads {st['threads'] or 'default'}; peak MB: process peak RSS "
                 f"({'one process per backend' if st['isolated'] else 'shared process'})")
    for name, c in report["candidates"].items():  # which implementation ran each part
        head = (c.get("describe") or {}).get("head")
        if head:
            lines.append(f"head of {name}: {_implementation(head)}")
        smp = (c.get("describe") or {}).get("sampling")
        if smp:
            lines.append(f"features' OBELISK sampling of {name}: {_implementation(smp)}")
            conv = smp.get("conv")
            if conv:
                lines.append(f"features' 3x3x3 convolution of {name}: {_implementation(conv)}")
    if any(c.get("mode", "ff") != "ff" for c in report["candidates"].values()):
        lines += format_modes(report)
    for name, c in report["candidates"].items():
        for g in c["gates"]:
            lines.append(f"  {'PASS' if g['passed'] else 'FAIL'} {name}: {g['description']}: "
                         f"{g['reason']}")
    for n in report.get("notes", []):
        lines.append(f"note: {n}")
    lines.append(f"status: {report['status'].upper()}")
    return "\n".join(lines)


def _implementation(part: dict[str, Any]) -> str:
    """``native-avx2``, ``winograd (avx512, fixed/Conv1_0 fused)`` or ``onnxruntime (why)``."""
    if part["implementation"] == "winograd":
        fused = part.get("fused_before")
        return f"winograd ({part['isa']}{', ' + fused['node'] + ' fused' if fused else ''})"
    return part["implementation"] + (f" ({part['reason']})" if part.get("reason") else "")


def format_modes(report: dict[str, Any]) -> list[str]:
    """Registration modes side by side (``pddnet validate --modes``): per candidate its mode,
    what it is compared with, mean Dice / HD95 / SDlogJ / folding, the Dice difference to that
    candidate, and the mean milliseconds of each stage of the accuracy runs."""
    stages = ("features", "head", "refine", "stage2")
    head = (f"{'candidate':<28} {'mode':<12} {'vs':<22} {'Dice %':>7} {'dDice pt':>9} "
            f"{'HD95':>6} {'SDlogJ':>7} {'fold %':>7} " + " ".join(f"{s:>9}" for s in stages))
    lines = ["", "registration modes (stage times: mean ms of the accuracy runs):", head,
             "-" * len(head)]
    for name, c in report["candidates"].items():
        s = c["summary"]
        st = s.get("stage_ms") or {}
        cells = " ".join(f"{_f(st.get(k), '{:.0f}'):>9}" for k in stages)
        lines.append(f"{name[:28]:<28} {c.get('mode', 'ff'):<12} "
                     f"{(c.get('compared_with') or '-')[:22]:<22} "
                     f"{_f(s['dice_mean'], '{:.2f}', 100):>7} "
                     f"{_f(s['delta_dice_points_mean'], '{:+.3f}'):>9} "
                     f"{_f(s['hd95_mean'], '{:.2f}'):>6} {_f(s['sdlogj'], '{:.4f}'):>7} "
                     f"{_f(s['folding_percent'], '{:.3f}'):>7} {cells}")
    lines.append("-" * len(head))
    return lines


def failure_message(report: dict[str, Any]) -> str:
    """One message naming every failed gate (for the CLI's exit status 1)."""
    parts = [f"{g['candidate']}: {g['description']} {g['reason']}" for g in report["failed_gates"]]
    return "validation failed: " + "; ".join(parts)
