"""``pddnet package``: a deployment bundle -- models, input contract, validation evidence,
checksums -- and optionally a ``.tar.gz`` of it and a Triton model repository.

What goes in (``docs/bundle.md`` has the layout and the manifest schema):

- the ONNX graphs (``--onnx`` FP32, ``--fp16``, ``--int8``), byte for byte, each in
  ``models/<precision>/`` with what it refers to (its stage-two model, external data files);
- TensorRT engines (``--engine``: a folder written by ``pddnet build`` or single ``.engine``
  files, each with its metadata ``.json``), matched to the bundled graph they were built from by
  the model hash their metadata records; an engine from no bundled graph, an incomplete set
  (``features`` without ``head``) or an engine whose bytes do not match its metadata is refused;
- the validation evidence: ``REPORT_DIR/report.json`` of ``pddnet validate`` (and its
  ``report.md``/``report.html``/``figures``), and per model the candidates whose ``model_sha256``
  is that file's: gates, Dice difference, displacement difference, latency. A model with no
  passing candidate is refused unless ``allow_unvalidated`` (it is then marked so, and the
  runtime runs it only when asked for by precision);
- ``preprocessing.json`` (every model must share the same contract) and ``manifest.json``
  (versions, models, the SHA-256 and size of every file), written last.

Everything is staged in a hidden folder beside the output and renamed into place only after the
staged bundle passed the runtime's own verification (:func:`pddnet.runtime.bundle.verify_folder`),
so an error or Ctrl-C leaves no partial bundle; an existing output is refused unless
``overwrite``. Torch-free.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import tarfile
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import onnx

from pddnet._files import atomic_directory, atomic_write, sha256_bytes, sha256_file, write_json
from pddnet.errors import PddnetError
from pddnet.graph.model import LoadedModel, load_model
from pddnet.runtime.bundle import MANIFEST, PREPROCESSING, SCHEMA, verify_folder
from pddnet.spec import contract as C
from pddnet.spec.config import INTENSITY_FORMULAS, Intensity
from pddnet.spec.metadata import metadata_value
from pddnet.validation.compare import GATE_LABELS, gate_phrase

PRECISIONS = ("fp32", "fp16", "int8")
REPORT_FILES = ("report.json", "report.md", "report.html")
#: the contract every bundled model must share (ModelInfo fields)
CONTRACT_FIELDS = ("image_shape", "spacing_mm", "intensity", "orientation")


@dataclass
class SourceModel:
    """An ONNX graph to bundle: checked with the runtime's loader, plus its companion files."""

    id: str
    precision: str
    path: Path
    loaded: LoadedModel
    sha256: str
    companions: list[Path] = field(default_factory=list)   # relative to path.parent
    stage2: str | None = None                               # companion file name

    @property
    def rel(self) -> str:
        return f"models/{self.id}/{self.path.name}"


@dataclass
class EngineSet:
    """TensorRT engines of one bundled graph for one GPU/TensorRT (``parts``: label -> file)."""

    id: str
    model: SourceModel
    precision: str
    env: dict[str, Any]
    plugins: str
    hardware_compat: str
    parts: dict[str, Path] = field(default_factory=dict)
    records: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class PackageResult:
    bundle: Path | None
    tar: Path | None
    triton: Path | None
    manifest: dict[str, Any]
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------
def collect_model(path: str | os.PathLike, precision: str) -> SourceModel:
    """Load ``path`` with the runtime's checks and make sure it is a ``precision`` graph."""
    from pddnet.backends.trt.build import model_precision

    p = Path(path)
    loaded = load_model(p)  # refuses truncated files, escaping external data, foreign models
    actual = model_precision(loaded.proto)
    if actual != precision:
        flag = "--onnx" if precision == "fp32" else f"--{precision}"
        raise PddnetError(f"{flag} {p}: this is a {actual} graph (its {C.META_PRECISION} metadata "
                          f"/ tensor types), not {precision}; give each precision's graph to its "
                          "own option")
    companions: list[Path] = []
    raw = onnx.load(str(p), load_external_data=False)
    from pddnet.graph.model import all_tensors

    for t in all_tensors(raw):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            loc = {e.key: e.value for e in t.external_data}.get("location", "")
            if Path(loc) not in companions:
                companions.append(Path(loc))  # load_model checked it stays in the folder
    stage2 = None
    link = metadata_value(loaded.proto, C.META_STAGE2, where=str(p), default=None)
    if link is not None:
        name = str(link.get("file", ""))
        if not name or "/" in name or "\\" in name or name in (".", ".."):
            raise PddnetError(f"{p}: its {C.META_STAGE2} metadata names {name!r}; a stage-two "
                              "model must be a file next to the model (re-export with --stage2)")
        s2 = p.parent / name
        if not s2.is_file():
            raise PddnetError(f"{p} names the stage-two model {name!r}, which is not next to it; "
                              "copy it there (or re-export with `pddnet export --stage2`)")
        if link.get("sha256") and sha256_file(s2) != link["sha256"]:
            raise PddnetError(f"{s2}: not the stage-two model {p.name} was exported with (its "
                              "SHA-256 differs from the one in the model's metadata)")
        load_model(s2)
        companions.append(Path(name))
        stage2 = name
    return SourceModel(precision, precision, p, loaded, loaded.info.sha256 or sha256_file(p),
                       companions, stage2)


