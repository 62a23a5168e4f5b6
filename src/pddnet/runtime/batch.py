"""One fixed scan, one or more moving scans, from files to output folders (``pddnet register``).

The fixed scan's features are computed once and reused for every moving scan; with several
moving scans each gets its own subfolder of ``out`` (named after the file), and the time the
reuse saved is reported.

Before any registration: the output folder is locked and checked (an existing result is refused
unless ``overwrite``; a second writer is refused at once), and every moving scan and label map
is read and checked, so a bad third scan is found before the first is registered. All results
are written into one staging folder and appear together (:func:`pddnet._files.atomic_directory`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from pddnet._files import atomic_directory
from pddnet.data.io import DEFAULT_MAX_VOXELS
from pddnet.errors import PddnetError
from pddnet.runtime.outputs import OUTPUT_NAMES, write_outputs
from pddnet.runtime.preprocess import DEFAULT_SPACING_TOLERANCE, as_volume, check_labels
from pddnet.runtime.session import Registrar, RegistrationResult

PathLike = str | os.PathLike


@dataclass
class BatchItem:
    moving: Path
    out_dir: Path
    result: RegistrationResult


def output_dirs(out: Path, movings: Sequence[PathLike]) -> list[Path]:
    """``out`` itself for one moving scan, else ``out/<file stem>`` (made unique).

    The stem becomes one plain folder name: path separators and leading dots are replaced, so
    no file name (``...nii.gz``, ``..``) can place an output outside ``out``."""
    if len(movings) == 1:
        return [out]
    dirs, used = [], set()
    for m in movings:
        name = Path(m).name
        for ext in (".nii.gz", ".nii"):
            if name.lower().endswith(ext):
                name = name[: -len(ext)]
                break
        name = name.replace("/", "_").replace("\\", "_").lstrip(".").strip() or "moving"
        base, k = name, 2
        while name in used:
            name, k = f"{base}_{k}", k + 1
        used.add(name)
        dirs.append(out / name)
    return dirs


def register_files(model: PathLike, fixed: PathLike, movings: Sequence[PathLike], *,
                   out: PathLike, moving_labels: Sequence[PathLike] = (),
                   fixed_labels: PathLike | None = None, threads: int | None = None,
                   backend: str = "auto", providers: Sequence[str] | None = None,
                   overwrite: bool = False, spacing_tolerance: float = DEFAULT_SPACING_TOLERANCE,
                   l2r_half: bool = False, echo: Callable[[str], None] = print,
                   refine: Any = None, stages: int = 1,
                   stage2_model: PathLike | None = None,
                   precision: str | None = None,
                   max_voxels: int | None = DEFAULT_MAX_VOXELS) -> list[BatchItem]:
    """Register every moving scan to ``fixed`` and save each result; prints a table.

    ``model`` is a ``.onnx`` or a bundle (verified first; the selection is printed).
    ``refine``, ``stages``, ``stage2_model`` and ``precision`` (bundles) are passed to
    :class:`~pddnet.runtime.session.Registrar` (instance optimisation, two stages)."""
    if not movings:
        raise PddnetError("give at least one moving scan")
    if moving_labels and len(moving_labels) != len(movings):
        raise PddnetError(f"{len(moving_labels)} moving label maps for {len(movings)} moving "
                          "scans; give one label map per moving scan, in the same order")
    out = Path(out)
    dirs = output_dirs(out, movings)
    items: list[BatchItem] = []
    ours = OUTPUT_NAMES if len(dirs) == 1 else {d.name for d in dirs}  # other files are kept
    with atomic_directory(out, overwrite=overwrite, report=lambda s: echo(f"note: {s}"),
                          keep=lambda name: name not in ours) as stage, \
            Registrar(model, backend, threads, providers=list(providers) if providers else None,
                      spacing_tolerance=spacing_tolerance, refine=refine, stages=stages,
                      stage2_model=stage2_model, precision=precision,
                      max_voxels=max_voxels) as reg:
        if reg.selection is not None:
            echo(f"bundle {reg.bundle.source}: every file verified (SHA-256)")
            echo(reg.selection.describe())
        check_movings(reg, movings, moving_labels, max_voxels=max_voxels)
        reg.set_fixed(fixed, fixed_labels)
        for i, (m, d) in enumerate(zip(movings, dirs)):
            res = reg.register_moving(m, moving_labels[i] if moving_labels else None)
            write_outputs(res, stage / d.relative_to(out), l2r_half=l2r_half)
            res.saved_to = d
            items.append(BatchItem(Path(m), d, res))
            echo(f"{Path(m).name} -> {d}")
            for n in res.notes:
                if i == 0 or n.startswith("moving"):
                    echo(f"  {n}")
    echo(format_table(items))
    echo(reuse_line(items))
    return items


def check_movings(reg: Registrar, movings: Sequence[PathLike], labels: Sequence[PathLike] = (),
                  *, max_voxels: int | None = DEFAULT_MAX_VOXELS) -> None:
    """Read and check every moving scan and label map (and each label map against its scan and
    the model's label set) before the first registration."""
    for i, m in enumerate(movings):
        role = f"moving scan {i + 1} of {len(movings)}"
        try:
            vol = as_volume(m, kind="image", role=role, max_voxels=max_voxels)
        except PddnetError as exc:
            raise PddnetError(f"{role}: {exc}") from None
        if labels:
            check_labels(labels[i], vol, reg.info, role=f"moving labels {i + 1} of {len(movings)}",
                         max_voxels=max_voxels)


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}"


def _dice(v: float | None) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def format_table(items: Sequence[BatchItem]) -> str:
    """A fixed-width table: per-stage milliseconds and Dice before -> after, per moving scan."""
    extra = [k for k in ("refine", "stage2")
             if any(it.result.timings_ms.get(k) is not None for it in items)]
    head = ["moving", "preproc", "features", "head", *extra, "postproc", "metrics", "write",
            "total", "Dice before", "Dice after", "output"]
    rows = []
    for it in items:
        t = it.result.timings_ms
        total = sum(v for k, v in t.items() if v is not None and k != "load")
        m = it.result.metrics
        rows.append([it.moving.name, _ms(t["preprocess"]), _ms(t["features"]), _ms(t["head"]),
                     *(_ms(t.get(k)) for k in extra),
                     _ms(t["postprocess"]), _ms(t["metrics"]), _ms(t["write"]), _ms(total),
                     _dice(m.get("dice_mean_before")), _dice(m.get("dice_mean")),
                     str(it.out_dir)])
    widths = [max(len(r[c]) for r in [head] + rows) for c in range(len(head))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in [head] + rows]
    load = items[0].result.timings_ms["load"] if items else None
    return f"times in ms (model load {_ms(load)} ms, once)\n" + "\n".join(lines)


def reuse_line(items: Sequence[BatchItem]) -> str:
    if not items:
        return ""
    r = items[0].result.reuse
    if r["fixed_branch_ms"] is None:
        return "fixed features: not reused (the model could not be split)"
    cost = r["fixed_preprocess_ms"] + r["fixed_branch_ms"]
    line = (f"fixed scan prepared once: preprocess {r['fixed_preprocess_ms']:.0f} ms + features "
            f"{r['fixed_branch_ms']:.0f} ms")
    if len(items) > 1:
        line += (f"; reused for {len(items) - 1} more moving scan(s), saving {cost:.0f} ms each "
                 f"({cost * (len(items) - 1):.0f} ms in all)")
    return line
