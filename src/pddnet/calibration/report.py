"""``sensitivity.json`` and its human-readable rendering ``sensitivity.md``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from pddnet._files import atomic_write, write_json


def _f(v, fmt: str = "{:.3f}") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return fmt.format(v)


def _mm(r: dict[str, Any]) -> str:
    """``p99 / max`` |Δu| in mm of a measure (worst pair), ``-`` where not measured."""
    return f"{_f(r.get('disp_p99_mm'), '{:.2f}')} / {_f(r.get('disp_max_mm'), '{:.2f}')}"


def render_sensitivity(doc: dict[str, Any]) -> str:
    """Markdown: the per-block table, the decisions and the caveats."""
    lines = [f"# Precision sensitivity: {Path(doc['checkpoint']).name}", "",
             f"Checkpoint `{doc['checkpoint']}` (sha256 {doc['checkpoint_sha256'][:12]}...), "
             f"grid {'x'.join(map(str, doc['image_shape']))}; {len(doc['pairs'])} "
             f"{doc['split']} pair(s) ({', '.join(doc['pairs'])}); FP32 mean Dice "
             f"{100 * doc['reference_dice']:.2f} %. Created {doc['created']}, load average "
             f"{doc['machine'].get('load_average_start')} -> "
             f"{doc['machine'].get('load_average_end')}, {doc['threads']} thread(s).", "",
             "Each block is reduced alone and the pairs are registered end to end "
             "(`pddnet.runtime.Registrar`); |ΔDice| is the worst pair's mean-Dice difference "
             "to the FP32 graph in points, |Δu| the largest displacement difference at full "
             "resolution in voxels. FP16 is measured with float16 *storage* emulated in "
             "float32 arithmetic (every tensor the FP16 graph declares float16 is rounded), "
             "because ONNX Runtime's CPU provider computes an FP16 graph almost entirely in "
             "float32; INT8 with the Q/DQ graph as ONNX Runtime runs it. FP32 ms: the block's "
             "kernel time in one FP32 run (ONNX Runtime profiler); INT8 ms: model execution "
             "with only that block in INT8 (median of interleaved runs; FP32 "
             f"{_f(doc['results'].get('int8_fp32_timing', {}).get('median_ms'), '{:.0f}')} ms); "
             "measured saving: median over rounds of FP32 minus INT8 in the same round; "
             "saving: that, capped at the block's FP32 kernel time (more is load noise) and "
             "zero when within the median absolute deviation of the rounds -- blocks whose "
             "saving is not above "
             f"{_f(doc['decisions'].get('int8', {}).get('min_saving_ms'), '{:.0f}')} ms (1 % of "
             "FP32) stay FP32.", ""]
    res16 = doc["results"].get("fp16", {})
    res8 = doc["results"].get("int8", {})
    head = "| block | FP32 ms |"
    sep = "|---|---:|"
    if res16:
        head += " FP16 \\|ΔDice\\| pt | FP16 \\|Δu\\| vox | FP16 p99 / max \\|Δu\\| mm |"
        sep += "---:|---:|---:|"
    if res8:
        head += (" INT8 \\|ΔDice\\| pt | INT8 \\|Δu\\| vox | INT8 p99 / max \\|Δu\\| mm |"
                 " INT8 ms | measured saving ms | saving ms |")
        sep += "---:|---:|---:|---:|---:|---:|"
    lines += [head, sep]
    for b in doc["blocks"]:
        row = f"| {b} | {_f(doc['fp32_block_ms']['blocks'].get(b), '{:.0f}')} |"
        if res16:
            r = res16.get(b, {})
            row += (f" {_f(r.get('delta_dice_max'))} | {_f(r.get('disp_max'))} | "
                    f"{_mm(r)} |")
        if res8:
            r = res8.get(b, {})
            row += (f" {_f(r.get('delta_dice_max'))} | {_f(r.get('disp_max'))} | "
                    f"{_mm(r)} | {_f(r.get('median_ms'), '{:.0f}')} | "
                    f"{_f(r.get('measured_saving_ms'), '{:+.0f}')} | "
                    f"{_f(r.get('saving_ms'), '{:+.0f}')} |")
        lines.append(row)
    lines.append("")
    for prec, dec in doc["decisions"].items():
        m = dec.get("measure") or {}
        dg = dec.get("disp_gates_mm") or {}
        mm_gates = ", ".join(f"{label} <= {dg[k]:g} mm" for k, label in
                             (("disp_diff_p99_mm", "p99 |Δu|"), ("disp_diff_max_mm", "max |Δu|"))
                             if dg.get(k) is not None)
        lines.append(f"## {prec.upper()}: gates |ΔDice| <= {dec['gate_points']} points"
                     + (f", {mm_gates} (every pair)" if mm_gates else ""))
        lines.append("")
        if dec["chosen"]:
            lines.append(f"Chosen: **{', '.join(dec['chosen'])}** -> `{doc['files'].get(prec)}`; "
                         f"end to end |ΔDice| max {_f(m.get('delta_dice_max'))} pt (mean "
                         f"{_f(m.get('delta_dice_mean'), '{:+.3f}')}), max |Δu| "
                         f"{_f(m.get('disp_max'))} vox, mean |Δu| "
                         f"{_f(m.get('disp_mean'), '{:.4f}')} vox, p99 / max |Δu| "
                         f"{_mm(m)} mm.")
        else:
            lines.append("Nothing chosen: no block is both within the gate and worth it "
                         "(see the reasons below); no graph written.")
        if prec == "fp16" and dec.get("cpu_graph_measure"):
            c = dec["cpu_graph_measure"]
            a = dec.get("audit", {})
            lines.append("")
            lines.append(f"The deployable FP16 graph itself on ONNX Runtime's CPU provider: "
                         f"|ΔDice| max {_f(c.get('delta_dice_max'))} pt, max |Δu| "
                         f"{_f(c.get('disp_max'))} vox. Audit: {a.get('declared_fp16_tensors')} "
                         f"tensors declared float16, {a.get('fp16_tensors_in_ort')} still "
                         f"float16 in ONNX Runtime's optimised graph; "
                         f"{a.get('ort_inserted_casts')} casts inserted, "
                         f"{a.get('declared_casts_removed_by_ort')} of the graph's "
                         f"{a.get('declared_casts')} casts removed; ops with float16 inputs: "
                         f"{a.get('ops_in_fp16') or 'none'}.")
        if prec == "int8" and dec.get("timing"):
            t = dec["timing"]
            lines.append("")
            lines.append(f"Model execution here: FP32 {_f(t['fp32']['median_ms'], '{:.0f}')} ms, "
                         f"INT8 {_f(t['int8']['median_ms'], '{:.0f}')} ms (medians, "
                         f"interleaved): {t['fp32']['median_ms'] / t['int8']['median_ms']:.2f}x.")
        if dec.get("excluded"):
            lines.append("")
            lines.append("Kept in FP32:")
            for b, why in dec["excluded"].items():
                lines.append(f"- {b}: {why}")
        if dec.get("steps"):
            lines.append("")
            lines.append("Steps (greedy, largest saving first; every kept combination measured):")
            for s in dec["steps"]:
                verdict = "kept" if s["kept"] else "dropped"
                lines.append(f"- {' + '.join(s['try'])}: |ΔDice| {_f(s['delta_dice_max'])} pt, "
                             f"|Δu| {_f(s['disp_max'])} vox, p99 / max |Δu| {_mm(s)} mm "
                             f"-> {verdict}")
        lines.append("")
    if doc.get("notes"):
        lines.append("Notes:")
        lines += [f"- {n}" for n in doc["notes"]]
        lines.append("")
    return "\n".join(lines)


def write_sensitivity(doc: dict[str, Any], out_dir) -> dict[str, Path]:
    out = Path(out_dir)
    paths = {"sensitivity.json": out / "sensitivity.json", "sensitivity.md": out / "sensitivity.md"}
    write_json(paths["sensitivity.json"], doc)
    with atomic_write(paths["sensitivity.md"], overwrite=True) as tmp:
        Path(tmp).write_text(render_sensitivity(doc) + "\n")
    return paths