def check_contract(models: Sequence[SourceModel]) -> dict[str, Any]:
    """The shared input contract (``preprocessing.json``); refuse models that differ."""
    first = models[0].loaded.info
    want = {k: _plain(getattr(first, k)) for k in CONTRACT_FIELDS}
    for m in models[1:]:
        got = {k: _plain(getattr(m.loaded.info, k)) for k in CONTRACT_FIELDS}
        diff = [k for k in CONTRACT_FIELDS if got[k] != want[k]]
        if diff:
            raise PddnetError(f"{m.path}: its input contract differs from {models[0].path} in "
                              f"{diff} ({[got[k] for k in diff]} vs {[want[k] for k in diff]}); "
                              "a bundle's models must share one pre-processing contract")
    from pddnet.runtime.preprocess import DEFAULT_SPACING_TOLERANCE

    return {
        "inputs": [C.INPUT_FIXED, C.INPUT_MOVING], "dtype": "float32",
        "shape": [1, 1, *want["image_shape"]],
        **want,
        "normalisation": INTENSITY_FORMULAS[Intensity.from_dict(want["intensity"]).mode],
        "resampling": "the model grid is image_shape voxels over the fixed scan's field of view "
                      "(RAS+ after reorientation, voxel faces aligned, align_corners=False); "
                      "trilinear; the moving scan through the affines when on another grid",
        "spacing_tolerance": DEFAULT_SPACING_TOLERANCE,
        "outputs": {"disp": "(I, J, K, 3) float32, voxels of the model grid, warped(x) = "
                            "moving(x + disp(x)), channel a along axis a"},
        "num_labels": first.num_labels,
        "runtime": "pddnet.runtime.preprocess (prepare_fixed / prepare_moving) implements this",
    }


def _plain(v: Any) -> Any:
    return json.loads(json.dumps(v))


def read_report(report_dir: str | os.PathLike) -> dict[str, Any]:
    d = Path(report_dir)
    path = d / "report.json" if d.is_dir() else d
    if not path.is_file():
        raise PddnetError(f"--report {report_dir}: no report.json there; run `pddnet validate "
                          "... --out REPORT_DIR` first (a bundle carries the validation its "
                          "models passed)")
    try:
        report = json.loads(path.read_text())
    except ValueError as exc:
        raise PddnetError(f"{path} is not valid JSON ({exc}); re-run `pddnet validate`") from exc
    from pddnet.validation.compare import SCHEMA as REPORT_SCHEMA

    if not isinstance(report, dict) or report.get("schema") != REPORT_SCHEMA:
        raise PddnetError(f"{path}: not a `pddnet validate` report (schema "
                          f"{report.get('schema') if isinstance(report, dict) else None!r}, "
                          f"expected {REPORT_SCHEMA!r})")
    return report


def _device(cand: dict[str, Any]) -> str:
    provs = (cand.get("describe") or {}).get("providers") or []
    if cand.get("backend") in ("tensorrt", "trt"):
        return "gpu"
    return "cuda" if any("CUDA" in p or "Tensorrt" in p for p in provs) else "cpu"


def candidate_summary(c: dict[str, Any]) -> dict[str, Any]:
    s, lat, mem = c.get("summary") or {}, c.get("latency") or {}, c.get("memory") or {}
    return {
        "name": c.get("name"), "backend": c.get("backend"), "precision": c.get("precision"),
        "mode": c.get("mode", "ff"), "device": _device(c), "passed": bool(c.get("passed")),
        "emulated": str(c.get("name", "")).endswith("-emulated"),
        "gates": [{k: g.get(k) for k in ("metric", "threshold", "measured", "unit", "passed",
                                          "reason")} for g in c.get("gates", [])],
        "dice_mean": s.get("dice_mean"),
        "delta_dice_points_max_abs": s.get("delta_dice_points_max_abs"),
        "disp_diff_max_vox": s.get("disp_diff_max_vox"),
        "disp_diff_p99_mm": s.get("disp_diff_p99_mm"),
        "disp_diff_max_mm": s.get("disp_diff_max_mm"),
        "latency": {k: lat.get(k) for k in ("p50_ms", "p95_ms", "p99_ms", "n")},
        "speedup_vs_reference": c.get("speedup_vs_reference"),
        "peak_rss_mb": mem.get("peak_rss_mb"),
    }


