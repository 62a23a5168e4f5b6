"""The calibration commands as library functions (``pddnet calibrate``, ``pddnet export
--precision fp16``, ``pddnet sensitivity``) and the demo's entry point.

* :func:`calibrate` -- FP32 ``.onnx`` + dataset -> ``<stem>.int8.onnx`` (Q/DQ), ``ranges.json``,
  ``calibration.{flatbuffers,cache,json}``; torch-free.
* :func:`export_fp16` -- checkpoint -> FP16 ``.onnx`` with a keep-FP32 list (the exporter
  writes the graph in float16 directly; needs torch like ``pddnet export``).
* :func:`run_search` -- the sensitivity search of :mod:`pddnet.calibration.search`: every
  block alone in FP16 (storage emulated, see :func:`pddnet.graph.passes.fp16_storage.
  emulate_fp16_storage`) and in INT8, the choice within the gates, the chosen graphs with
  the decision in their metadata, ``sensitivity.json`` and ``sensitivity.md``.
* :func:`demo_graphs` -- what ``pddnet demo`` calls.
* :func:`audit_fp16` -- which of an FP16 graph's tensors ONNX Runtime's CPU provider really
  keeps in float16.
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import onnx

from pddnet._files import atomic_directory, check_writable
from pddnet.calibration import graphs as G
from pddnet.calibration.blocks import DEFAULT_INT8_BLOCKS, fp16_plan, profile_blocks, resolve_keep
from pddnet.calibration.search import (
    DEFAULT_GATES,
    Decision,
    DispGates,
    Evaluator,
    Measure,
    blocks_of,
    choose,
    load_average,
    timestamp,
)
from pddnet.errors import PddnetError
from pddnet.graph.passes.fp16_storage import emulate_fp16_storage
from pddnet.spec import contract as C
from pddnet.spec.metadata import read_metadata, set_metadata

Echo = Callable[[str], None]
RANGES_FILES = ("ranges.json", "calibration.flatbuffers", "calibration.cache", "calibration.json")


def _say(echo: Echo | None) -> Echo:
    return echo or (lambda s: None)


def _save(model: onnx.ModelProto, path, *, overwrite: bool = True) -> Path:
    from pddnet._files import atomic_write

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, overwrite=overwrite) as tmp:
        onnx.save_model(model, str(tmp))
    return path


def precision_path(model_path, precision: str) -> Path:
    """``model.onnx`` -> ``model.fp16.onnx`` / ``model.int8.onnx`` (same folder)."""
    p = Path(model_path)
    stem = p.name[:-len(".onnx")] if p.name.endswith(".onnx") else p.name
    for suffix in (".fp32", ".fp16", ".int8"):
        if stem.endswith(suffix):
            stem = stem[:-len(suffix)]
    return p.with_name(f"{stem}.{precision}.onnx")


# ---------------------------------------------------------------------------------------------
# INT8: pddnet calibrate
# ---------------------------------------------------------------------------------------------
def calibrate(onnx_path, data_dir, out_dir, *, method: str = "minmax", pairs: int | None = None,
              split: str = "train", blocks: Sequence[str] | None = None,
              overwrite: bool = False, progress: bool = True, echo: Echo | None = None,
              table: bool = True) -> dict[str, Any]:
    """``pddnet calibrate``: the INT8 graph of ``onnx_path`` and its ranges (module docstring).

    ``blocks`` default :data:`~pddnet.calibration.blocks.DEFAULT_INT8_BLOCKS`. Returns
    ``{"int8": path, "ranges": {file: path}, "blocks": [...], "nodes": [...], "qdq": summary,
    "notes": [...]}``. Raises :class:`PddnetError` for a graph that is already quantised, an
    empty or unusable dataset, fewer pairs than asked for, or existing outputs without
    ``overwrite``."""
    from pddnet.calibration.data import PairReader
    from pddnet.calibration.int8 import build_int8, check_fp32_input, qdq_summary, write_tables
    from pddnet.graph.model import load_model

    say = _say(echo)
    loaded = load_model(onnx_path)
    check_fp32_input(loaded.proto, where=str(onnx_path))
    blocks = blocks_of(blocks if blocks is not None else DEFAULT_INT8_BLOCKS)
    if not blocks:
        raise PddnetError("calibrate: no block to quantise")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise PddnetError(f"{out} exists and is not a folder")
    target = out / precision_path(onnx_path, "int8").name
    existing = [p for p in [target, *(out / f for f in RANGES_FILES)] if p.exists()]
    if existing and not overwrite:
        raise PddnetError(f"{existing[0]} already exists; pass --overwrite to replace it")
    check_writable(out)
    reader = PairReader(data_dir, loaded.info, split=split, pairs=pairs, progress=progress)
    for n in reader.notes:
        say(f"note: {n}")
    q, ranges, info = build_int8(loaded.proto, blocks, reader, method=method, table=table,
                                 echo=say)
    meta = read_metadata(q)[C.META_PRECISION]
    meta["source_fp32"] = {"file": Path(onnx_path).name, "sha256": loaded.info.sha256}
    set_metadata(q, C.META_PRECISION, meta)
    ours = {target.name, *RANGES_FILES}  # written as one transaction; other files are kept
    with atomic_directory(out, overwrite=True, keep=lambda name: name not in ours) as stage:
        staged = write_tables(ranges, stage, method=method, merged_pairs=info["pairs"],
                              quantised=_quantised_tensors(q))
        _save(q, stage / target.name)
    files = {name: out / Path(p).name for name, p in staged.items()}
    path = target
    say(f"wrote {path} ({len(info['nodes'])} quantised nodes in {blocks})")
    return {"int8": path, "ranges": files, "blocks": blocks, "nodes": info["nodes"],
            "qdq": qdq_summary(q), "notes": list(reader.notes)}


def _quantised_tensors(q: onnx.ModelProto) -> set[str]:
    return {n.input[0] for n in q.graph.node if n.op_type == "QuantizeLinear"}


# ---------------------------------------------------------------------------------------------
# FP16: pddnet export --precision fp16
# ---------------------------------------------------------------------------------------------
def keep_blocks_for(checkpoint, keep: Sequence[str] | None, *, image_shape=None) -> list[str]:
    """Resolve a keep-FP32 list (blocks, node names, op types) against the checkpoint's graph."""
    if keep is None or all(k in C.BLOCKS or k == "none" for k in keep):
        return resolve_keep(keep)
    from pddnet.export.onnx_export import export_model
    from pddnet.model.checkpoint import load_model

    model, ckpt = load_model(checkpoint)
    shape = tuple(image_shape or ckpt.get("image_shape") or (24, 24, 24))
    proto = export_model(model, shape)
    ops = {n.name: n.op_type for n in proto.graph.node}
    return resolve_keep(keep, G.block_map(proto), ops)


