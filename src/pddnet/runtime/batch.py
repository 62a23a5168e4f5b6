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
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from pddnet._files import atomic_directory, jsonable
from pddnet.data.io import DEFAULT_MAX_VOXELS, save_nifti
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
                   note: Callable[[str], None] | None = None,
                   refine: Any = None, stages: int = 1,
                   stage2_model: PathLike | None = None,
                   precision: str | None = None,
                   max_voxels: int | None = DEFAULT_MAX_VOXELS) -> list[BatchItem]:
    """Register every moving scan to ``fixed`` and save each result; prints a table.

    ``model`` is a ``.onnx`` or a bundle (verified first; the selection is printed).
    ``refine``, ``stages``, ``stage2_model`` and ``precision`` (bundles) are passed to
    :class:`~pddnet.runtime.session.Registrar` (instance optimisation, two stages). ``echo``
    prints results (the table, where each result went), ``note`` what was chosen and what to
    watch out for (default: ``echo`` with a ``note:`` prefix; the CLI sends notes to stderr)."""
    note = note or (lambda s: echo(f"note: {s}"))
    if not movings:
        raise PddnetError("give at least one moving scan")
    if moving_labels and len(moving_labels) != len(movings):
        raise PddnetError(f"{len(moving_labels)} moving label maps for {len(movings)} moving "
                          "scans; give one label map per moving scan, in the same order")
    out = Path(out)
    dirs = output_dirs(out, movings)
    items: list[BatchItem] = []
    ours = OUTPUT_NAMES if len(dirs) == 1 else {d.name for d in dirs}  # other files are kept
    with atomic_directory(out, overwrite=overwrite, report=note,
                          keep=lambda name: name not in ours) as stage, \
            Registrar(model, backend, threads, providers=list(providers) if providers else None,
                      spacing_tolerance=spacing_tolerance, refine=refine, stages=stages,
                      stage2_model=stage2_model, precision=precision,
                      max_voxels=max_voxels) as reg:
        if reg.selection is not None:
            note(f"bundle {reg.bundle.source}: every file verified (SHA-256)")
            note(reg.selection.describe())
        check_movings(reg, movings, moving_labels, max_voxels=max_voxels)
        reg.set_fixed(fixed, fixed_labels)
        for i, (m, d) in enumerate(zip(movings, dirs)):
            res = reg.register_moving(m, moving_labels[i] if moving_labels else None)
            write_outputs(res, stage / d.relative_to(out), l2r_half=l2r_half)
            res.saved_to = d
            items.append(BatchItem(Path(m), d, res))
            echo(f"{Path(m).name} -> {d}")
            for n in res.notes:
                if reg.selection is not None and n.startswith(f"bundle {reg.bundle.source}:"):
                    continue  # the selection was described above
                if i == 0 or n.startswith("moving"):
                    note(n)
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


# --------------------------------------------------------------------------------------------
# a whole Learn2Reg split into a submission folder (``pddnet register --data``)
# --------------------------------------------------------------------------------------------
#: the submission folder's record of what produced it (model, dataset, split, names)
SUBMISSION_MANIFEST = "pddnet_submission.json"
#: one JSON object per line and per pair, appended as each pair finishes
SUBMISSION_LOG = "log.jsonl"