def validation_for(report: dict[str, Any], sha: str, *, trt: bool,
                   precision: str | None = None) -> dict[str, Any] | None:
    """The report's evidence for the model with SHA-256 ``sha`` (ONNX Runtime candidates, or
    TensorRT ones with ``trt``); ``None`` when no candidate ran it."""
    mine = []
    for c in (report.get("candidates") or {}).values():
        if c.get("reference") or c.get("model_sha256") != sha:
            continue
        is_trt = c.get("backend") in ("tensorrt", "trt")
        if is_trt != trt or (precision and c.get("precision") != precision):
            continue
        mine.append(c)
    if not mine:
        return None
    # `pddnet validate --fp16` also runs NAME-emulated: the same graph with float16 storage
    # emulated (a temporary file, so not matched by SHA-256) -- evidence for this graph too
    names = {c.get("name") for c in mine}
    mine += [c for c in (report.get("candidates") or {}).values()
             if any(c.get("name") == f"{n}-emulated" for n in names) and c not in mine]
    ff = [c for c in mine if c.get("mode", "ff") == "ff"] or mine
    ref = (report.get("candidates") or {}).get(report.get("reference")) or {}
    mach = report.get("machine") or {}
    return {
        "passed": all(bool(c.get("passed")) for c in ff),
        "report": "validation/report.json",
        "report_created": report.get("created"),
        "report_status": report.get("status"),
        "pairs": (report.get("settings") or {}).get("pairs"),
        "split": (report.get("settings") or {}).get("split"),
        "machine": {k: mach.get(k) for k in ("cpu_model", "usable_cores", "threads",
                                             "onnxruntime", "pddnet")},
        "reference": {"name": ref.get("name"),
                      "dice_mean": (ref.get("summary") or {}).get("dice_mean"),
                      "p50_ms": (ref.get("latency") or {}).get("p50_ms")},
        "candidates": [candidate_summary(c) for c in ff + [c for c in mine if c not in ff]],
    }




def apply_precision_gates(val: dict[str, Any] | None, precision: str,
                          gates: dict[str, float | None]) -> dict[str, Any] | None:
    """Check the feed-forward candidates of the evidence ``val`` of a ``precision`` model
    against the displacement ``gates`` in mm (``{"disp_diff_p99_mm": 1.0, "disp_diff_max_mm":
    2.0}``; ``None`` values are not checked); FP32 models are not gated here (their gates are
    the validation's, against the PyTorch reference). Each check is appended to the
    candidate's ``gates`` (``"source": "package"``) and ``passed`` is recomputed. The values
    are the report's summaries: the worst pair's p99 / max over voxels, so a pass means every
    pair passed. A report without values in mm (older than these gates) fails them."""
    if val is None or precision == "fp32":
        return val
    active = {k: float(v) for k, v in gates.items() if v is not None}
    if not active:
        return val
    for c in val["candidates"]:
        if c.get("mode", "ff") != "ff":
            continue
        have = {g.get("metric") for g in c.get("gates") or []}
        for key, thr in active.items():
            if key in have and any(g.get("threshold") == thr for g in c["gates"]
                                   if g.get("metric") == key):
                continue  # the validation already checked this very gate
            v = c.get(key)
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and v <= thr
            if v is None:
                reason = ("not in the report (validated before displacement gates in mm "
                          "existed); re-run `pddnet validate`")
            else:
                reason = f"{v:.2f} mm {'<=' if ok else '>'} {thr:g} mm (worst pair)"
            c.setdefault("gates", []).append({"metric": key, "threshold": thr, "measured": v,
                                              "unit": "mm", "passed": ok, "reason": reason,
                                              "source": "package"})
        c["passed"] = bool(c.get("passed")) and all(g.get("passed") for g in c["gates"])
    ff = [c for c in val["candidates"] if c.get("mode", "ff") == "ff"] or val["candidates"]
    val["passed"] = all(c["passed"] for c in ff)
    return val