def export_fp16(checkpoint, out, *, keep_fp32: Sequence[str] | None = None, image_shape=None,
                outputs=(), overwrite: bool = False, stage2=False) -> tuple[Path, list[str]]:
    """``pddnet export --precision fp16``: the FP16 graph, every block float16 except the
    resolved keep-FP32 blocks (default
    :data:`~pddnet.calibration.blocks.DEFAULT_KEEP_FP32`). Returns ``(path, kept blocks)``."""
    from pddnet.export.onnx_export import export_checkpoint

    kept = keep_blocks_for(checkpoint, keep_fp32, image_shape=image_shape)
    plan = fp16_plan(kept)
    if all(p == "fp32" for p in plan.values()):
        raise PddnetError("--precision fp16 with every block kept in FP32 is the FP32 graph; "
                          "drop some --keep-fp32 entries")
    path = export_checkpoint(checkpoint, out, image_shape=image_shape, outputs=outputs,
                             overwrite=overwrite, stage2=stage2, precision=plan)
    return path, kept


# ---------------------------------------------------------------------------------------------
# FP16 audit: what ONNX Runtime's CPU provider keeps in float16
# ---------------------------------------------------------------------------------------------
def audit_fp16(model, *, optimization: str = "all") -> dict[str, Any]:
    """Compare the float16 tensors an FP16 graph declares with what ONNX Runtime runs.

    Loads the graph in an ONNX Runtime CPU session (the runtime's optimisation level), saves
    the optimised graph and propagates element types through it (Cast ``to``, float16
    initializers, otherwise the first float input's type). Returns the declared float16
    tensors (functions inlined), those still float16 in the optimised graph, the casts ONNX
    Runtime inserted (``InsertedPrecisionFreeCast_*``: ops without a float16 kernel run in
    float32 between them), the declared casts it removed, and the op types that run with
    float16 inputs (``ops_in_fp16``) versus float32. On this provider an FP16 graph is mostly
    float32 arithmetic, and even storage rounding survives only where a float16 tensor is
    kept (docs/precision.md)."""
    import onnxruntime as ort

    from pddnet.graph.passes.inline import inline_named

    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model))
    inlined, _ = inline_named(proto)
    inferred = onnx.shape_inference.infer_shapes(inlined)
    declared = {vi.name for vi in inferred.graph.value_info
                if vi.type.tensor_type.elem_type == G.F16}
    declared_casts = {n.name for n in inlined.graph.node if n.op_type == "Cast"}
    levels = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
              "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    with tempfile.TemporaryDirectory(prefix="pddnet-audit-") as tmp:
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.graph_optimization_level = levels[optimization]
        so.optimized_model_filepath = os.path.join(tmp, "optimized.onnx")
        ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
        opt = onnx.load(so.optimized_model_filepath)
    types: dict[str, int] = {i.name: i.type.tensor_type.elem_type for i in opt.graph.input}
    types.update({t.name: t.data_type for t in opt.graph.initializer})
    floats = (G.F16, G.F32)
    in_fp16: dict[str, int] = {}
    in_fp32: dict[str, int] = {}
    for n in opt.graph.node:
        if n.op_type == "Cast":
            to = next(a.i for a in n.attribute if a.name == "to")
            for o in n.output:
                types[o] = to
            continue
        if n.op_type == "Constant":
            t = n.attribute[0].t if n.attribute else None
            for o in n.output:
                types[o] = t.data_type if t is not None else G.F32
            continue
        fin = [types.get(i) for i in n.input if i and types.get(i) in floats]
        t = fin[0] if fin else G.F32
        for o in n.output:
            types[o] = t
        if fin:
            (in_fp16 if t == G.F16 else in_fp32)[n.op_type] = \
                (in_fp16 if t == G.F16 else in_fp32).get(n.op_type, 0) + 1
    kept = sorted(t for t in declared if types.get(t) == G.F16)
    inserted = [n.name for n in opt.graph.node if n.name.startswith("InsertedPrecisionFreeCast")]
    remaining = {n.name for n in opt.graph.node if n.op_type == "Cast"}
    removed = sorted(c for c in declared_casts if c not in remaining)
    return {
        "declared_fp16_tensors": len(declared),
        "fp16_tensors_in_ort": len(kept),
        "fp16_tensors_in_ort_examples": kept[:10],
        "ort_inserted_casts": len(inserted),
        "declared_casts": len(declared_casts),
        "declared_casts_removed_by_ort": len(removed),
        "ops_in_fp16": dict(sorted(in_fp16.items())),
        "ops_in_fp32": dict(sorted(in_fp32.items())),
        "optimization": optimization,
        "onnxruntime": ort.__version__,
        "note": ("ONNX Runtime's CPU provider has float16 kernels for few ops: it inserts casts "
                 "and computes the others in float32, and drops the float32->float16->float32 "
                 "rounding of the activations it passes through; on this provider the FP16 "
                 "graph mostly measures float16-rounded weights and constants. The sensitivity "
                 "search uses an FP16-storage emulation instead (docs/precision.md)."),
    }