def register_dataset(model: PathLike, data: PathLike, *, out: PathLike, split: str = "test",
                     names: str = "long", threads: int | None = None, backend: str = "auto",
                     providers: Sequence[str] | None = None, overwrite: bool = False,
                     spacing_tolerance: float = DEFAULT_SPACING_TOLERANCE,
                     echo: Callable[[str], None] = print,
                     note: Callable[[str], None] | None = None, progress: bool = True,
                     refine: Any = None, stages: int = 1, stage2_model: PathLike | None = None,
                     precision: str | None = None,
                     max_voxels: int | None = DEFAULT_MAX_VOXELS) -> dict[str, Any]:
    """Register every pair of a Learn2Reg dataset's ``split`` into a submission folder.

    ``out`` receives one ``disp_FFFF_mmmm_MMMM_nnnn.nii.gz`` per pair (the official
    evaluation's names, :func:`pddnet.data.learn2reg.submission_name`; ``names="short"`` for
    ``disp_FFFF_MMMM.nii.gz``): the field ``(i, j, k, 3)`` float32 in voxels of the fixed scan,
    what the evaluation reads. Beside them: :data:`SUBMISSION_LOG` (one JSON line per pair:
    files, metrics, timings, notes) and :data:`SUBMISSION_MANIFEST` (model SHA-256, dataset,
    split, names); the evaluation ignores both.

    - **Lock.** The folder's lock (:func:`pddnet._files.folder_lock`) is held throughout: a
      second writer of the same folder is refused at once.
    - **All or nothing per file.** Each field is written to a temporary file and renamed into
      place when complete; temporary files a killed run left are removed by the next one.
    - **Resume.** A pair whose file is already there, readable and of the right shape (the
      fixed scan's plus 3) is skipped (its metrics come from the log, or are computed from the
      file where the log has none); ``overwrite`` registers every pair again. A folder written
      for another model, dataset, split or name style is refused unless ``overwrite``, and so
      is a non-empty folder that is not a pddnet submission.
    - **Metrics** (pairs whose two label maps exist): exactly as the official evaluation
      computes them (:mod:`pddnet.metrics`: labels warped with zeros outside the grid, Dice,
      HD95 in voxels, SDlogJ with its ``+3``, the official ``num_foldings`` and the raw
      ``folding_percent``), over the dataset json's label list, and aggregated over pairs as
      it aggregates them (:func:`pddnet.metrics.aggregate`: ``mean``, ``std``, ``"30"``).

    Returns ``{"data", "json", "split", "out", "names", "model", "pairs": [one record per
    pair], "registered", "skipped", "aggregates", "timings_ms"}``.
    """
    import time

    from pddnet.data.learn2reg import Learn2RegDataset, submission_name

    t_start = time.perf_counter()
    ds = Learn2RegDataset(data)
    pairs = ds.pairs(split)
    if not pairs:
        raise PddnetError(f"{ds.json_path}: the {split} split lists no pairs; nothing to register")
    files = [submission_name(p, names) for p in pairs]
    dup = sorted({f for f in files if files.count(f) > 1})
    if dup:
        raise PddnetError(f"{ds.json_path}: several {split} pairs map to the same submission file "
                          f"({', '.join(dup[:3])}); the official names cannot tell them apart")
    for p in pairs:
        for s in (p.fixed, p.moving):
            if not s.image.exists():
                raise PddnetError(f"{ds.json_path}: {split} pair {p}: image {s.image} is missing; "
                                  "run `pddnet data info` on the dataset to list every problem")
    labels = [k for k in ds.label_names if k != 0] or None
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise PddnetError(f"{out} exists and is not a folder; choose another output path")
    created = [p for p in (out, *out.parents) if not p.exists()]  # removed again if unused
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PddnetError(f"cannot create {out} ({exc.strerror}); choose a writable location")
    try:
        return _register_pairs(ds, pairs, files, labels, model, out, split=split, names=names,
                               threads=threads, backend=backend, providers=providers,
                               overwrite=overwrite, spacing_tolerance=spacing_tolerance,
                               echo=echo, note=note or (lambda s: echo(f"note: {s}")),
                               progress=progress, refine=refine, stages=stages,
                               stage2_model=stage2_model, precision=precision,
                               max_voxels=max_voxels, t_start=t_start, data=data)
    except BaseException:
        for d in created:  # innermost first; rmdir refuses a folder that holds anything
            try:
                d.rmdir()
            except OSError:
                break
        raise