def gate_failures(val: dict[str, Any] | None) -> list[str]:
    """Every failed gate of the evidence, one short phrase each ("p99 |Δu| 1.80 mm > 1 mm
    gate (onnxruntime-int8)"); empty when it passed."""
    out = []
    for c in (val or {}).get("candidates") or []:
        if not isinstance(c, dict) or c.get("passed"):
            continue
        for g in c.get("gates") or []:
            if not isinstance(g, dict) or g.get("passed"):
                continue
            out.append(f"{gate_phrase(g)} ({c.get('name')})")
    return out


def explain_selection(manifest: dict[str, Any], selection: Any) -> list[dict[str, Any]]:
    """Why each model of the bundle was or was not chosen by ``selection``
    (:class:`pddnet.runtime.bundle.Selection`): ``[{model_id, precision, kind, chosen, why}]``,
    e.g. ``int8 not chosen: p99 |Δu| 1.8 mm > 1 mm gate (onnxruntime-int8)``."""
    usable = {(o.model_id): o for o in getattr(selection, "considered", [])}
    out = []
    for m in manifest.get("models") or []:
        if not isinstance(m, dict):
            continue
        mid, prec = m.get("id"), m.get("precision")
        val = m.get("validation") if isinstance(m.get("validation"), dict) else None
        chosen = mid == selection.model_id
        if chosen:
            why = f"{prec} chosen: {selection.reason}"
        elif val is None:
            why = (f"{prec} not chosen: not validated (bundled with --allow-unvalidated); "
                   "it runs only when asked for with --precision")
        elif not val.get("passed"):
            fails = gate_failures(val)
            why = (f"{prec} not chosen: " + ("; ".join(fails) if fails else "validation failed")
                   + "; it runs only when asked for with --precision")
        elif mid in usable and not usable[mid].usable:
            why = f"{prec} not chosen: cannot run here ({usable[mid].why})"
        else:
            why = (f"{prec} not chosen: validated, but {selection.precision} is preferred "
                   f"({selection.reason})")
        out.append({"model_id": mid, "precision": prec, "kind": m.get("kind"),
                    "chosen": chosen, "why": why})
    return out


def collect_engines(paths: Sequence[str | os.PathLike],
                    models: Sequence[SourceModel]) -> list[EngineSet]:
    """Group the given engines by (graph, precision, GPU/TensorRT, plugins) and check them."""
    files = _engine_files(paths)
    parts, runtime_labels = _engine_part_index(models)
    sets: dict[tuple, EngineSet] = {}
    for f in files:
        _add_engine(sets, f, _read_engine_record(f), parts)
    out = []
    for n, es in enumerate(sets.values(), 1):
        _check_engine_set(es, runtime_labels[es.model.id])
        es.id = f"trt-{es.precision}-{n}"
        out.append(es)
    return out