# ---------------------------------------------------------------------------------------------
# the sensitivity search
# ---------------------------------------------------------------------------------------------
@dataclass
class _Search:
    """What the steps of :func:`run_search` share."""

    say: Echo
    out: Path                                 #: the output folder
    work: Path                                #: ``out/search``: the trial graphs, removed at the end
    export: Callable[..., onnx.ModelProto]    #: precision plan (or None) -> checked ONNX graph
    fp32_path: Path
    fp32: onnx.ModelProto
    ev: Evaluator                             #: measures a graph against the FP32 reference
    costs: dict[str, Any]                     #: FP32 kernel time per block (profile_blocks)
    doc: dict[str, Any]                       #: the sensitivity.json document being filled
    disp_gates: DispGates = DispGates()       #: displacement gates in mm beside the Dice gate


def run_search(checkpoint, data_dir, out_dir, *, precisions: Sequence[str] = ("fp16", "int8"),
               split: str = "val", max_pairs: int | None = None, calib_split: str = "train",
               calib_pairs: int | None = None, method: str = "minmax",
               gates: dict[str, float] | None = None, threads: int | None = 2,
               repeats: int = 5, blocks: Sequence[str] | None = None, outputs=(),
               overwrite: bool = False, progress: bool = True,
               echo: Echo | None = None,
               disp_gates: DispGates | None = None) -> dict[str, Any]:
    """``pddnet sensitivity``: measure every block alone in each precision, choose, write.

    Writes into ``out_dir``: ``model.onnx`` (the FP32 export of ``checkpoint``),
    ``model.fp16.onnx`` / ``model.int8.onnx`` (the chosen assignments, decision in
    ``pddnet.precision``), ``ranges.json`` and ``calibration.*`` (INT8), ``sensitivity.json``
    and ``sensitivity.md``, as one transaction (:func:`pddnet._files.atomic_directory`: the
    folder keeps its previous result until the search is complete; its other files are
    kept). Returns the ``sensitivity.json`` document.

    ``disp_gates``: the displacement gates in mm every chosen block and combination must pass
    beside the Dice gate (default :class:`~pddnet.calibration.search.DispGates`: p99 |Δu| <=
    1 mm, max |Δu| <= 2 mm on every pair)."""
    from pddnet._optional import require

    require("torch", "pddnet sensitivity (it exports the checkpoint)")
    say = _say(echo)
    gates = {**DEFAULT_GATES, **(gates or {})}
    disp_gates = disp_gates if disp_gates is not None else DispGates()
    precisions = _check_precisions(precisions)
    cand_blocks = blocks_of(blocks if blocks is not None else C.BLOCKS)
    final = _check_search_folder(out_dir, overwrite)
    ours = {"model.onnx", "model.fp16.onnx", "model.int8.onnx", "sensitivity.json",
            "sensitivity.md", "search", *RANGES_FILES}
    with atomic_directory(final, overwrite=True, keep=lambda name: name not in ours) as out:
        doc = _search(out, checkpoint, data_dir, say=say, gates=gates, precisions=precisions,
                      cand_blocks=cand_blocks, outputs=outputs, split=split,
                      max_pairs=max_pairs, threads=threads, calib_split=calib_split,
                      calib_pairs=calib_pairs, method=method, progress=progress,
                      repeats=repeats, final=final, disp_gates=disp_gates)
    return doc


