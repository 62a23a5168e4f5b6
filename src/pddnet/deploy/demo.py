"""``pddnet demo``: the main job end to end on the embedded default data (``make demo``).

Steps (each prints what it does, its progress and how long it took)::

    1 synthesise   data/                  synthetic abdominal CT, Learn2Reg layout
    2 weights      (shipped)              load the shipped checkpoint, say what it is
    3 export       model/model.onnx       ONNX with the ai.pddnet ops (+ probs, entropy)
    4 calibrate    model/model.fp16.onnx  FP16 and INT8 (Q/DQ) graphs (pddnet.calibration)
                   model/model.int8.onnx
    5 validate     validation/            every usable backend/precision vs the PyTorch
                                          reference: report.json, report.md, report.html
    6 package      bundle/, bundle.tar.gz the models that passed, with their evidence and
                   triton/                checksums; a Triton model repository
    7 register     register/              one test pair from bundle.tar.gz, torch-free runtime
                                          (every checksum verified first)

then a summary table and the paths of the report and the bundle. Budget: under 5 minutes on
2 CPU cores with the ``small`` preset -- so few pairs (``max_pairs``, default 3), few timed
runs, and one child process per candidate for honest peak memory.

A candidate whose gates fail is reported and left out of the bundle (with the reason); the
demo fails only when nothing passed or a step errs.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import click

from pddnet.errors import PddnetError

BUDGET_S = 300


@dataclass
class DemoOptions:
    out: Path
    subjects: int = 10                   # 4 test, 2 validation, 4 training (calibration)
    seed: int = 0
    preset: str = "small"                # synthetic data preset
    checkpoint: Path | None = None       # default: the shipped weights
    threads: int = 2
    overwrite: bool = False
    max_pairs: int | None = 3            # validation pairs (test split)
    warmup: int = 1
    repeats: int = 5
    isolate: bool = True                 # one child process per candidate (peak memory)
    calib_pairs: int | None = 8          # calibration pairs (training split)
    figure_pairs: int = 2
    progress: bool = True
    bundle_name: str = "pddnet-demo"


@dataclass
class DemoState:
    opts: DemoOptions
    paths: dict[str, Path] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    models: dict[str, Path] = field(default_factory=dict)   # precision -> .onnx
    notes: list[str] = field(default_factory=list)


def _say(msg: str) -> None:
    click.echo(f"      {msg}")


# --------------------------------------------------------------------------------------------
# steps
# --------------------------------------------------------------------------------------------
def _step_synth(s: DemoState) -> str:
    from pddnet.data.synth import write_dataset

    data = s.opts.out / "data"
    report = write_dataset(data, subjects=s.opts.subjects, seed=s.opts.seed, preset=s.opts.preset,
                           progress=s.opts.progress, overwrite=True)
    s.paths["data"] = data
    return (f"{s.opts.subjects} subjects in {data} (mean initial test Dice "
            f"{100 * report.mean_test_dice:.1f}%)")


def _step_weights(s: DemoState) -> str:
    from pddnet.model.checkpoint import read_checkpoint
    from pddnet.weights import shipped_checkpoint

    ckpt = Path(s.opts.checkpoint) if s.opts.checkpoint else shipped_checkpoint("small")
    raw = read_checkpoint(ckpt)  # weights_only=True: refuses pickled objects
    s.paths["checkpoint"] = ckpt
    cfg = raw["config"]
    train = raw.get("train") or {}
    it = train.get("iteration") if isinstance(train, dict) else None
    return (f"{ckpt} ({'given' if s.opts.checkpoint else 'shipped'}): channels "
            f"{cfg.get('channels')}, grid {cfg.get('grid')}, {cfg.get('disp_size')}^3 "
            f"displacements, trained at {raw.get('image_shape')}"
            + (f", {it} iterations" if it else ""))


def _step_export(s: DemoState) -> str:
    from pddnet.export.onnx_export import export_checkpoint

    path = export_checkpoint(s.paths["checkpoint"], s.opts.out / "model" / "model.onnx",
                             outputs=("probs", "entropy"), overwrite=True)
    s.models["fp32"] = path
    return f"{path} ({path.stat().st_size / 1e6:.1f} MB; outputs disp, grid_disp, probs, entropy)"


def _step_calibrate(s: DemoState) -> str:
    made = calibrate_models(s)
    if not made:
        return "skipped: " + "; ".join(s.notes[-1:])
    return ", ".join(f"{p} {path}" for p, path in made.items())


def calibrate_models(s: DemoState) -> dict[str, Path]:
    """FP16 and INT8 graphs of ``s.models['fp32']`` (``pddnet.calibration``); ``{}`` with a
    note when that package provides no calibration yet."""
    try:
        from pddnet.calibration import api as calib  # noqa: F401  (issue 4)
    except ImportError:
        s.notes.append("FP16/INT8 graphs are not available yet: pddnet.calibration has no "
                       "calibration entry point in this version (issue 4); validating FP32 only")
        return {}
    made = calib.demo_graphs(s.models["fp32"], s.paths["data"], s.opts.out / "model",
                             pairs=s.opts.calib_pairs, progress=s.opts.progress, echo=_say,
                             checkpoint=s.paths["checkpoint"])
    s.models.update(made)
    return made


@contextlib.contextmanager
def _candidates(s: DemoState):
    """``(reference, candidates, engine folder or None)`` -- the same FP16/INT8 candidates as
    ``pddnet validate --fp16 --int8`` when the calibration package provides them (with the
    float16-storage emulation of the FP16 graph, in a temporary folder for the comparison)."""
    from pddnet.validation.compare import Candidate, Gate, default_candidates

    ref, cands = default_candidates(s.paths["checkpoint"], s.models["fp32"])
    try:
        from pddnet.calibration.validate import precision_candidates
    except ImportError:
        precision_candidates = None
    with contextlib.ExitStack() as stack:
        if precision_candidates is not None:
            cands += stack.enter_context(precision_candidates(fp16=s.models.get("fp16"),
                                                              int8=s.models.get("int8")))
        else:
            gate = {"fp16": 0.5, "int8": 1.0}
            for prec in ("fp16", "int8"):
                if prec in s.models:
                    cands.append(Candidate(f"onnxruntime-{prec}", "onnxruntime",
                                           s.models[prec], prec, {},
                                           (Gate("delta_dice_points", gate[prec]),)))
        engines = _trt_candidates(s, cands)
        yield ref, cands, engines


def _trt_candidates(s: DemoState, cands: list) -> Path | None:
    """TensorRT engines for every graph when TensorRT and a GPU are usable here (not run on
    the development machines: no GPU there)."""
    from pddnet.runtime.bundle import trt_environment
    from pddnet.validation.compare import Candidate, Gate

    env, why = trt_environment()
    if env is None:
        s.notes.append(f"TensorRT: not usable here ({why}); no engines built or validated")
        return None
    from pddnet.backends.trt.build import BuildOptions, build_command

    engines = s.opts.out / "engines"
    gate = {"fp32": 0.1, "fp16": 0.5, "int8": 1.0}
    for prec, model in list(s.models.items()):
        build_command(model, engines, options=BuildOptions(), whole=True, echo=_say)
        cands.append(Candidate(f"tensorrt-{prec}", "tensorrt", model, prec,
                               {"engine_cache": str(engines), "build": "never"},
                               (Gate("delta_dice_points", gate[prec]),)))
    return engines


def _step_validate(s: DemoState) -> str:
    from pddnet.validation.compare import compare
    from pddnet.validation.render import FigureCollector, write_report_files
    from pddnet.validation.report import format_table

    with _candidates(s) as (ref, cands, engines):
        if engines is not None:
            s.paths["engines"] = engines
        figures = FigureCollector(s.opts.figure_pairs, ref.name)
        _say(f"{len(cands) + 1} candidates: {', '.join([ref.name] + [c.name for c in cands])}")
        report = compare(ref, cands, s.paths["data"], split="test", max_pairs=s.opts.max_pairs,
                         threads=s.opts.threads, warmup=s.opts.warmup, repeats=s.opts.repeats,
                         isolate=s.opts.isolate, progress=s.opts.progress, echo=_say,
                         observe=figures)
        try:
            from pddnet.calibration.validate import annotate_report
        except ImportError:
            pass
        else:
            annotate_report(report, cands)
    out = s.opts.out / "validation"
    write_report_files(report, out, figures=figures, overwrite=True)
    s.paths["report"] = out
    s.results["report"] = report
    click.echo(format_table(report))
    passed = [n for n, c in report["candidates"].items() if not c["reference"] and c["passed"]]
    return f"{report['status'].upper()}: {len(passed)} of {len(cands)} candidates passed; {out}"


def _step_package(s: DemoState) -> str:
    from pddnet.deploy.package import package

    report = s.results["report"]
    ort = [c for c in report["candidates"].values()
           if c["backend"] == "onnxruntime" and c.get("mode", "ff") == "ff"]
    # a precision is bundled when every candidate of it passed (FP16: also the emulation)
    ok = {c["precision"] for c in ort} - {c["precision"] for c in ort if not c["passed"]}
    if "fp32" not in ok:
        raise PddnetError("the FP32 ONNX model did not pass validation; nothing to package (see "
                          f"{s.paths['report'] / 'report.md'})")
    for prec in sorted(set(s.models) - ok):
        s.notes.append(f"{prec} graph left out of the bundle: its validation gates failed")
    res = package(s.models["fp32"], report_dir=s.paths["report"],
                  fp16=s.models.get("fp16") if "fp16" in ok else None,
                  int8=s.models.get("int8") if "int8" in ok else None,
                  engines=[s.paths["engines"]] if "engines" in s.paths else (),
                  out=s.opts.out / "bundle", tar=True, triton=s.opts.out / "triton",
                  overwrite=True, name=s.opts.bundle_name, echo=_say)
    s.paths.update(bundle=res.bundle, tar=res.tar, triton=res.triton)
    s.results["manifest"] = res.manifest
    return (f"{res.bundle} ({len(res.manifest['files'])} files, models "
            f"{[m['id'] for m in res.manifest['models']]}) + {res.tar.name}; Triton: {res.triton}")


def _step_register(s: DemoState) -> str:
    from pddnet.data.learn2reg import Learn2RegDataset
    from pddnet.runtime.session import Registrar

    pair = Learn2RegDataset(s.paths["data"]).pairs("test")[0]
    with Registrar(s.paths["tar"], threads=s.opts.threads) as reg:
        _say(f"{s.paths['tar']}: every file verified (SHA-256)")
        for line in reg.selection.describe().splitlines():
            _say(line)
        result = reg.register(pair.fixed.image, pair.moving.image,
                              moving_labels=pair.moving.label, fixed_labels=pair.fixed.label)
        out = s.opts.out / "register"
        result.save(out, overwrite=True)
        s.results["selection"] = reg.selection
    s.paths["register"] = out
    s.results["register"] = result
    dice = result.dice
    before = result.metrics.get("dice_mean_before")
    extra = (f", Dice {100 * before:.1f}% -> {100 * dice:.1f}%"
             if dice is not None and before is not None else "")
    return (f"{pair} -> {out} ({reg.selection.backend} {reg.selection.precision}{extra}, "
            f"network {(result.timings_ms['features'] or 0) + result.timings_ms['head']:.0f} ms)")


STEPS: list[tuple[str, Callable[[DemoState], str]]] = [
    ("synthesise the embedded abdomen data", _step_synth),
    ("load the shipped weights", _step_weights),
    ("export to ONNX with the ai.pddnet custom ops", _step_export),
    ("calibrate: FP16 and INT8 graphs", _step_calibrate),
    ("validate every usable backend against the PyTorch reference", _step_validate),
    ("package a bundle (+ .tar.gz) and a Triton model repository", _step_package),
    ("register one test pair from the bundle (torch-free runtime)", _step_register),
]


# --------------------------------------------------------------------------------------------
def summary(s: DemoState) -> str:
    """The closing table: per candidate Dice, differences, latency, gates, bundled or not."""
    from pddnet.validation.render import fmt

    lines = []
    report = s.results.get("report")
    bundled = {(m.get("kind"), m.get("precision"))
               for m in (s.results.get("manifest") or {}).get("models", [])}
    if report:
        head = (f"{'candidate':<26} {'precision':<9} {'Dice %':>7} {'max|dDice| pt':>13} "
                f"{'max|du| vox':>11} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'gates':<9} "
                "bundled")
        lines += [head, "-" * len(head)]
        for n, c in report["candidates"].items():
            s_, lat = c["summary"], c["latency"]
            kind = "tensorrt" if c["backend"] in ("tensorrt", "trt") else "onnx"
            gate = "reference" if c["reference"] else ("PASS" if c["passed"] else "FAIL")
            inb = "-" if c["reference"] else ("yes" if (kind, c["precision"]) in bundled
                                              else "no")
            lines.append(f"{n[:26]:<26} {c['precision']:<9} "
                         f"{fmt(s_['dice_mean'], '.2f', 100):>7} "
                         f"{fmt(s_['delta_dice_points_max_abs'], '.3f'):>13} "
                         f"{fmt(s_['disp_diff_max_vox'], '.2e'):>11} "
                         f"{fmt(lat['p50_ms'], '.0f'):>8} {fmt(lat['p95_ms'], '.0f'):>8} "
                         f"{fmt(lat['p99_ms'], '.0f'):>8} {gate:<9} {inb}")
        lines.append("")
    for title, secs in s.timings.items():
        lines.append(f"  {secs:6.1f} s  {title}")
    if "report" in s.paths:
        lines.append(f"report:  {s.paths['report'] / 'report.html'}  (and report.md, "
                     "report.json)")
    if s.paths.get("bundle"):
        lines.append(f"bundle:  {s.paths['bundle']}  (verified; also {s.paths['tar']})")
    if s.paths.get("triton"):
        lines.append(f"triton:  {s.paths['triton']}  (tritonserver --model-repository ...)")
    if s.paths.get("register"):
        lines.append(f"registered pair: {s.paths['register']}")
    for n in s.notes:
        lines.append(f"note: {n}")
    return "\n".join(lines)


def run_demo(opts: DemoOptions) -> DemoState:
    """Run every step in order; stop with a clear error at the first failure."""
    out = Path(opts.out)
    if out.exists() and not out.is_dir():
        raise PddnetError(f"{out} exists and is not a folder; choose another --out")
    if out.exists() and any(out.iterdir()) and not opts.overwrite:
        raise PddnetError(f"{out} is not empty; pass --overwrite or choose another --out")
    # refuse a missing or unsafe checkpoint before any work (and before emptying --out)
    from pddnet.model.checkpoint import read_checkpoint
    from pddnet.weights import shipped_checkpoint

    read_checkpoint(opts.checkpoint if opts.checkpoint is not None else shipped_checkpoint("small"))
    if out.exists() and any(out.iterdir()):
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    state = DemoState(opts=opts)
    t_all = time.perf_counter()
    for n, (title, step) in enumerate(STEPS, 1):
        click.secho(f"[{n}/{len(STEPS)}] {title}  (t = {time.perf_counter() - t_all:.0f} s)",
                    bold=True)
        t0 = time.perf_counter()
        result = step(state)
        state.timings[title] = time.perf_counter() - t0
        click.echo(f"      {result}  ({state.timings[title]:.1f} s)")
    total = time.perf_counter() - t_all
    click.secho("\nsummary", bold=True)
    click.echo(summary(state))
    click.secho(f"demo finished in {total:.0f} s"
                + ("" if total <= BUDGET_S else f" (over the {BUDGET_S} s budget: a loaded "
                                                 "machine?)") + f"; outputs in {out}", bold=True)
    state.results["total_s"] = total
    return state