def _engine_files(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """The ``.engine`` files named by ``--engine`` (files, or folders of them)."""
    from pddnet.backends.trt import cache as ec

    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(p.glob(f"*{ec.ENGINE_SUFFIX}"))
            if not found:
                raise PddnetError(f"--engine {p}: no *.engine files in this folder (give the "
                                  "folder `pddnet build --out` wrote, or .engine files)")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise PddnetError(f"--engine {p}: no such file or folder")
    return files


def _engine_part_index(models: Sequence[SourceModel]
                       ) -> tuple[dict[str, tuple[SourceModel, str]], dict[str, set[str]]]:
    """The model hash of every part an engine may be built from -> (graph, part label), and per
    graph the part labels the runtime runs."""
    from pddnet.backends.trt.build import model_bytes, runtime_parts

    parts: dict[str, tuple[SourceModel, str]] = {}
    runtime_labels: dict[str, set[str]] = {}
    for m in models:
        for label, part in runtime_parts(m.loaded.proto, whole=True):
            parts[sha256_bytes(model_bytes(part))] = (m, label)
        runtime_labels[m.id] = {lab for lab, _ in runtime_parts(m.loaded.proto)}
    return parts, runtime_labels


def _read_engine_record(f: Path) -> dict[str, Any]:
    """The metadata record of engine ``f``, refused unless readable and matching its bytes."""
    from pddnet.backends.trt import cache as ec

    meta = ec.meta_path_for(f)
    record = ec.read_record(meta)
    if record is None:
        raise PddnetError(f"--engine {f}: no readable metadata file {meta.name} beside it; an "
                          "engine is never bundled without the record `pddnet build` writes")
    if record.get("format") != ec.ENGINE_FORMAT:
        raise PddnetError(f"--engine {f}: metadata format {record.get('format')!r}, expected "
                          f"{ec.ENGINE_FORMAT}")
    if sha256_file(f) != record.get("engine_sha256"):
        raise PddnetError(f"--engine {f}: the file does not match the SHA-256 recorded when it "
                          "was built (truncated or altered); rebuild it with `pddnet build`")
    return record


def _add_engine(sets: dict[tuple, EngineSet], f: Path, record: dict[str, Any],
                parts: dict[str, tuple[SourceModel, str]]) -> None:
    """Put engine ``f`` into its set in ``sets`` (keyed by graph, precision, GPU/TensorRT,
    plugins, hardware compatibility), matched to its graph by model hash."""
    from pddnet.backends.trt import cache as ec

    key = record.get("key", {})
    hit = parts.get(key.get("model_sha256", ""))
    if hit is None:
        raise PddnetError(f"--engine {f}: built from a model that is none of the bundled "
                          f"graphs (or their features/head parts); give the .onnx it was "
                          "built from")
    model, label = hit
    if record.get("label") != label:
        raise PddnetError(f"--engine {f}: its metadata says part {record.get('label')!r}, but "
                          f"its model hash is the {label!r} part of {model.path}")
    env = record.get("env", {})
    gk = (model.id, key.get("precision"), tuple(env.get(k) for k in ec.ENV_FIELDS),
          key.get("plugins"), key.get("hardware_compat", "none"))
    if gk not in sets:
        sets[gk] = EngineSet("", model, str(key.get("precision")), dict(env),
                             str(key.get("plugins")), str(key.get("hardware_compat", "none")))
    es = sets[gk]
    if label in es.parts:
        raise PddnetError(f"--engine: two engines for the same part {label!r} of {model.path} "
                          f"on the same GPU/TensorRT: {es.parts[label].name}, {f.name}")
    es.parts[label] = f
    es.records[label] = record


def _check_engine_set(es: EngineSet, need: set[str]) -> None:
    """Refuse a set lacking a part the runtime runs, or of another precision than its graph."""
    missing = sorted(need - set(es.parts))
    if missing:
        raise PddnetError(f"--engine: the {es.precision} engines of {es.model.path} for "
                          f"{es.env.get('gpu_name')} / TensorRT {es.env.get('trt_version')} "
                          f"lack the part(s) {missing} the runtime runs (has "
                          f"{sorted(es.parts)}); build them all with `pddnet build`")
    if es.precision != es.model.precision:
        raise PddnetError(f"--engine: {es.parts[next(iter(es.parts))].name} is a "
                          f"{es.precision} engine of the {es.model.precision} graph "
                          f"{es.model.path}")


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------
def _copy(src: Path, dst: Path) -> None:
    with atomic_write(dst) as tmp:
        shutil.copyfile(src, tmp)


def versions() -> dict[str, Any]:
    import numpy
    import onnxruntime

    from pddnet import __version__

    return {"pddnet": __version__, "python": platform.python_version(), "numpy": numpy.__version__,
            "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "platform": platform.platform()}


@dataclass
class _Targets:
    """Where ``package`` writes: the bundle folder, the archive, the Triton repository."""

    folder: Path | None
    tar: Path | None
    triton: Path | None

    @property
    def paths(self) -> list[Path]:
        return [p for p in (self.folder, self.tar, self.triton) if p is not None]


@dataclass
class _Contents:
    """What goes into the outputs, gathered and checked before anything is written."""

    name: str
    models: list[SourceModel]
    engines: list[EngineSet]
    contract: dict[str, Any]
    report_path: Path                  # the folder holding report.json
    manifest_base: dict[str, Any]      # manifest.json without "files"
    notes: list[str]


def package(onnx_model: str | os.PathLike, *, report_dir: str | os.PathLike,
            fp16: str | os.PathLike | None = None, int8: str | os.PathLike | None = None,
            engines: Sequence[str | os.PathLike] = (), out: str | os.PathLike | None = None,
            tar: bool = False, triton: str | os.PathLike | None = None,
            triton_options: Any = None, allow_unvalidated: bool = False,
            overwrite: bool = False, name: str | None = None,
            echo: Callable[[str], None] = print, max_disp_p99_mm: float | None = 1.0,
            max_disp_mm: float | None = 2.0) -> PackageResult:
    """Write the bundle ``out`` (folder; ``*.tar.gz`` for an archive only; ``tar`` adds
    ``out.tar.gz`` beside the folder) and/or the Triton repository ``triton``.

    FP16 and INT8 models (graphs and engines) must also pass the displacement gates in mm
    ``max_disp_p99_mm`` / ``max_disp_mm`` against the reference (:func:`apply_precision_gates`;
    ``None``: not checked); the gates are recorded in the manifest (``precision_gates``).

    Every output path is checked before any work; nothing partial is left on failure."""
    targets = _check_targets(out, tar, triton, overwrite)
    models = _collect_models(onnx_model, fp16, int8)
    contract = check_contract(models)
    report = read_report(report_dir)
    gates = {"disp_diff_p99_mm": max_disp_p99_mm, "disp_diff_max_mm": max_disp_mm}
    for k, v in gates.items():
        if v is not None and not (isinstance(v, (int, float)) and v >= 0 and v < float("inf")):
            raise PddnetError(f"package: the {k} gate must be a finite number >= 0 mm, got {v!r}")
    notes: list[str] = []
    entries = [_model_entry(m, _validation(report, m, allow_unvalidated, notes, gates))
               for m in models]
    esets = collect_engines(engines, models) if engines else []
    entries += [_engine_entry(es, _engine_validation(report, es, allow_unvalidated, notes,
                                                     gates))
                for es in esets]
    bundle_name = name or _default_name(targets)
    contents = _Contents(bundle_name, models, esets, contract, _report_folder(report_dir),
                         _manifest_base(bundle_name, esets, contract, entries, report, notes,
                                        gates),
                         notes)
    result = _write_outputs(targets, contents, triton_options=triton_options,
                            overwrite=overwrite, echo=echo)
    for n in notes:
        echo(f"note: {n}")
    return result


def _check_targets(out: str | os.PathLike | None, tar: bool,
                   triton: str | os.PathLike | None, overwrite: bool) -> _Targets:
    """The output paths, refused when missing, clashing or already there (unless
    ``overwrite``)."""
    if out is None and triton is None:
        raise PddnetError("nothing to write: give --out BUNDLE and/or --triton DIR")
    out_p = Path(out) if out is not None else None
    tar_only = out_p is not None and out_p.name.lower().endswith((".tar.gz", ".tgz"))
    folder = None if out_p is None or tar_only else out_p
    tar_p = out_p if tar_only else (Path(f"{out_p}.tar.gz") if out_p is not None and tar else None)
    targets = _Targets(folder, tar_p, Path(triton) if triton is not None else None)
    paths = targets.paths
    if len({p.resolve() for p in paths}) != len(paths):
        raise PddnetError(f"--out/--triton name the same path: {[str(p) for p in paths]}")
    for a in paths:  # a bundle holds exactly its manifest's files: nothing may be written in it
        for b in paths:
            if a is not b and a.resolve() in b.resolve().parents:
                raise PddnetError(f"{a} would be written inside {b}; the bundle folder, its "
                                  "archive and the Triton repository must be separate paths")
    for p in paths:
        if p.exists() and not overwrite:
            raise PddnetError(f"{p} already exists; choose another path or pass --overwrite")
        if p.exists() and p is not tar_p and not p.is_dir():
            raise PddnetError(f"{p} exists and is not a folder; choose another path")
        if p is tar_p and p.exists() and p.is_dir():
            raise PddnetError(f"{p} is a folder; choose another archive name")
    return targets


def _collect_models(onnx_model: str | os.PathLike, fp16: str | os.PathLike | None,
                    int8: str | os.PathLike | None) -> list[SourceModel]:
    """The FP32 graph and the optional FP16/INT8 ones, refusing the same graph twice."""
    models = [collect_model(onnx_model, "fp32")]
    for path, prec in ((fp16, "fp16"), (int8, "int8")):
        if path is not None:
            models.append(collect_model(path, prec))
    shas = [m.sha256 for m in models]
    if len(set(shas)) != len(shas):
        raise PddnetError("the same graph was given twice (--onnx/--fp16/--int8 have equal "
                          "SHA-256)")
    return models


def _report_folder(report_dir: str | os.PathLike) -> Path:
    report_path = Path(report_dir)
    return report_path if report_path.is_dir() else report_path.parent


def _validation(report: dict[str, Any], m: SourceModel, allow: bool,
                notes: list[str], gates: dict[str, float | None]) -> dict[str, Any] | None:
    """The evidence for ONNX graph ``m`` (refused or noted when it did not pass)."""
    val = apply_precision_gates(validation_for(report, m.sha256, trt=False), m.precision, gates)
    _require_validation(val, f"{m.path} ({m.precision})", allow, notes)
    return val


def _engine_validation(report: dict[str, Any], es: EngineSet, allow: bool,
                       notes: list[str], gates: dict[str, float | None]) -> dict[str, Any] | None:
    """The evidence for the engines ``es`` (refused or noted when they did not pass)."""
    val = apply_precision_gates(
        validation_for(report, es.model.sha256, trt=True, precision=es.precision),
        es.precision, gates)
    _require_validation(val, f"the {es.precision} TensorRT engines of {es.model.path} for "
                             f"{es.env.get('gpu_name')}", allow, notes)
    return val


def _model_entry(m: SourceModel, val: dict[str, Any] | None) -> dict[str, Any]:
    """The manifest's ``models`` entry of an ONNX graph."""
    return {
        "id": m.id, "kind": "onnx", "precision": m.precision, "file": m.rel,
        "stage2": f"models/{m.id}/{m.stage2}" if m.stage2 else None,
        "sha256": m.sha256, "outputs": list(m.loaded.info.outputs),
        "opset": next((o.version for o in m.loaded.proto.opset_import if o.domain in
                       ("", "ai.onnx")), None),
        "ir_version": m.loaded.proto.ir_version,
        "source": m.loaded.info.source, "config": m.loaded.info.config,
        "backends": ["onnxruntime", "tensorrt"], "validation": val}


def _engine_entry(es: EngineSet, val: dict[str, Any] | None) -> dict[str, Any]:
    """The manifest's ``models`` entry of a set of TensorRT engines."""
    entry = {
        "id": es.id, "kind": "tensorrt", "precision": es.precision, "model": es.model.id,
        "engines": {lab: f"engines/{p.name}" for lab, p in sorted(es.parts.items())
                    if lab != "full"},
        "full": f"engines/{es.parts['full'].name}" if "full" in es.parts and
                len(es.parts) > 1 else None,
        "env": es.env, "plugins": es.plugins, "hardware_compat": es.hardware_compat,
        "jit_ops": sorted({o for r in es.records.values()
                           for o in (r.get("binding") or {}).get("jit_ops", [])}),
        "validation": val}
    if set(es.parts) == {"full"}:
        entry["engines"] = {"full": f"engines/{es.parts['full'].name}"}
    return entry


def _default_name(targets: _Targets) -> str:
    """The bundle's name when none is given: the folder's, else the archive's, else pddnet."""
    if targets.folder is not None:
        return targets.folder.name
    return targets.tar.name.split(".tar")[0].split(".tgz")[0] if targets.tar else "pddnet"


def _manifest_base(bundle_name: str, esets: Sequence[EngineSet], contract: dict[str, Any],
                   entries: list[dict[str, Any]], report: dict[str, Any],
                   notes: list[str], gates: dict[str, float | None]) -> dict[str, Any]:
    """``manifest.json`` but its ``files`` (known only once the bundle is staged)."""
    return {
        "schema": SCHEMA,
        "name": bundle_name,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": {**versions(),
                     "tensorrt": sorted({str(es.env.get("trt_version")) for es in esets})},
        "preprocessing": contract,
        "models": entries,
        "validation": {"report": "validation/report.json", "status": report.get("status"),
                       "created": report.get("created"),
                       "failed_gates": len(report.get("failed_gates") or [])},
        "precision_gates": {"applies_to": ["fp16", "int8"], "unit": "mm", **gates,
                            "rule": "every pair: p99 / max over the fixed grid's voxels of "
                                    "|u_candidate - u_reference| in mm"},
        "notes": notes,
    }


def _write_into(stage: Path, contents: _Contents) -> dict[str, Any]:
    """Write the bundle into the empty folder ``stage``, manifest last, and verify it."""
    _copy_files(stage, contents)
    write_json(stage / PREPROCESSING, contents.contract)
    manifest = {**contents.manifest_base, "files": _file_index(stage)}
    write_json(stage / MANIFEST, manifest)
    verify_folder(stage, where="staged bundle")  # the runtime's own checks, before renaming
    return manifest


def _copy_files(stage: Path, contents: _Contents) -> None:
    """Copy the models (with companions), engines (with metadata) and validation report."""
    for m in contents.models:
        _copy(m.path, stage / m.rel)
        for comp in m.companions:
            _copy(m.path.parent / comp, stage / f"models/{m.id}" / comp)
    for es in contents.engines:
        for f in es.parts.values():
            from pddnet.backends.trt.cache import meta_path_for

            _copy(f, stage / "engines" / f.name)
            _copy(meta_path_for(f), stage / "engines" / meta_path_for(f).name)
    report_path = contents.report_path
    for fname in REPORT_FILES:
        if (report_path / fname).is_file():
            _copy(report_path / fname, stage / "validation" / fname)
    figs = report_path / "figures"
    if figs.is_dir() and (report_path / "report.md").is_file():
        for f in sorted(figs.glob("*.png")):
            _copy(f, stage / "validation" / "figures" / f.name)


def _file_index(stage: Path) -> dict[str, dict[str, Any]]:
    """The manifest's ``files``: SHA-256 and size of every file under ``stage``."""
    files = {}
    for p in sorted(stage.rglob("*")):
        if p.is_file():
            rel = p.relative_to(stage).as_posix()
            files[rel] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    return files


def _write_outputs(targets: _Targets, contents: _Contents, *, triton_options: Any,
                   overwrite: bool, echo: Callable[[str], None]) -> PackageResult:
    """Write the folder, archive and Triton repository; on any failure remove those of them
    this call created."""
    result = PackageResult(None, None, None, {}, contents.notes)
    fresh = [p for p in targets.paths if not p.exists()]  # removed again if a later output fails
    try:
        if targets.folder is not None:
            _write_folder(result, targets.folder, contents, overwrite, echo)
        if targets.tar is not None:
            _write_archive(result, targets.tar, targets.folder, contents, echo)
        if targets.triton is not None:
            _write_triton(result, targets.triton, contents, triton_options, overwrite, echo)
    except BaseException:
        _remove(fresh)  # all or nothing: outputs this call created before the failure
        raise
    if not result.manifest:
        result.manifest = {**contents.manifest_base, "files": {}}
    return result


def _write_folder(result: PackageResult, folder: Path, contents: _Contents, overwrite: bool,
                  echo: Callable[[str], None]) -> None:
    with atomic_directory(folder, overwrite=overwrite) as stage:
        result.manifest = _write_into(stage, contents)
    result.bundle = folder
    echo(f"wrote bundle {folder} ({len(result.manifest['files'])} files, "
         f"{_size(folder) / 1e6:.1f} MB)")


def _write_archive(result: PackageResult, tar_p: Path, folder: Path | None,
                   contents: _Contents, echo: Callable[[str], None]) -> None:
    """The ``.tar.gz``: of the written ``folder``, else of a bundle staged just for it."""
    if folder is not None:
        write_tar(folder, tar_p, contents.name)
    else:
        tar_p.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f".{tar_p.name}.", dir=tar_p.parent) as td:
            stage = Path(td) / contents.name
            stage.mkdir()
            result.manifest = _write_into(stage, contents)
            write_tar(stage, tar_p, contents.name)
    result.tar = tar_p
    echo(f"wrote {tar_p} ({tar_p.stat().st_size / 1e6:.1f} MB)")