def _search(out: Path, checkpoint, data_dir, *, say, gates, precisions, cand_blocks, outputs,
            split, max_pairs, threads, calib_split, calib_pairs, method, progress, repeats,
            final: Path, disp_gates: DispGates) -> dict[str, Any]:
    """The search in the staging folder ``out`` of the result folder ``final``."""
    work = out / "search"
    work.mkdir()
    started = timestamp()
    load_start = load_average()
    export, shape, source = _checkpoint_exporter(checkpoint, outputs)
    fp32_path, fp32, ev = _fp32_reference(export, out, data_dir, split=split,
                                          max_pairs=max_pairs, threads=threads, say=say)
    info, costs = _profile_fp32(fp32, fp32_path, ev, threads=threads, say=say)
    doc = _new_doc(checkpoint, data_dir, split=split, started=started, source=source,
                   shape=shape, ev=ev, threads=threads, gates=gates, precisions=precisions,
                   cand_blocks=cand_blocks, costs=costs, load_start=load_start)
    doc["disp_gates_mm"] = disp_gates.as_dict()
    s = _Search(say, out, work, export, fp32_path, fp32, ev, costs, doc, disp_gates)
    if "fp16" in precisions:
        _search_fp16(s, cand_blocks, gate=gates["fp16"])
    if "int8" in precisions:
        reader = _int8_reader(s, data_dir, info, split=calib_split, pairs=calib_pairs,
                              method=method, progress=progress)
        _search_int8(s, cand_blocks, reader, method=method, gate=gates["int8"],
                     repeats=repeats)
    s.doc["files"] = {k: str(final / Path(v).relative_to(out)) for k, v in s.doc["files"].items()}
    return _finish(s)


def _check_precisions(precisions: Sequence[str]) -> list[str]:
    precisions = [p for p in precisions]
    bad = sorted(set(precisions) - {"fp16", "int8"})
    if bad or not precisions:
        raise PddnetError(f"precisions must be fp16 and/or int8, got {precisions}")
    return precisions


def _check_search_folder(out_dir, overwrite: bool) -> Path:
    """The output folder, refused when it holds a ``sensitivity.json``, unless ``overwrite``."""
    out = Path(out_dir)
    if (out / "sensitivity.json").exists() and not overwrite:
        raise PddnetError(f"{out / 'sensitivity.json'} already exists; pass --overwrite")
    return out


def _checkpoint_exporter(checkpoint, outputs) -> tuple[Callable[..., onnx.ModelProto],
                                                       tuple, dict[str, str]]:
    """``(export, image shape, source)``: ``export(precision=None)`` writes the checkpoint's
    network as a checked ONNX graph with the given precision plan."""
    from pddnet._files import sha256_file
    from pddnet.model.checkpoint import load_model as load_ckpt

    net, ckpt = load_ckpt(checkpoint)
    shape = tuple(ckpt.get("image_shape") or ())
    if len(shape) != 3:
        raise PddnetError(f"{checkpoint} records no image shape")
    spacing = (ckpt.get("metadata") or {}).get("spacing_mm")
    source = {"checkpoint": Path(checkpoint).name, "checkpoint_sha256": sha256_file(checkpoint)}

    def export(precision=None):
        from pddnet.export.onnx_export import check_model, export_model

        return check_model(export_model(net, shape, spacing_mm=spacing, outputs=outputs,
                                        source=source, precision=precision))

    return export, shape, source