def _register_pairs(ds, pairs, files, labels, model, out, *, split, names, threads, backend,
                    providers, overwrite, spacing_tolerance, echo, note, progress, refine, stages,
                    stage2_model, precision, max_voxels, t_start, data) -> dict[str, Any]:
    """The body of :func:`register_dataset` once the inputs are checked and ``out`` exists."""
    import time

    from pddnet._files import folder_lock, sha256_file
    from pddnet._progress import progress_bar

    records: list[dict[str, Any]] = []
    with folder_lock(out), \
            Registrar(model, backend, threads,
                      providers=list(providers) if providers else None,
                      spacing_tolerance=spacing_tolerance, refine=refine, stages=stages,
                      stage2_model=stage2_model, precision=precision,
                      max_voxels=max_voxels) as reg:
        reg.metric_labels = labels
        for removed in _clean_partials(out):
            note(removed)
        manifest = {"kind": "pddnet Learn2Reg submission", "model_sha256": reg.info.sha256,
                    "dataset_json": str(ds.json_path.resolve()), "split": split, "names": names,
                    "refine": refine.as_dict() if hasattr(refine, "as_dict") else refine,
                    "stages": stages}
        _check_manifest(out, manifest, overwrite)
        if reg.selection is not None:
            note(f"bundle {reg.bundle.source}: every file verified (SHA-256)")
            note(reg.selection.describe())
        from pddnet._files import write_json

        write_json(out / SUBMISSION_MANIFEST, manifest)
        logged = _read_log(out / SUBMISSION_LOG)
        fixed_key = None
        bar = progress_bar(list(zip(pairs, files)), desc=f"register {split}", unit="pair",
                   disable=not progress, file=sys.stderr, leave=True)
        for index, (pair, name) in enumerate(bar):
            target = out / name
            shape = _fixed_shape(pair)
            rec: dict[str, Any] = {"index": index, "split": split,
                                   "fixed": _rel(ds, pair.fixed.image),
                                   "moving": _rel(ds, pair.moving.image), "file": name}
            if not overwrite and _complete(target, shape):
                sha = sha256_file(target)
                old = logged.get(name)
                if old is not None and old.get("sha256") == sha and "metrics" in old:
                    rec.update(status="skipped", sha256=sha, metrics=old["metrics"],
                               timings_ms=old.get("timings_ms"), notes=old.get("notes", []))
                else:
                    t0 = time.perf_counter()
                    rec.update(status="scored", sha256=sha,
                               metrics=_score_file(target, pair, labels),
                               timings_ms={"metrics": (time.perf_counter() - t0) * 1e3},
                               notes=["an earlier run wrote this file; metrics computed from it"])
                    _append_log(out / SUBMISSION_LOG, rec)
            else:
                key = (pair.fixed.image, pair.fixed.label)
                if key != fixed_key:
                    reg.set_fixed(pair.fixed.image, _existing(pair.fixed.label))
                    fixed_key = key
                res = reg.register_moving(pair.moving.image, _existing(pair.moving.label))
                t0 = time.perf_counter()
                save_nifti(target, res.disp, res.affine)
                res.timings_ms["write"] = (time.perf_counter() - t0) * 1e3
                notes = list(res.notes)
                if res.disp.shape[:3] != shape:  # cannot happen: the field is on the fixed grid
                    raise PddnetError(f"internal: field {res.disp.shape} for fixed {shape}")
                if res.inputs["fixed"]["shape"] != res.inputs["moving"]["shape"]:
                    notes.append("fixed and moving grids differ; the official evaluation "
                                 "assumes one grid per pair")
                rec.update(status="registered", sha256=sha256_file(target),
                           metrics=jsonable(res.metrics),
                           timings_ms={k: (None if v is None else round(v, 3))
                                       for k, v in res.timings_ms.items()}, notes=notes)
                _append_log(out / SUBMISSION_LOG, rec)
            records.append(rec)
            d = rec["metrics"].get("dice_mean")
            if progress and d is not None:
                bar.set_postfix_str(f"Dice {d:.3f}", refresh=False)
        bar.close()
    result = {
        "data": str(data), "json": str(ds.json_path), "split": split, "out": str(out),
        "names": names, "model": {"path": str(model), "sha256": manifest["model_sha256"]},
        "pairs": records,
        "registered": sum(r["status"] == "registered" for r in records),
        "skipped": sum(r["status"] != "registered" for r in records),
        "aggregates": _aggregates(records),
        "timings_ms": {"total": (time.perf_counter() - t_start) * 1e3},
    }
    return result


def _rel(ds: Any, p: Path) -> str:
    try:
        return "./" + p.relative_to(ds.root).as_posix()
    except ValueError:
        return str(p)


def _existing(p: Path | None) -> Path | None:
    return p if p is not None and p.exists() else None


def _fixed_shape(pair: Any) -> tuple[int, int, int]:
    import nibabel as nib

    try:
        shape = tuple(int(n) for n in nib.load(str(pair.fixed.image)).shape)
    except Exception as exc:  # nibabel raises many types
        raise PddnetError(f"cannot read {pair.fixed.image}: {type(exc).__name__}: {exc}; run "
                          "`pddnet data info` on the dataset to list every problem") from None
    return shape[:3]  # type: ignore[return-value]