def _write_triton(result: PackageResult, triton_p: Path, contents: _Contents,
                  triton_options: Any, overwrite: bool, echo: Callable[[str], None]) -> None:
    from pddnet.deploy.triton import TritonOptions, write_repository

    opts = triton_options or TritonOptions()
    written = write_repository(triton_p, contents.models, contents.engines, contents.contract,
                               opts, overwrite=overwrite, notes=contents.notes)
    result.triton = triton_p
    echo(f"wrote Triton model repository {triton_p}: {', '.join(written)}")


def _remove(paths: Sequence[Path]) -> None:
    for p in paths:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        elif p.exists():
            p.unlink()


def _require_validation(val: dict[str, Any] | None, what: str, allow: bool,
                        notes: list[str]) -> None:
    if val is not None and val["passed"]:
        return
    why = ("no candidate of the report ran this exact file (matched by SHA-256)" if val is None
           else "its validation gates failed: " + "; ".join(
               f"{c['name']}: " + ", ".join(
                   f"{GATE_LABELS.get(g.get('metric'), g.get('metric'))} {g['reason']}"
                   for g in c["gates"] if not g["passed"])
               for c in val["candidates"] if not c["passed"]))
    if not allow:
        raise PddnetError(f"{what}: not validated ({why}); validate it with `pddnet validate` "
                          "and pass that --report, or pass --allow-unvalidated to bundle it "
                          "marked as such (the runtime then runs it only when asked for)")
    notes.append(f"{what} is bundled unvalidated ({why})")


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def write_tar(folder: Path, dest: Path, arcname: str) -> Path:
    """``dest`` (gzip tar) with ``folder``'s files under ``arcname/``, written atomically."""
    with atomic_write(dest) as tmp:
        with tarfile.open(tmp, "w:gz") as tf:
            for p in sorted(folder.rglob("*")):
                if p.is_file():
                    info = tf.gettarinfo(str(p), arcname=f"{arcname}/{p.relative_to(folder).as_posix()}")
                    info.uid = info.gid = 0
                    info.uname = info.gname = ""
                    with open(p, "rb") as fh:
                        tf.addfile(info, fh)
    return dest


__all__ = ["package", "PackageResult", "collect_model", "collect_engines", "check_contract",
           "read_report", "validation_for", "write_tar", "apply_precision_gates",
           "gate_failures", "explain_selection", "SourceModel", "EngineSet"]