def _fp32_reference(export, out: Path, data_dir, *, split: str, max_pairs: int | None,
                    threads: int | None, say: Echo) -> tuple[Path, onnx.ModelProto, Evaluator]:
    """Write ``model.onnx`` (FP32) and register the ``split`` pairs with it: the reference."""
    from pddnet.graph.model import load_model

    fp32_path = _save(export(), out / "model.onnx")
    fp32 = load_model(fp32_path).proto
    say(f"FP32 graph {fp32_path.name}; registering the {split} pairs with it (the reference)")
    ev = Evaluator(fp32_path, data_dir, split=split, max_pairs=max_pairs, threads=threads,
                   echo=say)
    say(f"reference: {len(ev.pairs)} pair(s), mean Dice {100 * ev.reference_dice():.2f} %")
    return fp32_path, fp32, ev


def _profile_fp32(fp32: onnx.ModelProto, fp32_path: Path, ev: Evaluator, *,
                  threads: int | None, say: Echo) -> tuple[Any, dict[str, Any]]:
    """``(model info, costs)``: the FP32 kernel time per block on the first reference pair."""
    from pddnet.graph.model import load_model
    from pddnet.runtime.preprocess import prepare_fixed, prepare_moving

    fixed, moving, _, _ = ev.loaded[0]
    info = load_model(fp32_path).info
    pf = prepare_fixed(fixed, info)
    feeds = {C.INPUT_FIXED: pf.array, C.INPUT_MOVING: prepare_moving(moving, pf, info).array}
    costs = profile_blocks(fp32, feeds, threads=threads, runs=2)
    say("FP32 kernel time per block (ms): " + ", ".join(
        f"{b} {v:.0f}" for b, v in costs["blocks"].items()))
    return info, costs


def _new_doc(checkpoint, data_dir, *, split: str, started: str, source: dict[str, str],
             shape: tuple, ev: Evaluator, threads: int | None, gates: dict[str, float],
             precisions: list[str], cand_blocks: list[str], costs: dict[str, Any],
             load_start) -> dict[str, Any]:
    """The ``sensitivity.json`` document before any precision is searched."""
    return {
        "schema": "pddnet.sensitivity/1", "created": started, "checkpoint": str(checkpoint),
        "checkpoint_sha256": source["checkpoint_sha256"], "image_shape": list(shape),
        "data": str(data_dir), "split": split, "pairs": [str(p) for p in ev.pairs],
        "reference_dice": ev.reference_dice(), "threads": threads,
        "gates_points": {p: gates[p] for p in precisions}, "blocks": cand_blocks,
        "fp32_block_ms": costs, "results": {}, "decisions": {}, "files": {},
        "machine": {"load_average_start": load_start}, "notes": [],
    }


def _say_alone(say: Echo, block: str, m: Measure) -> None:
    mm = "" if m.disp_p99_mm is None else \
        f" (p99 {m.disp_p99_mm:.2f} mm, max {m.disp_max_mm:.2f} mm)"
    say(f"  {block:<12} |dDice| max {m.delta_dice_max:.3f} pt, max |du| {m.disp_max:.3f} vox"
        + mm + (f" ({m.error})" if m.error else ""))


def _finish(s: _Search) -> dict[str, Any]:
    """Close the document, write ``sensitivity.json`` / ``.md``, remove the trial graphs."""
    from pddnet.calibration.report import write_sensitivity

    s.doc["machine"]["load_average_end"] = load_average()
    s.doc["finished"] = timestamp()
    s.doc["evaluations"] = s.ev.runs
    write_sensitivity(s.doc, s.out)
    shutil.rmtree(s.work, ignore_errors=True)
    return s.doc


# -- FP16 ---------------------------------------------------------------------------------------
def _fp16_measurer(s: _Search) -> Callable[[list[str], str], Measure]:
    """``measure(chosen, name)``: the emulated-FP16 graph with ``chosen`` blocks in float16,
    saved as ``search/fp16_<name>.onnx`` and measured (once per set of blocks)."""
    cache: dict[tuple, Measure] = {}

    def fp16_measure(chosen: list[str], name: str) -> Measure:
        key = tuple(sorted(chosen))
        if key not in cache:
            plan = {b: "fp16" for b in chosen}
            path = _save(emulate_fp16_storage(s.export(plan)), s.work / f"fp16_{name}.onnx")
            cache[key] = s.ev.measure(path)
        return cache[key]

    return fp16_measure


