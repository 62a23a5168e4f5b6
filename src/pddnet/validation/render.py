"""The validation report people read: ``report.md`` and ``report.html`` rendered from the report.

``report.json`` (:mod:`pddnet.validation.compare`, schema in ``docs/validation.md``) is the one
source of numbers; this module renders it -- the same sections, tables and figures in both
files -- and adds images that need the volumes, collected while ``pddnet validate`` registers
the pairs (:class:`FigureCollector`, an observer of :func:`~pddnet.validation.compare.compare`).

Sections: status and summary per candidate (backend, precision, Dice, differences to the
reference, latency p50/p95/p99, peak memory, gates PASS/FAIL); every gate; Dice per label per
candidate (table and grouped bars); the latency distribution per candidate with p50/p95/p99
marked; for the first pairs (``figure_pairs``, default 2), orthogonal slices through the fixed
labels' centre of the fixed scan, the moving scan and the warped moving scan with label
contours, the displacement magnitude, the Jacobian determinant with folding (``det <= 0``)
marked, and -- where the model outputs it -- the per-control-point uncertainty (entropy of the
displacement distribution, nats); per candidate the displacement difference to the reference
on the same slices; settings, machine and notes.

``report.html`` is self-contained (images embedded as base64 PNG, inline CSS, no scripts);
``report.md`` links the same PNGs in ``figures/`` next to it (a Markdown viewer shows them,
a text editor stays readable). Figures are drawn with matplotlib's Agg canvas (no pyplot
state, no display) and each PNG is checked to decode before anything is written.
"""

from __future__ import annotations

import base64
import html
import io
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from pddnet._files import atomic_write
from pddnet.errors import PddnetError

REPORT_MD = "report.md"
REPORT_HTML = "report.html"
FIGURES = "figures"
DEFAULT_FIGURE_PAIRS = 2
ORIENTATIONS = (("axial", 2), ("coronal", 1), ("sagittal", 0))  # (name, axis held fixed)


# --------------------------------------------------------------------------------------------
# collecting slices while validate runs
# --------------------------------------------------------------------------------------------
@dataclass
class PairSlices:
    """Three orthogonal slices (``axial``, ``coronal``, ``sagittal``) of every panel of a pair."""

    pair: str
    centre: tuple[int, int, int]
    spacing: tuple[float, float, float]
    panels: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    folding_percent: float | None = None
    entropy_max: float | None = None
    label_names: dict[str, str] = field(default_factory=dict)
    diffs: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)   # candidate -> slices


def _slices(vol: np.ndarray, centre: Sequence[int]) -> dict[str, np.ndarray]:
    return {name: np.take(vol, int(centre[ax]), axis=ax).copy() for name, ax in ORIENTATIONS}


class FigureCollector:
    """Observer for :func:`~pddnet.validation.compare.compare`: keeps slices of the first
    ``pairs`` pairs (the reference's registration, and every candidate's displacement
    difference to it). Only 2D slices are kept, so memory stays small."""

    def __init__(self, pairs: int = DEFAULT_FIGURE_PAIRS, reference: str | None = None):
        self.pairs = int(pairs)
        self.reference = reference
        self.data: dict[int, PairSlices] = {}
        self._ref_disp: dict[int, np.ndarray] = {}

    def __call__(self, name: str, index: int, pair: Any, result: Any,
                 volumes: tuple) -> None:
        if index >= self.pairs:
            return
        if self.reference is None:
            self.reference = name  # compare() reports the reference first
        if name == self.reference:
            self._add_reference(index, pair, result, volumes)
        elif index in self.data and index in self._ref_disp:
            d = (result.disp.astype(np.float32) - self._ref_disp[index]) * \
                np.asarray(self.data[index].spacing, np.float32)
            mag = np.sqrt(np.einsum("...a,...a->...", d, d))   # mm (axis-aligned grids)
            self.data[index].diffs[name] = _slices(mag, self.data[index].centre)

    def _add_reference(self, index: int, pair: Any, res: Any, volumes: tuple) -> None:
        from pddnet.metrics import jacobian_determinant
        from pddnet.runtime.postprocess import labels_on_fixed_grid, moving_voxel_map
        from pddnet.runtime.resample import resample

        fixed, moving, fl, ml = volumes
        if fl is not None and np.any(fl.array > 0):
            idx = np.argwhere(fl.array > 0)
            centre = tuple(int(round(v)) for v in idx.mean(axis=0))
        else:
            centre = tuple(n // 2 for n in fixed.shape)
        vmap = moving_voxel_map(fixed, moving)
        before = moving.array if vmap is None else resample(moving.array, fixed.shape, vmap,
                                                            order=1)
        ps = PairSlices(str(pair), centre, tuple(float(s) for s in fixed.spacing))
        ps.panels["fixed"] = _slices(fixed.array, centre)
        ps.panels["moving"] = _slices(before, centre)
        ps.panels["warped"] = _slices(res.warped, centre)
        if fl is not None:
            ps.panels["fixed_labels"] = _slices(fl.array, centre)
        if ml is not None:
            ps.panels["moving_labels"] = _slices(labels_on_fixed_grid(ml, fixed), centre)
        if res.warped_labels is not None:
            ps.panels["warped_labels"] = _slices(res.warped_labels, centre)
        disp = res.disp
        mm = disp * np.asarray(ps.spacing, np.float32)
        ps.panels["disp_norm"] = _slices(np.sqrt(np.einsum("...a,...a->...", mm, mm)), centre)
        # the in-plane components (voxels) of each slice, for the deformation grid
        ps.panels["disp_inplane"] = {
            name: np.take(disp, int(centre[ax]), axis=ax)[..., [a for a in range(3) if a != ax]]
            .astype(np.float32).copy() for name, ax in ORIENTATIONS}
        jac = np.full(disp.shape[:3], np.nan, np.float32)
        j = jacobian_determinant(disp)
        c = (disp.shape[0] - j.shape[0]) // 2
        jac[c:c + j.shape[0], c:c + j.shape[1], c:c + j.shape[2]] = j
        ps.panels["jacobian"] = _slices(jac, centre)
        ps.folding_percent = float(100.0 * np.count_nonzero(j <= 0) / j.size)
        ent = (res.model_outputs or {}).get("entropy")
        if ent is not None:
            ent = np.asarray(ent, np.float32)
            gc = tuple(min(g - 1, int(round(cc * g / n)))
                       for cc, g, n in zip(centre, ent.shape, fixed.shape))
            ps.panels["entropy"] = _slices(ent, gc)
            ps.entropy_max = float(ent.max())
        self.data[index] = ps
        self._ref_disp[index] = disp.astype(np.float32)
        for k in [k for k in self._ref_disp if k < index]:
            del self._ref_disp[k]


# --------------------------------------------------------------------------------------------
# figures
# --------------------------------------------------------------------------------------------
def _figure(w: float, h: float):
    from pddnet._optional import require

    require("matplotlib", "the validation report's figures")  # the [report] extra
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=90)
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    data = buf.getvalue()
    check_png(data)
    return data