def _complete(path: Path, shape: tuple[int, int, int]) -> bool:
    """The file is a readable NIfTI field ``shape + (3,)`` of finite floats."""
    import nibabel as nib

    if not path.is_file():
        return False
    try:
        img = nib.load(str(path))
        if tuple(img.shape) != tuple(shape) + (3,):
            return False
        arr = np.asanyarray(img.dataobj)
        return bool(np.issubdtype(arr.dtype, np.floating) and np.isfinite(arr).all())
    except Exception:  # a truncated or foreign file: register the pair again
        return False


def _score_file(path: Path, pair: Any, labels: list[int] | None) -> dict[str, Any]:
    """Metrics of a field already on disk, computed as the official evaluation computes them."""
    import nibabel as nib

    from pddnet import metrics as M
    from pddnet.data.io import load_nifti

    disp = np.asarray(nib.load(str(path)).get_fdata(), np.float64)
    fl, ml = _existing(pair.fixed.label), _existing(pair.moving.label)
    if fl is None or ml is None:
        return jsonable({"sdlogj": M.sdlogj(disp), **M.folding_counts(disp)})
    fixed = load_nifti(fl, kind="label").array
    moving = load_nifti(ml, kind="label").array
    warped = M.warp_labels(moving, disp)
    out = M.pair_metrics(fixed, moving, warped, disp, labels=labels)
    out["dice_mean_before"] = M.mean_dice(fixed, moving, moving, labels=labels)
    return jsonable(out)


def _aggregates(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The official aggregates over the pairs that have each metric."""
    from pddnet import metrics as M

    out: dict[str, Any] = {}
    for key, metric in (("dice_mean", "dice"), ("hd95_mean", "hd95"), ("sdlogj", "sdlogj")):
        vals = [r["metrics"].get(key) for r in records if key in r["metrics"]]
        if vals:
            agg = M.aggregate([math.nan if v is None else v for v in vals], metric)
            out[metric] = {**agg, "cases": len(vals)}
    fold = [r["metrics"].get("folding_percent") for r in records]
    if fold and all(v is not None for v in fold):
        out["folding_percent"] = {"mean": float(np.mean(fold)), "cases": len(fold)}
    return jsonable(out)


def _clean_partials(out: Path) -> list[str]:
    notes = []
    for p in sorted(out.glob(".*.partial*")):
        if p.is_file():
            p.unlink(missing_ok=True)
            notes.append(f"removed {p.name}, left in {out} by an interrupted pddnet run")
    return notes


def _check_manifest(out: Path, manifest: dict[str, Any], overwrite: bool) -> None:
    from pddnet._files import read_json

    path = out / SUBMISSION_MANIFEST
    if path.exists():
        try:
            old = read_json(path)
        except PddnetError:
            old = None
        if not isinstance(old, dict):
            old = {}
        diff = [k for k in ("model_sha256", "dataset_json", "split", "names", "refine", "stages")
                if old.get(k) != manifest[k]]
        if diff and not overwrite:
            raise PddnetError(f"{out} holds a submission made with another {', '.join(diff)} "
                              f"(see {SUBMISSION_MANIFEST}); choose another folder or pass "
                              "--overwrite to register every pair again")
        return
    others = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    if others and not overwrite:
        more = f" and {len(others) - 5} more" if len(others) > 5 else ""
        raise PddnetError(f"{out} already holds {', '.join(others[:5])}{more}, which is not a "
                          "pddnet submission; choose another folder, or pass --overwrite to "
                          "write into it")


def _read_log(path: Path) -> dict[str, dict[str, Any]]:
    """The last complete record per file name (a torn last line is ignored)."""
    import json

    out: dict[str, dict[str, Any]] = {}
    if not path.exists():
        return out
    for line in path.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("file"), str):
            out[rec["file"]] = rec
    return out


def _append_log(path: Path, record: dict[str, Any]) -> None:
    """Append one JSON line with one ``write`` on an ``O_APPEND`` descriptor, then fsync: a
    reader sees whole lines only (a line torn by a crash is skipped by :func:`_read_log`)."""
    import json
    from datetime import datetime, timezone

    rec = {"time": datetime.now(timezone.utc).isoformat(timespec="seconds"), **record}
    data = (json.dumps(jsonable(rec), allow_nan=False) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