def _search_fp16(s: _Search, cand_blocks: list[str], *, gate: float) -> None:
    """Every block alone in (emulated) FP16, the choice within ``gate``, ``model.fp16.onnx``."""
    s.say("FP16: each block alone (float16 storage emulated in float32 arithmetic)")
    fp16_measure = _fp16_measurer(s)
    alone: dict[str, Measure] = {}
    for b in cand_blocks:
        alone[b] = fp16_measure([b], b)
        _say_alone(s.say, b, alone[b])
    saving = {b: s.costs["blocks"].get(b, 0.0) for b in cand_blocks}
    dec = choose(cand_blocks, alone, saving,
                 lambda chosen: fp16_measure(chosen, "+".join(chosen)),
                 gate=gate, precision="fp16", min_saving=0.0, disp_gates=s.disp_gates)
    s.doc["results"]["fp16"] = {b: {**alone[b].as_dict(), "weight_fp32_ms": saving[b]}
                                for b in cand_blocks}
    s.doc["decisions"]["fp16"] = dec.as_dict()
    if dec.chosen:
        _write_fp16(s, dec)
    else:
        s.say("FP16: no block passes the gate; no FP16 graph written")


def _write_fp16(s: _Search, dec: Decision) -> None:
    """Export the chosen FP16 graph, measure it as ONNX Runtime runs it, record the decision
    in its metadata and the document."""
    plan = {b: "fp16" for b in dec.chosen}
    model16 = s.export(plan)
    path16 = _save(model16, s.out / "model.fp16.onnx")
    cpu = s.ev.measure(path16)
    meta = read_metadata(model16)[C.META_PRECISION]
    meta["decision"] = _decision_meta(dec, s.ev, cpu_measure=cpu,
                                      emulated="fp16 storage, float32 arithmetic")
    set_metadata(model16, C.META_PRECISION, meta)
    _save(model16, path16)
    s.doc["decisions"]["fp16"]["cpu_graph_measure"] = cpu.as_dict()
    s.doc["decisions"]["fp16"]["audit"] = audit_fp16(model16)
    s.doc["files"]["fp16"] = str(path16)
    s.say(f"FP16: {dec.chosen} -> {path16.name} (emulated |dDice| max "
          f"{dec.measure.delta_dice_max:.3f} pt; CPU graph {cpu.delta_dice_max:.3f} pt)")


# -- INT8 ---------------------------------------------------------------------------------------
def _int8_reader(s: _Search, data_dir, info, *, split: str, pairs: int | None, method: str,
                 progress: bool):
    """The calibration pairs (their notes go into the document)."""
    from pddnet.calibration.data import PairReader

    s.say(f"INT8: calibrating ({method}) on the {split} split")
    reader = PairReader(data_dir, info, split=split, pairs=pairs, progress=progress)
    for n in reader.notes:
        s.doc["notes"].append(f"calibration: {n}")
    return reader


def _int8_builder(fp32: onnx.ModelProto, reader, ranges, *,
                  method: str) -> Callable[[list[str]], onnx.ModelProto]:
    """``build(chosen)``: the checked Q/DQ graph with the ``chosen`` blocks in INT8."""
    from pddnet.calibration.int8 import check_qdq, int8_metadata, prepare, quantise

    def build(chosen: list[str]) -> onnx.ModelProto:
        w, names = prepare(fp32, chosen)
        q = quantise(w, names, ranges, method=method)
        check_qdq(q)
        inl = sorted({n.name for n in fp32.graph.node} - {n.name for n in w.graph.node})
        desc = reader.describe()
        set_metadata(q, C.META_PRECISION, int8_metadata(
            chosen, names, method=method, inlined=inl,
            calibration={k: desc.get(k) for k in ("split", "pairs", "pair_names", "seed")}))
        return q

    return build


def _int8_alone(s: _Search, build, cand_blocks: list[str],
                cache8: dict[tuple, Measure]) -> tuple[dict[str, Measure], dict[str, Path]]:
    """Every block alone in INT8: ``(measures, graph paths)``; a block that does not
    quantise gets an infinite measure carrying the error and no path."""
    alone8: dict[str, Measure] = {}
    paths8: dict[str, Path] = {}
    s.say("INT8: each block alone")
    for b in cand_blocks:
        try:
            q = build([b])
        except PddnetError as exc:
            alone8[b] = Measure(float("inf"), float("nan"), float("inf"), float("nan"),
                                error=str(exc))
            continue
        paths8[b] = _save(q, s.work / f"int8_{b}.onnx")
        alone8[b] = cache8.setdefault((b,), s.ev.measure(paths8[b]))
        _say_alone(s.say, b, alone8[b])
    return alone8, paths8