def check_png(data: bytes) -> tuple[int, int]:
    """Decode ``data`` as PNG; returns ``(height, width)``; raises when it is blank/broken."""
    import matplotlib.image as mpimg

    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        raise PddnetError("a report figure did not render as PNG")
    img = mpimg.imread(io.BytesIO(data), format="png")
    if img.ndim < 2 or img.shape[0] < 10 or img.shape[1] < 10 or float(np.std(img)) == 0.0:
        raise PddnetError(f"a report figure rendered blank ({img.shape})")
    return int(img.shape[0]), int(img.shape[1])


def _label_colors(n: int):
    from matplotlib import colormaps

    cmap = colormaps["tab20"]
    return [cmap(i % 20) for i in range(n + 1)]


def _show(ax, sl: np.ndarray, spacing2: tuple[float, float], **kw):
    ax.imshow(sl.T, origin="lower", aspect=spacing2[1] / spacing2[0], interpolation="nearest",
              **kw)
    ax.set_xticks([])
    ax.set_yticks([])


def _contours(ax, lab: np.ndarray, colors, *, lw: float = 0.7,
              style: str = "solid") -> set[int]:
    drawn = set()
    for v in np.unique(lab):
        if v == 0:
            continue
        m = (lab == v).T.astype(np.float32)
        if m.min() == m.max():
            continue
        ax.contour(m, levels=[0.5], colors=[colors[int(v) % len(colors)]], linewidths=lw,
                   linestyles=style, origin="lower")
        drawn.add(int(v))
    return drawn


def _plane(ps: PairSlices, ax_held: int) -> tuple[float, float]:
    return tuple(sp for a, sp in enumerate(ps.spacing) if a != ax_held)