def _int8_savings(s: _Search, paths8: dict[str, Path], *, repeats: int):
    """Time FP32 and each single-block INT8 graph, interleaved: ``(timing, measured saving,
    its noise, the saving the choice uses, the minimum saving)`` (ms)."""
    s.say(f"INT8: timing FP32 and each single-block INT8 graph ({repeats} interleaved runs)")
    timing = s.ev.time({"fp32": s.fp32_path, **{b: p for b, p in paths8.items()}},
                       repeats=repeats)
    base = timing["fp32"]["median_ms"]
    measured8, noise8 = {}, {}
    for b in paths8:  # paired by round: the runs of one round saw the same load
        diffs = [f - x for f, x in zip(timing["fp32"]["samples_ms"],
                                       timing[b]["samples_ms"])]
        measured8[b] = statistics.median(diffs)
        noise8[b] = statistics.median(abs(d - measured8[b]) for d in diffs)
    # a block cannot save more than it costs in FP32 (its kernel time): more is noise
    saving8 = {b: min(v, s.costs["blocks"].get(b, 0.0)) for b, v in measured8.items()}
    min_saving = 0.01 * base
    # a saving within its own round-to-round scatter (median absolute deviation) is noise
    saving8 = {b: (v if v > noise8[b] else 0.0) for b, v in saving8.items()}
    return timing, measured8, noise8, saving8, min_saving


def _int8_evaluator(s: _Search, build, cache8: dict[tuple, Measure]):
    """``evaluate(chosen)`` for :func:`choose`: build, save and measure (once per set)."""
    def evaluate8(chosen: list[str]) -> Measure:
        key = tuple(sorted(chosen))
        if key not in cache8:
            path = _save(build(chosen), s.work / f"int8_{'+'.join(chosen)}.onnx")
            cache8[key] = s.ev.measure(path)
        return cache8[key]

    return evaluate8


def _search_int8(s: _Search, cand_blocks: list[str], reader, *, method: str, gate: float,
                 repeats: int) -> None:
    """Calibrate, measure and time every block alone in INT8, choose within ``gate`` among
    the blocks that save time here, write the ranges and ``model.int8.onnx``."""
    from pddnet.calibration.int8 import (
        branch_pairs,
        calibrate_tensors,
        float_tensors,
        node_tensors,
        prepare,
        write_tables,
    )

    work_all, names_all = prepare(s.fp32, cand_blocks)
    tensors = node_tensors(work_all, names_all) | float_tensors(s.fp32)
    ranges = calibrate_tensors(work_all, reader, tensors, method=method)
    pairs = branch_pairs(work_all)
    build = _int8_builder(s.fp32, reader, ranges, method=method)
    cache8: dict[tuple, Measure] = {}
    alone8, paths8 = _int8_alone(s, build, cand_blocks, cache8)
    timing, measured8, noise8, saving8, min_saving = _int8_savings(s, paths8, repeats=repeats)
    dec8 = choose(cand_blocks, alone8, saving8, _int8_evaluator(s, build, cache8), gate=gate,
                  precision="int8", min_saving=min_saving, disp_gates=s.disp_gates)
    s.doc["results"]["int8"] = {
        b: {**alone8[b].as_dict(), "median_ms": timing.get(b, {}).get("median_ms"),
            "measured_saving_ms": measured8.get(b), "saving_noise_ms": noise8.get(b),
            "saving_ms": saving8.get(b),
            "samples_ms": timing.get(b, {}).get("samples_ms")}
        for b in cand_blocks}
    s.doc["results"]["int8_fp32_timing"] = timing["fp32"]
    s.doc["decisions"]["int8"] = dec8.as_dict()
    s.doc["decisions"]["int8"]["min_saving_ms"] = min_saving
    s.doc["calibration"] = {"method": method, **reader.describe()}
    write_tables(ranges, s.out, method=method, merged_pairs=pairs,
                 quantised=node_tensors(work_all, names_all))
    s.doc["files"]["ranges"] = str(s.out / "ranges.json")
    if dec8.chosen:
        _write_int8(s, dec8, build, repeats=repeats)
    else:
        s.say("INT8: no block is both faster here and within the gate; no INT8 graph written")


def _write_int8(s: _Search, dec8: Decision, build, *, repeats: int) -> None:
    """Build and save the chosen INT8 graph, time it against FP32, record the decision and
    the speed-up in its metadata and the document."""
    q = build(dec8.chosen)
    meta = read_metadata(q)[C.META_PRECISION]
    meta["decision"] = _decision_meta(dec8, s.ev)
    set_metadata(q, C.META_PRECISION, meta)
    path8 = _save(q, s.out / "model.int8.onnx")
    final = s.ev.time({"fp32": s.fp32_path, "int8": path8}, repeats=repeats)
    meta["decision"]["speedup_vs_fp32"] = \
        final["fp32"]["median_ms"] / final["int8"]["median_ms"]
    set_metadata(q, C.META_PRECISION, meta)
    _save(q, path8)
    s.doc["decisions"]["int8"]["timing"] = final
    s.doc["files"]["int8"] = str(path8)
    s.say(f"INT8: {dec8.chosen} -> {path8.name} (|dDice| max "
          f"{dec8.measure.delta_dice_max:.3f} pt, "
          f"{meta['decision']['speedup_vs_fp32']:.2f}x vs FP32 here)")


def _decision_meta(dec: Decision, ev: Evaluator, *, cpu_measure: Measure | None = None,
                   emulated: str | None = None) -> dict[str, Any]:
    m = dec.measure
    out = {"gate_points": dec.gate, "disp_gates_mm": dict(dec.disp_gates_mm),
           "chosen": dec.chosen,
           "disp_diff_p99_mm": m.disp_p99_mm if m else None,
           "disp_diff_max_mm": m.disp_max_mm if m else None,
           "delta_dice_points_max": m.delta_dice_max if m else None,
           "delta_dice_points_mean": m.delta_dice_mean if m else None,
           "disp_diff_max_vox": m.disp_max if m else None,
           "disp_diff_mean_vox": m.disp_mean if m else None,
           "pairs": [str(p) for p in ev.pairs], "split": ev.split,
           "excluded": dec.excluded, "measured": timestamp()}
    if emulated:
        out["measured_with"] = emulated
    if cpu_measure is not None:
        out["cpu_graph_delta_dice_points_max"] = cpu_measure.delta_dice_max
        out["cpu_graph_disp_diff_max_vox"] = cpu_measure.disp_max
    return out


# ---------------------------------------------------------------------------------------------
# pddnet demo
# ---------------------------------------------------------------------------------------------
def _find_checkpoint(fp32_model: Path) -> Path | None:
    """The checkpoint an export came from, when it is the shipped weights (by SHA-256)."""
    from pddnet._files import sha256_file

    src = read_metadata(onnx.load(str(fp32_model), load_external_data=False)).get(C.META_SOURCE)
    want = src.get("checkpoint_sha256") if isinstance(src, dict) else None
    if not want:
        return None
    weights = Path(__file__).resolve().parent.parent / "weights"
    for p in sorted(weights.glob("*.pt")):
        if sha256_file(p) == want:
            return p
    return None


def demo_graphs(fp32_model, data_dir, out_dir, *, pairs: int | None = None,
                progress: bool = True, echo: Echo | None = None,
                checkpoint=None) -> dict[str, Path]:
    """FP16 and INT8 graphs beside ``fp32_model`` for ``pddnet demo``: ``{"fp16": path,
    "int8": path}`` (FP16 only when the checkpoint is given or is the shipped weights: the
    exporter writes FP16 graphs from the network). INT8: the default blocks, calibrated on
    ``pairs`` training pairs (validation pairs when the dataset has no training pairs, as the
    demo's 4-subject data); FP16: the default keep-FP32 list."""
    from pddnet.data.learn2reg import Learn2RegDataset

    say = _say(echo)
    out = Path(out_dir)
    made: dict[str, Path] = {}
    split = "train"
    try:
        if not Learn2RegDataset(data_dir).pairs("train"):
            split = "val"
            say("calibration: the dataset has no training pairs; calibrating on the val split")
    except PddnetError:
        pass  # calibrate() reports it
    res = calibrate(fp32_model, data_dir, out, pairs=pairs, split=split, progress=progress,
                    echo=say, overwrite=True)
    made["int8"] = Path(res["int8"])
    ckpt = Path(checkpoint) if checkpoint else _find_checkpoint(Path(fp32_model))
    if ckpt is None:
        say("FP16: the checkpoint of the FP32 model is unknown (pass checkpoint=); no FP16 "
            "graph")
        return made
    outputs = tuple(read_metadata(onnx.load(str(fp32_model), load_external_data=False))
                    .get(C.META_OUTPUTS) or ())
    outputs = tuple(o for o in outputs if o in C.OPTIONAL_OUTPUTS)
    path, kept = export_fp16(ckpt, out / precision_path(fp32_model, "fp16").name,
                             outputs=outputs, overwrite=True)
    say(f"wrote {path} (FP16; kept in FP32: {', '.join(kept) or 'none'})")
    made["fp16"] = path
    return {"fp16": made["fp16"], "int8": made["int8"]}