def _checkerboard(a: np.ndarray, b: np.ndarray, tiles: int = 8) -> np.ndarray:
    """``a`` and ``b`` (same shape) in alternating square-ish tiles, ``tiles`` along the longer
    side."""
    n = max(1, max(a.shape) // tiles)
    i, j = np.indices(a.shape)
    return np.where(((i // n) + (j // n)) % 2 == 0, a, b)


def _label_legend(fig, ps: PairSlices, colors, present: set[int]) -> None:
    """Below the figure: one coloured line per label present in the slices, and what solid and
    dotted contours mean."""
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=colors[v % len(colors)], lw=2,
                      label=f"{v} {ps.label_names.get(str(v), '')}".strip())
               for v in sorted(present)]
    handles += [Line2D([], [], color="black", lw=1, label="solid: moving / warped labels"),
                Line2D([], [], color="gray", lw=1, ls=":", label="dotted white: fixed labels")]
    fig.legend(handles=handles, loc="lower center", ncols=min(len(handles), 6), fontsize=7,
               frameon=False, bbox_to_anchor=(0.5, -0.01))


def pair_figure(ps: PairSlices, label_count: int = 13) -> bytes:
    """The anatomy of one pair. Rows: axial, coronal, sagittal (pixels at the fixed scan's
    aspect ratio); columns: fixed, moving before registration, warped moving after (label
    contours), fixed/moving and fixed/warped checkerboards, and |fixed - moving| before and
    |fixed - warped| after on one shared scale; a legend of the labels below."""
    cols = ["fixed", "moving", "warped", "check_before", "check_after", "diff_before",
            "diff_after"]
    titles = {"fixed": "fixed", "moving": "moving (before)", "warped": "warped (after)",
              "check_before": "checkerboard fixed/moving", "check_after":
              "checkerboard fixed/warped", "diff_before": "|fixed - moving| (HU)",
              "diff_after": "|fixed - warped| (HU)"}
    fig = _figure(2.3 * len(cols), 2.1 * 3 + 0.8)
    axes = fig.subplots(3, len(cols), squeeze=False)
    colors = _label_colors(max(label_count, 1))
    lo, hi = np.percentile(ps.panels["fixed"]["axial"], [1, 99])
    clip = lambda a: np.clip(a, lo, hi)  # noqa: E731 - HU window of the fixed scan
    dmax = max(float(np.percentile(np.abs(clip(ps.panels["fixed"][o]) -
                                          clip(ps.panels["moving"][o])), 99.5))
               for o, _ in ORIENTATIONS) or 1.0
    present: set[int] = set()
    for r, (oname, ax_held) in enumerate(ORIENTATIONS):
        sp = _plane(ps, ax_held)
        f, m, w = (clip(ps.panels[k][oname]) for k in ("fixed", "moving", "warped"))
        for c, col in enumerate(cols):
            ax = axes[r][c]
            if col in ("fixed", "moving", "warped"):
                _show(ax, {"fixed": f, "moving": m, "warped": w}[col], sp, cmap="gray",
                      vmin=lo, vmax=hi)
                key = {"fixed": "fixed_labels", "moving": "moving_labels",
                       "warped": "warped_labels"}[col]
                if key in ps.panels:
                    present |= _contours(ax, ps.panels[key][oname], colors)
                if col == "warped" and "fixed_labels" in ps.panels:
                    _contours(ax, ps.panels["fixed_labels"][oname], ["white"] * len(colors),
                              lw=0.5, style="dotted")
            elif col.startswith("check"):
                other = m if col == "check_before" else w
                _show(ax, _checkerboard(f, other), sp, cmap="gray", vmin=lo, vmax=hi)
            else:
                other = m if col == "diff_before" else w
                d = np.abs(f - other)
                _show_cb(fig, ax, d, sp, cmap="magma", vmin=0, vmax=dmax, cb_format="%.0f")
                ax.set_xlabel(f"mean {float(d.mean()):.0f} HU", fontsize=7)
            if r == 0:
                ax.set_title(titles[col], fontsize=8)
            if c == 0:
                ax.set_ylabel(oname, fontsize=9)
    _label_legend(fig, ps, colors, present)
    fig.suptitle(f"{ps.pair} -- anatomy: slices through voxel {ps.centre} of the fixed scan "
                 f"({' x '.join(f'{v:g}' for v in ps.spacing)} mm voxels)", fontsize=9)
    return _png(fig)


def _deformation_grid(ax, inplane: np.ndarray, step: int) -> None:
    """Lines of the fixed grid (every ``step`` voxels) moved by ``x -> x + u(x)`` (in-plane
    components, voxels), drawn in image coordinates (axis 0 horizontal, axis 1 vertical)."""
    n0, n1 = inplane.shape[:2]
    i, j = np.meshgrid(np.arange(n0), np.arange(n1), indexing="ij")
    x = i + inplane[..., 0]
    y = j + inplane[..., 1]
    kw = {"color": "yellow", "lw": 0.5, "alpha": 0.85}
    for a in range(0, n0, step):
        ax.plot(x[a, :], y[a, :], **kw)
    for b in range(0, n1, step):
        ax.plot(x[:, b], y[:, b], **kw)
    ax.set_xlim(-0.5, n0 - 0.5)
    ax.set_ylim(-0.5, n1 - 0.5)


def field_figure(ps: PairSlices) -> bytes:
    """The displacement field of one pair. Columns: |u| in mm; the deformation grid (fixed-grid
    lines mapped by x -> x + u(x)) on the moving scan; det J of x -> x + u(x) -- compression
    blue, expansion red, folding (det J <= 0) black; and, when the model outputs it, the
    uncertainty (entropy, nats) resampled from the control grid onto the fixed slice so it has
    the anatomy's aspect ratio."""
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch
    from scipy.ndimage import zoom

    cols = ["disp_norm", "grid", "jacobian"] + (["entropy"] if "entropy" in ps.panels else [])
    titles = {"disp_norm": "|u| (mm)", "grid": "deformation grid on moving",
              "jacobian": "det J (blue < 1 < red)", "entropy": "uncertainty: entropy (nats)"}
    fig = _figure(2.8 * len(cols), 2.5 * 3 + 0.9)
    axes = fig.subplots(3, len(cols), squeeze=False)
    lo, hi = np.percentile(ps.panels["fixed"]["axial"], [1, 99])
    dmax = max(float(np.nanmax(ps.panels["disp_norm"][o])) for o, _ in ORIENTATIONS) or 1.0
    for r, (oname, ax_held) in enumerate(ORIENTATIONS):
        sp = _plane(ps, ax_held)
        for c, col in enumerate(cols):
            ax = axes[r][c]
            if col == "disp_norm":
                _show_cb(fig, ax, ps.panels[col][oname], sp, cmap="viridis", vmin=0, vmax=dmax)
            elif col == "grid":
                _show(ax, ps.panels["moving"][oname], sp, cmap="gray", vmin=lo, vmax=hi)
                inpl = ps.panels["disp_inplane"][oname]
                _deformation_grid(ax, inpl, max(2, max(inpl.shape[:2]) // 16))
            elif col == "jacobian":
                sl = ps.panels[col][oname]
                _show_cb(fig, ax, np.where(sl > 0, sl, np.nan), sp, cmap="RdBu_r", vmin=0.0,
                         vmax=2.0)
                fold = np.ma.masked_where(~(sl <= 0), np.ones_like(sl))
                ax.imshow(fold.T, origin="lower", aspect=sp[1] / sp[0],
                          cmap=ListedColormap(["black"]), interpolation="nearest")
                nf = int(np.count_nonzero(sl <= 0))
                ax.set_xlabel(f"{nf} folded voxel(s) here", fontsize=7)
            elif col == "entropy":
                ent = ps.panels["entropy"][oname]
                target = ps.panels["fixed"][oname].shape
                up = zoom(ent, (target[0] / ent.shape[0], target[1] / ent.shape[1]), order=1,
                          grid_mode=True, mode="nearest")
                _show_cb(fig, ax, up, sp, cmap="viridis", vmin=0, vmax=ps.entropy_max or 1.0)
            if r == 0:
                ax.set_title(titles[col], fontsize=8)
            if c == 0:
                ax.set_ylabel(oname, fontsize=9)
    fold = f"{ps.folding_percent:.3f}%" if ps.folding_percent is not None else "-"
    fig.legend(handles=[Patch(color="#2166ac", label="det J < 1: compression"),
                        Patch(color="#f7f7f7", ec="gray", label="det J = 1"),
                        Patch(color="#b2182b", label="det J > 1: expansion"),
                        Patch(color="black", label=f"det J <= 0: folding ({fold} of voxels)")],
               loc="lower center", ncols=4, fontsize=7, frameon=False,
               bbox_to_anchor=(0.5, -0.01))
    fig.suptitle(f"{ps.pair} -- displacement field, slices through voxel {ps.centre}",
                 fontsize=9)
    return _png(fig)


def _show_cb(fig, ax, sl, sp, *, cb_format: str = "%.2g", **kw):
    im = ax.imshow(np.asarray(sl).T, origin="lower", aspect=sp[1] / sp[0],
                   interpolation="nearest", **kw)
    ax.set_xticks([])
    ax.set_yticks([])
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02,
                 format=cb_format).ax.tick_params(labelsize=6)
    return im


def diff_figure(ps: PairSlices) -> bytes:
    """Per candidate, ``|u_candidate - u_reference|`` in mm on the pair's slices."""
    names = list(ps.diffs)
    fig = _figure(2.6 * 3, 2.4 * len(names) + 0.4)
    axes = fig.subplots(len(names), 3, squeeze=False)
    for r, n in enumerate(names):
        vmax = max(float(np.max(ps.diffs[n][o])) for o, _ in ORIENTATIONS)
        vmax = vmax if vmax > 0 else 1e-6
        for c, (oname, ax_held) in enumerate(ORIENTATIONS):
            _show_cb(fig, axes[r][c], ps.diffs[n][oname], _plane(ps, ax_held), cmap="inferno",
                     vmin=0, vmax=vmax)
            if r == 0:
                axes[r][c].set_title(oname, fontsize=9)
            if c == 0:
                axes[r][c].set_ylabel(n, fontsize=8)
    fig.suptitle(f"{ps.pair} -- |delta u| vs the reference (mm; colour scale per row)",
                 fontsize=9, y=1.0 + 0.12 / max(len(names), 1))
    return _png(fig)


def per_label_delta(report: dict[str, Any]) -> tuple[list[int], dict[str, list[float | None]]]:
    """``(labels, {candidate: mean over pairs of its per-label ΔDice in points})`` for the
    candidates compared with the reference (not the reference itself)."""
    cands = report["candidates"]
    ref = report.get("reference")
    labels = sorted({int(k) for c in cands.values()
                     for k in (c["summary"].get("dice_per_label") or {})})
    out: dict[str, list[float | None]] = {}
    for n, c in cands.items():
        if c.get("reference") or c.get("compared_with") not in (None, ref):
            continue
        vals = []
        for lab in labels:
            xs = [_num((p.get("delta_dice_per_label_points") or {}).get(str(lab)))
                  for p in c.get("pairs") or [] if not p.get("error")]
            xs = [x for x in xs if x is not None]
            vals.append(float(np.mean(xs)) if xs else None)
        out[n] = vals
    return labels, out


def dice_figure(report: dict[str, Any]) -> bytes | None:
    """Per label, each candidate's ΔDice to the reference (points, mean over pairs) as
    horizontal bars around zero -- the differences, not five near-identical Dice bars."""
    labels, delta = per_label_delta(report)
    if not labels or not delta:
        return None
    names = report.get("label_names") or {}
    fig = _figure(7.0, 0.085 * len(labels) * len(delta) + 1.3)
    ax = fig.subplots()
    h = 0.8 / len(delta)
    y = np.arange(len(labels))
    for i, (n, vals) in enumerate(delta.items()):
        ax.barh(y + (i - (len(delta) - 1) / 2) * h, [v if v is not None else 0 for v in vals],
                h, label=n)
    ax.axvline(0, color="black", lw=0.8)
    ax.set_yticks(y, [f"{lab} {names.get(str(lab), '')}".strip() for lab in labels],
                  fontsize=7)
    ax.invert_yaxis()
    lim = max([abs(v) for vals in delta.values() for v in vals if v is not None] + [0.01])
    ax.set_xlim(-1.15 * lim, 1.15 * lim)
    ax.set_xlabel("ΔDice vs the reference, points (mean over pairs)")
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title("per-label ΔDice against the reference", fontsize=9)
    return _png(fig)


def latency_figure(report: dict[str, Any]) -> bytes | None:
    cands = report["candidates"]
    rows = [(n, c["latency"]) for n, c in cands.items() if (c.get("latency") or {}).get("n")]
    if not rows:
        return None
    fig = _figure(7.5, 0.7 * len(rows) + 1.3)
    ax = fig.subplots()
    allv = [v for _, lat in rows for v in (lat.get("samples_ms") or [lat.get("p50_ms")])
            if v]
    log = bool(allv) and max(allv) / max(min(allv), 1e-9) > 20
    rng = np.random.default_rng(0)
    for y, (n, lat) in enumerate(rows):
        s = np.asarray(lat.get("samples_ms") or [], np.float64)
        if s.size:
            ax.scatter(s, y + rng.uniform(-0.15, 0.15, s.size), s=10, alpha=0.5, color="gray")
        for key, marker, color in (("p50_ms", "|", "tab:blue"), ("p95_ms", "^", "tab:orange"),
                                   ("p99_ms", "v", "tab:red")):
            v = _num(lat.get(key))
            if v is not None:
                ax.scatter([v], [y], marker=marker, s=160 if marker == "|" else 50, color=color,
                           label=key[:3] if y == 0 else None, zorder=3)
        p50, p95, p99 = (_num(lat.get(k)) for k in ("p50_ms", "p95_ms", "p99_ms"))
        if p50 is not None:
            ax.annotate(f"p50 {p50:.0f} / p95 {fmt(p95, '.0f')} / p99 {fmt(p99, '.0f')} ms",
                        (p50, y), xytext=(0, 9), textcoords="offset points", fontsize=7,
                        ha="center")
    ax.set_yticks(range(len(rows)), [n for n, _ in rows], fontsize=8)
    ax.set_ylim(-0.6, len(rows) - 0.2)
    if log:
        ax.set_xscale("log")
    ax.set_xlabel("model execution, ms (timed runs; grey: every run)")
    ax.legend(fontsize=7, loc="best")
    ax.set_title("latency distribution per candidate", fontsize=9)
    return _png(fig)


# --------------------------------------------------------------------------------------------
# document model -> Markdown / HTML
# --------------------------------------------------------------------------------------------
@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]


@dataclass
class Image:
    name: str
    caption: str
    png: bytes


@dataclass
class Section:
    title: str
    blocks: list[Any] = field(default_factory=list)   # str (paragraph) | Table | Image


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(v) else None


def fmt(v: Any, spec: str, scale: float = 1.0) -> str:
    """The report's number format: ``-`` for missing/non-finite values."""
    x = _num(v)
    return "-" if x is None else format(x * scale, spec)


SUMMARY_HEADER = ["candidate", "backend", "precision", "mode", "Dice %", "max |dDice| pt",
                  "max |du| vox", "max |du| mm", "p99 |du| mm", "mean |du| vox", "HD95 vox",
                  "HD95 mm", "DSC30 %", "SDlogJ", "folding %", "p50 ms", "p95 ms", "p99 ms",
                  "peak MB", "speed-up", "gates"]


def iso_spacing(c: dict[str, Any]) -> float | None:
    """The voxel size in mm when every pair of the candidate has the same isotropic spacing
    (HD95 in voxels, as Learn2Reg computes it, converts to mm only then), else ``None``."""
    sps = {tuple(round(float(v), 6) for v in p["spacing_mm"]) for p in c.get("pairs") or []
           if isinstance(p.get("spacing_mm"), list) and len(p["spacing_mm"]) == 3}
    if len(sps) != 1:
        return None
    sp = next(iter(sps))
    return sp[0] if sp[0] == sp[1] == sp[2] else None


def summary_rows(report: dict[str, Any]) -> list[list[str]]:
    rows = []
    for name, c in report["candidates"].items():
        s, lat, mem = c["summary"], c.get("latency") or {}, c.get("memory") or {}
        gates = "reference" if c.get("reference") else (
            "none" if not c.get("gates") else ("PASS" if c.get("passed") else "FAIL"))
        rows.append([name, c["backend"], c["precision"], c.get("mode", "ff"),
                     fmt(s.get("dice_mean"), ".2f", 100),
                     fmt(s.get("delta_dice_points_max_abs"), ".3f"),
                     fmt(s.get("disp_diff_max_vox"), ".2e"),
                     fmt(s.get("disp_diff_max_mm"), ".3g"), fmt(s.get("disp_diff_p99_mm"), ".3g"),
                     fmt(s.get("disp_diff_mean_vox"), ".2e"), fmt(s.get("hd95_mean"), ".2f"),
                     fmt(s.get("hd95_mean"), ".1f", iso_spacing(c) or math.nan),
                     fmt(s.get("dsc30"), ".2f", 100), fmt(s.get("sdlogj"), ".4f"), fmt(s.get("folding_percent"), ".3f"),
                     fmt(lat.get("p50_ms"), ".1f"), fmt(lat.get("p95_ms"), ".1f"),
                     fmt(lat.get("p99_ms"), ".1f"), fmt(mem.get("peak_rss_mb"), ".0f"),
                     fmt(c.get("speedup_vs_reference"), ".2f") + "x"
                     if _num(c.get("speedup_vs_reference")) is not None else "-", gates])
    return rows


def build_document(report: dict[str, Any], figures: FigureCollector | None = None
                   ) -> list[Section]:
    """Every section of the report (numbers from ``report`` only)."""
    st = report.get("settings") or {}
    cands = report["candidates"]
    secs: list[Section] = []
    status = str(report.get("status", "?")).upper()
    others = [n for n, c in cands.items() if not c.get("reference")]
    failed = [n for n in others if not cands[n].get("passed")]
    # the headline says which candidates failed: one failing precision must not read as if
    # every deployed form had failed
    top = Section(f"Validation report: {status}" + (
        f" ({len(failed)} of {len(others)} candidates: {', '.join(failed)})" if failed else ""))
    top.blocks.append(
        f"{st.get('pairs')} {st.get('split')} pair(s) of {st.get('data')}; reference "
        f"`{report.get('reference')}`; created {report.get('created')} in "
        f"{fmt(report.get('duration_s'), '.0f')} s. Every candidate runs the same pre- and "
        "post-processing; differences come from the model execution only. Dice is the mean over "
        "labels present in both maps (Learn2Reg); |du| the displacement difference to the "
        "reference at full resolution (voxels of the fixed grid and mm: p99 and max over its "
        "voxels, worst pair); latency the model execution "
        f"({st.get('warmup')} warm-up + {st.get('repeats')} timed runs, "
        f"{'one process per candidate' if st.get('isolated') else 'one shared process'}).")
    top.blocks.append(Table(SUMMARY_HEADER, summary_rows(report)))
    failed = report.get("failed_gates") or []
    if failed:
        top.blocks.append("**Failed gates:** " + "; ".join(
            f"{g['candidate']}: {g['description']} {g['reason']}" for g in failed))
    secs.append(top)

    gates = Section("Gates")
    rows = []
    for name, c in cands.items():
        for g in c.get("gates") or []:
            rows.append(["PASS" if g["passed"] else "FAIL", name, g["description"],
                         f"{fmt(g['threshold'], 'g')} {g['unit']}",
                         f"{fmt(g.get('measured'), '.4g')} {g['unit']}",
                         str(g.get("worst_pair") or "-"), g["reason"]])
    gates.blocks.append(Table(["result", "candidate", "gate", "threshold", "measured (worst)",
                               "worst pair", "detail"], rows) if rows else
                        "No candidate has gates.")
    secs.append(gates)
    choice = _precision_choice(report)
    if choice is not None:
        secs.append(choice)

    secs += _dice_sections(report)

    lat = Section("Latency")
    rows = []
    for n, c in cands.items():
        l = c.get("latency") or {}
        rows.append([n, str(l.get("n", "-")), fmt(l.get("p50_ms"), ".1f"),
                     fmt(l.get("p95_ms"), ".1f"), fmt(l.get("p99_ms"), ".1f"),
                     fmt(l.get("min_ms"), ".1f"), fmt(l.get("max_ms"), ".1f"),
                     fmt((c.get("memory") or {}).get("peak_rss_mb"), ".0f"),
                     fmt((c.get("memory") or {}).get("added_rss_mb"), ".0f")])
    lat.blocks.append(Table(["candidate", "runs", "p50 ms", "p95 ms", "p99 ms", "min ms",
                             "max ms", "peak MB", "added MB"], rows))
    png = latency_figure(report)
    if png:
        lat.blocks.append(Image("latency.png", "latency distribution (p50 | p95 ^ p99 v)", png))
    secs.append(lat)

    if figures is not None and figures.data:
        pairs = Section("Registered pairs")
        pairs.blocks.append(
            f"The reference (`{figures.reference}`) on the first {len(figures.data)} pair(s): "
            "orthogonal slices through the centre of the fixed labels, each pixel at the fixed "
            "scan's voxel aspect ratio. Anatomy: the scans with label contours (moving/warped "
            "solid, fixed dotted white; legend below the figure), fixed/moving checkerboards "
            "and absolute differences before and after registration (one shared scale). Field: "
            "|u| in mm; the fixed grid's lines mapped by x -> x + u(x) over the moving scan; "
            "det J of x -> x + u(x) (compression blue, expansion red, folding det J <= 0 "
            "black); the uncertainty of each control point's displacement distribution "
            "(entropy, nats) resampled from the control grid onto the slice.")
        ncol = len(report.get("label_names") or {}) or 13
        ref = report.get("reference")
        direct = {n for n, c in cands.items() if c.get("compared_with") in (None, ref)}
        for i in sorted(figures.data):
            ps = figures.data[i]
            ps.label_names = dict(report.get("label_names") or {})
            pairs.blocks.append(Image(f"pair_{i + 1}.png", f"{ps.pair}: anatomy",
                                      pair_figure(ps, ncol)))
            pairs.blocks.append(Image(f"pair_{i + 1}_field.png", f"{ps.pair}: displacement field",
                                      field_figure(ps)))
            # only candidates whose differences the report computes against the reference
            diffs = {n: d for n, d in ps.diffs.items() if n in direct}
            if diffs:
                shown = PairSlices(ps.pair, ps.centre, ps.spacing, diffs=diffs)
                pairs.blocks.append(Image(f"pair_{i + 1}_diff.png",
                                          f"{ps.pair}: |delta u| (mm) per candidate vs the "
                                          "reference",
                                          diff_figure(shown)))
        secs.append(pairs)

    m = report.get("machine") or {}
    setting = Section("Settings and machine")
    setting.blocks.append(Table(["setting", "value"], [
        [k, str(v)] for k, v in st.items()] + [[f"machine.{k}", str(v)] for k, v in m.items()]))
    if report.get("notes"):
        setting.blocks.append("Notes: " + " ".join(f"({i + 1}) {n}"
                                                   for i, n in enumerate(report["notes"])))
    secs.append(setting)
    return secs


def _precision_choice(report: dict[str, Any]) -> Section | None:
    """Which reduced precisions may be chosen automatically, and why (not): a precision whose
    feed-forward candidates did not pass every gate is refused by ``pddnet package`` (or
    bundled unvalidated) and never selected by the runtime on its own."""
    from pddnet.validation.compare import gate_phrase

    by_prec: dict[str, list[dict[str, Any]]] = {}
    for c in report["candidates"].values():
        if c.get("reference") or c.get("mode", "ff") != "ff" or c.get("precision") == "fp32":
            continue
        by_prec.setdefault(str(c.get("precision")), []).append(c)
    if not by_prec:
        return None
    sec = Section("Precision choice")
    rows = []
    for prec, cs in sorted(by_prec.items()):
        fails = [f"{gate_phrase(g)} ({c['name']})" for c in cs for g in c.get("gates") or []
                 if not g.get("passed")]
        if fails:
            rows.append([prec, "FAIL", f"{prec} not chosen: " + "; ".join(fails)])
        else:
            gates = sorted({f"{g['metric']} <= {fmt(g['threshold'], 'g')} {g['unit']}"
                            for c in cs for g in c.get("gates") or []})
            rows.append([prec, "PASS", f"{prec} may be chosen: every gate passed "
                                       f"({', '.join(gates) or 'no gates'})"])
    sec.blocks.append(
        "A precision is chosen automatically (by `pddnet package` and the runtime's selection) "
        "only when every gate of its candidates passed: the Dice gate and the displacement "
        "gates in mm (p99 and max over each pair's voxels of |u_cand - u_ref|, worst pair).")
    sec.blocks.append(Table(["precision", "gates", "why"], rows))
    return sec


def _per_pair_label_mean(c: dict[str, Any], key: str, lab: int) -> float | None:
    xs = [_num((p.get(key) or {}).get(str(lab))) for p in c.get("pairs") or []
          if not p.get("error")]
    xs = [x for x in xs if x is not None]
    return float(np.mean(xs)) if xs else None


def _dice_sections(report: dict[str, Any]) -> list[Section]:
    """Dice per label with the ΔDice to the reference (table and bars), HD95 per label and
    the robustness summary (DSC30), and the mean Dice per pair. Tables take whatever metrics
    the report holds: a key a candidate lacks shows as ``-``."""
    cands = report["candidates"]
    names = report.get("label_names") or {}
    labels = sorted({int(k) for c in cands.values()
                     for k in (c["summary"].get("dice_per_label") or {})})
    lab_name = lambda lab: f"{lab} {names.get(str(lab), '')}".strip()  # noqa: E731
    dice = Section("Dice per label and ΔDice against the reference")
    if labels:
        _, delta = per_label_delta(report)
        ref = report.get("reference")
        rows = []
        for k, lab in enumerate(labels):
            per = (cands.get(ref) or {}).get("summary", {}).get("dice_per_label") or {}
            row = [lab_name(lab), fmt(per.get(str(lab), per.get(lab)), ".2f", 100)]
            row += [fmt(vals[k], "+.3f") for vals in delta.values()]
            rows.append(row)
        rows.append(["mean", fmt((cands.get(ref) or {}).get("summary", {}).get("dice_mean"),
                                 ".2f", 100)]
                    + [fmt(cands[n]["summary"].get("delta_dice_points_mean"), "+.3f")
                       for n in delta])
        dice.blocks.append(
            f"Dice of the reference `{ref}` (%, mean over pairs) and each candidate's "
            "difference to it (points, mean over pairs of the per-pair difference; "
            "+ means the candidate overlaps better).")
        dice.blocks.append(Table(["label", f"{ref} Dice %"] + [f"{n} ΔDice pt" for n in delta],
                                 rows))
        png = dice_figure(report)
        if png:
            dice.blocks.append(Image("delta_dice_per_label.png",
                                     "per-label ΔDice against the reference (points)", png))
        rows = []
        for lab in labels:
            row = [lab_name(lab)]
            for c in cands.values():
                per = c["summary"].get("dice_per_label") or {}
                row.append(fmt(per.get(str(lab), per.get(lab)), ".2f", 100))
            rows.append(row)
        rows.append(["mean"] + [fmt(c["summary"].get("dice_mean"), ".2f", 100)
                                for c in cands.values()])
        dice.blocks.append("Dice per label of every candidate (%):")
        dice.blocks.append(Table(["label"] + [f"{n} Dice %" for n in cands], rows))
    pair_rows = []
    for i, p in enumerate(report.get("pairs") or []):
        row = [p["pair"], fmt(p.get("dice_mean_before"), ".2f", 100)]
        for c in cands.values():
            rec = (c.get("pairs") or [])[i] if i < len(c.get("pairs") or []) else {}
            row.append("error" if rec.get("error") else fmt(rec.get("dice_mean"), ".2f", 100))
        pair_rows.append(row)
    if pair_rows:
        dice.blocks.append("Mean Dice per pair (%):")
        dice.blocks.append(Table(["pair", "before"] + list(cands), pair_rows))

    surf = Section("HD95 and DSC30")
    surf.blocks.append(
        "HD95: the 95th percentile of the symmetric surface distance between the fixed and the "
        "warped label (Learn2Reg: in voxels of the fixed grid; mm shown where the spacing is "
        "isotropic). DSC30: the 30th percentile of the per-pair mean Dice (the robustness "
        "figure of Learn2Reg; over few pairs it is close to the worst pair).")
    rows = []
    for n, c in cands.items():
        s, iso = c["summary"], iso_spacing(c)
        rows.append([n, fmt(s.get("dsc30"), ".2f", 100), fmt(s.get("dice_mean"), ".2f", 100),
                     fmt(s.get("hd95_mean"), ".2f"), fmt(s.get("hd95_mean"), ".1f",
                                                          iso or math.nan),
                     fmt(s.get("sdlogj"), ".4f"), fmt(s.get("folding_percent"), ".3f")])
    surf.blocks.append(Table(["candidate", "DSC30 %", "Dice %", "HD95 vox", "HD95 mm", "SDlogJ",
                              "folding %"], rows))
    if labels:
        rows = []
        for lab in labels:
            row = [lab_name(lab)]
            for c in cands.values():
                v, iso = _per_pair_label_mean(c, "hd95_per_label", lab), iso_spacing(c)
                row.append(fmt(v, ".2f") + (f" / {fmt(v, '.1f', iso)}" if iso and v is not None
                                            else ""))
            rows.append(row)
        surf.blocks.append("HD95 per label (voxels / mm, mean over pairs):")
        surf.blocks.append(Table(["label"] + [f"{n} HD95" for n in cands], rows))
    return [dice, surf]


def _md_cell(s: str) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def to_markdown(secs: list[Section]) -> str:
    out = []
    for i, sec in enumerate(secs):
        out.append(("# " if i == 0 else "## ") + sec.title)
        out.append("")
        for b in sec.blocks:
            if isinstance(b, Table):
                out.append("| " + " | ".join(_md_cell(h) for h in b.header) + " |")
                out.append("|" + "|".join("---" for _ in b.header) + "|")
                for r in b.rows:
                    out.append("| " + " | ".join(_md_cell(c) for c in r) + " |")
            elif isinstance(b, Image):
                out.append(f"![{b.caption}]({FIGURES}/{b.name})")
            else:
                out.append(str(b))
            out.append("")
    return "\n".join(out)


CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;
color:#222;max-width:1400px}.scroll{overflow-x:auto;max-width:100%;margin:8px 0 16px}
.scroll table{margin:0}@media (max-width:700px){body{margin:8px}th,td{white-space:nowrap}}
table{border-collapse:collapse;margin:8px 0 16px;font-size:13px}
th,td{border:1px solid #ccc;padding:3px 7px;text-align:right}th{background:#f2f2f2}
td:first-child,th:first-child,td.t{text-align:left}.PASS{color:#0a0;font-weight:bold}
.FAIL{color:#c00;font-weight:bold}img{max-width:100%;border:1px solid #ddd;margin:6px 0}
figure{margin:8px 0 20px}figcaption{font-size:12px;color:#555}code{background:#f5f5f5}"""


def _inline(text: str) -> str:
    """Escape, then render ``code`` and **bold** spans (the only Markdown used in paragraphs)."""
    t = html.escape(str(text))
    t = re.sub(r"`([^`]+)`", r"<code>\1</code>", t)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", t)


#: a cell that is a number (with an optional unit): right-aligned; any other text left-aligned
_NUMERIC = re.compile(
    r"^(-|[-+]?[\d.]+(e[-+]?\d+)?( / [\d.]+)?x?( ?(%|ms|mm|vox|voxel|points|MB))?)$")


def to_html(secs: list[Section]) -> str:
    body = []
    for i, sec in enumerate(secs):
        tag = "h1" if i == 0 else "h2"
        body.append(f"<{tag}>{html.escape(sec.title)}</{tag}>")
        for b in sec.blocks:
            if isinstance(b, Table):
                body.append('<div class="scroll"><table><thead><tr>' + "".join(
                    f"<th>{html.escape(h)}</th>" for h in b.header) + "</tr></thead><tbody>")
                for r in b.rows:
                    body.append("<tr>" + "".join(
                        f'<td class="{c}">{html.escape(c)}</td>' if c in ("PASS", "FAIL")
                        else f"<td>{html.escape(str(c))}</td>" if _NUMERIC.match(str(c))
                        else f'<td class="t">{html.escape(str(c))}</td>' for c in r) + "</tr>")
                body.append("</tbody></table></div>")
            elif isinstance(b, Image):
                data = base64.b64encode(b.png).decode("ascii")
                body.append(f'<figure><img alt="{html.escape(b.caption)}" '
                            f'src="data:image/png;base64,{data}"><figcaption>'
                            f"{html.escape(b.caption)}</figcaption></figure>")
            else:
                body.append(f"<p>{_inline(b)}</p>")
    title = html.escape(secs[0].title if secs else "validation report")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{title}</title><style>{CSS}</style></head><body>\n"
            + "\n".join(body) + "\n</body></html>\n")


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------
def render(report: dict[str, Any], figures: FigureCollector | None = None
           ) -> tuple[str, str, dict[str, bytes]]:
    """``(markdown, html, {figure name: png})`` -- everything in memory, nothing written."""
    from pddnet._files import jsonable

    report = jsonable(report)  # the numbers exactly as report.json holds them
    secs = build_document(report, figures)
    images = {b.name: b.png for s in secs for b in s.blocks if isinstance(b, Image)}
    return to_markdown(secs), to_html(secs), images


def write_report_files(report: dict[str, Any], out_dir, *, figures: FigureCollector | None = None,
                       overwrite: bool = False) -> dict[str, Path]:
    """Write ``report.md``, ``report.html``, ``figures/*.png`` and ``report.json``.

    Rendering happens before anything is written; the set is written as one transaction
    (:func:`pddnet._files.atomic_directory`): ``out_dir`` holds the previous report or the new
    complete one, whatever interrupts the write, and its other files are kept."""
    from pddnet._files import atomic_directory
    from pddnet.validation.report import REPORT_FILE, check_out_dir, write_report

    out = check_out_dir(out_dir, overwrite=overwrite)
    md, page, images = render(report, figures)
    ours = {REPORT_MD, REPORT_HTML, REPORT_FILE, FIGURES}
    with atomic_directory(out, overwrite=True, keep=lambda name: name not in ours) as stage:
        for name, png in images.items():
            with atomic_write(stage / FIGURES / name) as tmp:
                tmp.write_bytes(png)
        for name, text in ((REPORT_MD, md), (REPORT_HTML, page)):
            with atomic_write(stage / name) as tmp:
                tmp.write_text(text, encoding="utf-8")
        write_report(report, stage, overwrite=True)
    names = [f"{FIGURES}/{n}" for n in images] + [REPORT_MD, REPORT_HTML]
    return {Path(n).name: out / n for n in names} | {REPORT_FILE: out / REPORT_FILE}


__all__ = ["FigureCollector", "render", "write_report_files", "build_document", "to_markdown",
           "to_html", "check_png", "summary_rows", "fmt", "SUMMARY_HEADER"]
