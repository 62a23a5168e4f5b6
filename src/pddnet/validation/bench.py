"""``pddnet bench``: PyTorch eager vs ONNX Runtime on one pair, against this CPU's GEMM floor.

One run measures, on the same input pair and with the same thread count:

* PyTorch eager (the ``torch`` backend: ``torch.set_num_threads(threads)``) and ONNX Runtime
  (the ``onnxruntime`` backend, ``intra_op_num_threads=threads``) with its default settings
  (``enable_mem_pattern`` on, CPU arena off) and with ``enable_mem_pattern`` off -- each in its own child process (:func:`~pddnet.validation.machine.
  run_isolated`), so that one's allocator caches and thread pools do not pollute another's
  timing or peak RSS; ``warmup`` untimed runs, then ``repeats`` timed runs of the whole model
  (both feature passes and the head), summarised by
  :func:`~pddnet.metrics.latency_stats` (median = p50);
* the speed-up ORT/PyTorch (ratio of medians, measured in the same run);
* the model's useful FLOPs (:mod:`pddnet.validation.flops`, per block) and the *floor*: FLOPs
  divided by this CPU's fp32 matrix-multiply rate, the best of several large square GEMMs in
  ONNX Runtime (and in PyTorch, for comparison) with the same thread count;
* a per-block time breakdown of the ONNX Runtime run from its profiler, grouped by contract
  prefix (``fixed/``, ``moving/``, ``head/``) and by custom op (:mod:`pddnet.validation.profile`);
* the runtime as a user gets it (:class:`~pddnet.runtime.runner.PairRunner`: the features in
  ONNX Runtime with their OBELISK sampling in C, the head in the C kernels, where the library
  is built, :mod:`pddnet.backends.native`), each setting in its own child process: a whole
  pair (both feature passes and the head), the correlation + head alone, and a further moving
  scan with the fixed scan's features reused; beside the same runner without the library
  (``runtime-ort-head``: the head and the sampling in ONNX Runtime). The settings
  (:data:`RUNTIME_MODES`) re-measure ``enable_mem_pattern`` and the CPU arena with the library;
* the runtime on an INT8 graph (``runtime-int8``, when ``int8_graph`` builds one: ``pddnet
  bench`` passes :func:`pddnet.calibration.int8.int8_for_pair`, the default INT8 blocks
  calibrated on the timed pair itself) -- a speed row: its displacement difference says what
  INT8 moved, not an accuracy figure (``pddnet validate --int8`` measures that on held-out
  pairs);
* the largest difference between the backends' displacement fields (a sanity check).

The result schema is documented in ``docs/benchmarks.md``.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from pddnet.errors import PddnetError
from pddnet.spec import contract as C

SCHEMA = "pddnet.bench/1"
#: the ONNX Runtime settings timed: name -> enable_mem_pattern (the backend's default first)
ORT_MODES = {"onnxruntime": True, "onnxruntime-no-mem-pattern": False}
#: the runtime settings timed: name -> (C library: head and features' sampling, ONNX Runtime
#: options); the default first
RUNTIME_MODES: dict[str, tuple[bool, dict[str, Any]]] = {
    "runtime": (True, {}),
    "runtime-no-mem-pattern": (True, {"mem_pattern": False}),
    "runtime-arena": (True, {"mem_arena": True}),
    "runtime-ort-head": (False, {}),
}
#: the runtime (default settings, the library where built) on the INT8 graph
INT8_MODE = "runtime-int8"


# --------------------------------------------------------------------------------------------
# child-process workers (module level: picklable for the spawn context)
# --------------------------------------------------------------------------------------------
def _timed_runs(backend, feeds, warmup: int, repeats: int
                ) -> tuple[list[float], dict[str, np.ndarray]]:
    samples = []
    for _ in range(warmup + repeats):
        out = backend.run(feeds)
        samples.append(backend.last_run_ms / 1e3)
    return samples, out


def _stats(samples: list[float], warmup: int) -> dict[str, Any]:
    from pddnet.metrics import latency_stats

    lat = latency_stats(samples, warmup=warmup)
    lat["samples_ms"] = [round(s * 1e3, 3) for s in samples[warmup:]]
    lat["warmup_ms"] = [round(s * 1e3, 3) for s in samples[:warmup]]
    return lat


def bench_backend(backend: str, model: str, feeds_path: str, threads: int, warmup: int,
                  repeats: int, options: dict[str, Any], disp_out: str | None,
                  gemm_size: int | None) -> dict[str, Any]:
    """Time one backend on the feeds; peak RSS over its load and runs; optionally the GEMM
    rate of its library afterwards. Runs in a child process."""
    import sys

    from pddnet.backends import create_backend
    from pddnet.validation import machine

    with np.load(feeds_path) as z:
        feeds = {k: np.ascontiguousarray(z[k]) for k in z.files}
    with machine.PeakRss() as mem:
        be = create_backend(backend, model, label="full", threads=threads, **options)
        be.activate()
        try:
            samples, out = _timed_runs(be, feeds, warmup, repeats)
            desc = be.describe()
        finally:
            be.deactivate()
    if disp_out:
        np.save(disp_out, out["disp"])
    res = {"latency": _stats(samples, warmup), "memory": mem.as_dict(isolated=True),
           "load_ms": be.load_ms, "describe": desc, "torch_loaded": "torch" in sys.modules}
    if gemm_size:
        res["gemm"] = gemm_rate(backend, gemm_size, threads)
    return res


def bench_runtime(model: str, feeds_path: str, threads: int, warmup: int, repeats: int,
                  native: bool, options: dict[str, Any], disp_out: str | None) -> dict[str, Any]:
    """Time the runtime's pair runner (split model; C head when ``native`` and built): whole
    pairs, then further moving scans with the fixed features reused; peak RSS over all of it.
    Runs in a child process."""
    import sys

    import onnx

    from pddnet.runtime.runner import PairRunner
    from pddnet.validation import machine

    with np.load(feeds_path) as z:
        fixed, moving = (np.ascontiguousarray(z[k]) for k in C.INPUTS)
    proto = onnx.load(model)
    parts: dict[str, list[float]] = {k: [] for k in ("pair", "features", "head", "kernel",
                                                     "extra")}
    with machine.PeakRss() as mem:
        t0 = time.perf_counter()
        r = PairRunner(proto, "onnxruntime", {"threads": threads, **options}, native=native)
        load_ms = (time.perf_counter() - t0) * 1e3
        del proto
        try:
            for _ in range(warmup + repeats):
                t0 = time.perf_counter()
                run = r.run_pair(fixed, moving)
                parts["pair"].append(time.perf_counter() - t0)
                parts["features"].append((run.features_ms or 0.0) / 1e3)
                parts["head"].append(run.head_ms / 1e3)
                parts["kernel"].append((run.kernel_ms or 0.0) / 1e3)
                out = run.outputs
                del run
            ff, _ = r.features(fixed)
            for _ in range(warmup + repeats):
                t0 = time.perf_counter()
                r.run_pair(fixed, moving, fixed_features=ff)
                parts["extra"].append(time.perf_counter() - t0)
            desc = r.describe()
        finally:
            r.close()
    if disp_out:
        np.save(disp_out, out["disp"])
    res = {"latency": _stats(parts["pair"], warmup), "memory": mem.as_dict(isolated=True),
           "load_ms": load_ms, "describe": desc, "head_impl": desc.get("head"),
           "sampling_impl": desc.get("sampling"),
           "torch_loaded": "torch" in sys.modules,
           "parts": {k: _stats(v, warmup) for k, v in parts.items() if k != "pair"}}
    if not native or not str((desc.get("head") or {}).get("implementation", "")).startswith(
            "native"):
        res["parts"].pop("kernel")
    return res


def gemm_rate(library: str, n: int, threads: int, repeats: int = 7) -> dict[str, Any]:
    """fp32 ``(n x n) @ (n x n)`` rate in ``library`` (``onnxruntime`` MatMul or ``torch.mm``)
    with ``threads`` threads: ``2 n^3`` FLOPs over the fastest (``gflops``, the attainable rate
    the floor uses: on a shared machine slower runs measure the interference) and the median
    (``gflops_median``) of ``repeats`` runs after one warm-up."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    times = []
    if library == "torch":
        import torch

        torch.set_num_threads(threads)
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        torch.mm(ta, tb)
        for _ in range(repeats):
            t0 = time.perf_counter()
            torch.mm(ta, tb)
            times.append(time.perf_counter() - t0)
    else:
        import onnxruntime as ort
        from onnx import TensorProto, helper

        g = helper.make_graph(
            [helper.make_node("MatMul", ["a", "b"], ["c"])], "gemm",
            [helper.make_tensor_value_info("a", TensorProto.FLOAT, [n, n]),
             helper.make_tensor_value_info("b", TensorProto.FLOAT, [n, n])],
            [helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])])
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 20)])
        m.ir_version = 9
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        s = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
        s.run(None, {"a": a, "b": b})
        for _ in range(repeats):
            t0 = time.perf_counter()
            s.run(None, {"a": a, "b": b})
            times.append(time.perf_counter() - t0)
    med, best = statistics.median(times), min(times)
    return {"library": library, "size": n, "threads": threads, "repeats": repeats,
            "best_ms": best * 1e3, "median_ms": med * 1e3, "gflops": 2.0 * n ** 3 / best / 1e9,
            "gflops_median": 2.0 * n ** 3 / med / 1e9}


def profile_ort(model: str, feeds_path: str, threads: int, runs: int, mem_pattern: bool,
                prefix: str) -> dict[str, Any]:
    """ONNX Runtime profile of ``runs`` runs after one warm-up, grouped per block."""
    import onnx

    from pddnet.backends.onnxrt import OnnxRuntimeBackend
    from pddnet.graph.passes.inline import inline_named
    from pddnet.validation.profile import summarise_profile

    with np.load(feeds_path) as z:
        feeds = {k: np.ascontiguousarray(z[k]) for k in z.files}
    inlined, callers = inline_named(onnx.load(model))
    be = OnnxRuntimeBackend(inlined, label="profile", threads=threads, mem_pattern=mem_pattern,
                            profile=prefix)
    with be:
        for _ in range(1 + runs):
            be.run(feeds)
        trace = be.end_profiling()
    out = summarise_profile(trace, callers, skip_runs=1)
    out["mem_pattern"] = mem_pattern
    out["trace"] = Path(trace).name
    return out


# --------------------------------------------------------------------------------------------
# the benchmark
# --------------------------------------------------------------------------------------------
def run_bench(preset_name: str, *, shape: Sequence[int] | None = None, threads: int = 2,
              warmup: int = 1, repeats: int = 5, checkpoint=None, seed: int = 0,
              fixed=None, moving=None, gemm_size: int = 2048, profile_runs: int = 2,
              int8_graph: Callable[[Any, dict], tuple[Any, dict]] | None = None,
              echo: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the benchmark (module docstring) and return the result dict.

    ``preset_name`` picks the configuration (``small``, ``paper``; ``tiny`` for tests) and
    the default shape (``PRESET_IMAGE_SHAPES``); ``checkpoint`` replaces the randomly
    initialised network (seeded by ``seed``) with trained weights (its config wins);
    ``fixed``/``moving`` (NIfTI) replace the random pair, pre-processed onto the model grid as
    ``pddnet register`` does. ``profile_runs=0`` skips the profile, ``gemm_size=0`` the floor;
    ``int8_graph(fp32 proto, feeds) -> (INT8 proto, description)`` adds the INT8 row.
    """
    import onnx

    from pddnet.export.onnx_export import export_model
    from pddnet.model.checkpoint import load_model, save_checkpoint
    from pddnet.model.network import PDDNet
    from pddnet.spec.config import PRESET_IMAGE_SHAPES, preset
    from pddnet.validation import machine
    from pddnet.validation.flops import count_flops

    say = echo or (lambda s: None)
    if threads < 1 or warmup < 0 or repeats < 1:
        raise PddnetError(f"bench: threads and repeats must be >= 1 and warmup >= 0, got "
                          f"{threads}, {repeats}, {warmup}")
    if (fixed is None) != (moving is None):
        raise PddnetError("bench: give both --fixed and --moving, or neither (a random pair)")
    notes: list[str] = []
    cfg = preset(preset_name)
    image_shape = tuple(int(n) for n in (shape or PRESET_IMAGE_SHAPES[preset_name]))
    started = datetime.now(timezone.utc)
    mach = machine.machine_info(threads)
    with tempfile.TemporaryDirectory(prefix="pddnet-bench-") as tmp:
        work = Path(tmp)
        if checkpoint is not None:
            net, _ = load_model(checkpoint)
            if net.config != cfg:
                notes.append(f"the checkpoint's configuration differs from preset "
                             f"{preset_name!r}; the checkpoint's is used")
            cfg = net.config
            ckpt = Path(checkpoint)
        else:
            net = PDDNet(cfg, seed=seed).eval()
            ckpt = save_checkpoint(work / "model.pt", net, image_shape=image_shape)
        say(f"exporting {preset_name} ({'x'.join(map(str, image_shape))}) to ONNX")
        model_path = work / "model.onnx"
        proto = export_model(net, image_shape)
        onnx.save(proto, str(model_path))
        feeds = _make_feeds(proto, image_shape, seed, fixed, moving)
        runtime_models = {name: model_path for name in RUNTIME_MODES}
        int8_desc = None
        if int8_graph is not None:
            say("INT8 graph for the runtime-int8 row")
            q, int8_desc = int8_graph(proto, feeds)
            runtime_models[INT8_MODE] = work / "model.int8.onnx"
            onnx.save(q, str(runtime_models[INT8_MODE]))
            del q
        del proto, net
        feeds_path = work / "feeds.npz"
        np.savez(feeds_path, **feeds)
        del feeds

        runs: dict[str, Any] = {}
        say(f"pytorch: {warmup} warm-up + {repeats} timed runs, {threads} thread(s)")
        runs["pytorch"] = _isolated(
            "pytorch", bench_backend, "torch", str(model_path), str(feeds_path), threads, warmup,
            repeats, {"checkpoint": str(ckpt)}, str(work / "disp_torch.npy"), gemm_size or None)
        for i, (name, pattern) in enumerate(ORT_MODES.items()):
            say(f"{name} (mem_pattern={pattern}): {warmup} warm-up + {repeats} timed runs, "
                f"{threads} thread(s)")
            runs[name] = _isolated(
                name, bench_backend, "onnxruntime", str(model_path), str(feeds_path), threads,
                warmup, repeats, {"mem_pattern": pattern}, str(work / f"disp_{name}.npy"),
                gemm_size if i == 0 and gemm_size else None)
            runs[name]["mem_pattern"] = pattern
        for name, path in runtime_models.items():
            use_native, opts = RUNTIME_MODES.get(name, (True, {}))
            say(f"{name} (pair runner, C head {'on' if use_native else 'off'}, {opts or 'defaults'}"
                f"{', INT8 graph' if name == INT8_MODE else ''}): {warmup} warm-up + {repeats} "
                f"timed runs per part, {threads} thread(s)")
            runs[name] = _isolated(
                name, bench_runtime, str(path), str(feeds_path), threads, warmup, repeats,
                use_native, opts, str(work / f"disp_{name}.npy"))
            runs[name]["precision"] = "int8" if name == INT8_MODE else "fp32"
        d_torch = np.load(work / "disp_torch.npy")
        diffs = {name: float(np.abs(np.load(work / f"disp_{name}.npy") - d_torch).max())
                 for name in (*ORT_MODES, *runtime_models)}
        prof = None
        if profile_runs:
            best = min(ORT_MODES, key=lambda n: runs[n]["latency"]["p50_ms"])
            say(f"profile: onnxruntime with mem_pattern={ORT_MODES[best]}, {profile_runs} "
                "run(s) after one warm-up")
            prof = _isolated("profile", profile_ort, str(model_path), str(feeds_path), threads,
                             profile_runs, ORT_MODES[best], str(work / "ort_profile"))

    flops = count_flops(cfg, image_shape)
    t_p50 = runs["pytorch"]["latency"]["p50_ms"]
    speedup = {name: t_p50 / runs[name]["latency"]["p50_ms"]
               for name in (*ORT_MODES, *runtime_models)}
    gemm = {"onnxruntime": runs["onnxruntime"].pop("gemm", None),
            "torch": runs["pytorch"].pop("gemm", None)}
    floor = None
    if gemm["onnxruntime"]:
        rate = gemm["onnxruntime"]["gflops"] * 1e9
        floor = {"rate_gflops": gemm["onnxruntime"]["gflops"], "rate_from": "onnxruntime MatMul",
                 "floor_ms": flops.total / rate * 1e3,
                 "achieved_gflops": {n: flops.total / (r["latency"]["p50_ms"] / 1e3) / 1e9
                                     for n, r in runs.items()},
                 "fraction_of_floor": {n: (flops.total / rate * 1e3) / r["latency"]["p50_ms"]
                                       for n, r in runs.items()}}
    best_time = min(ORT_MODES, key=lambda n: runs[n]["latency"]["p50_ms"])
    best_mem = min(ORT_MODES, key=lambda n: runs[n]["memory"]["peak_rss_mb"] or 0.0)
    mach["load_average_end"] = machine.load_average()
    return {
        "schema": SCHEMA,
        "created": started.isoformat(timespec="seconds"),
        "duration_s": round((datetime.now(timezone.utc) - started).total_seconds(), 1),
        "settings": {"preset": preset_name, "config": cfg.as_dict(),
                     "image_shape": list(image_shape), "threads": threads, "warmup": warmup,
                     "repeats": repeats, "model": str(checkpoint) if checkpoint else
                     f"random initialisation (seed {seed})",
                     "input": (f"{fixed} / {moving}" if fixed is not None
                               else f"random uniform normalised intensities (seed {seed})"),
                     "gemm_size": gemm_size, "profile_runs": profile_runs,
                     "int8": int8_desc},
        "machine": mach,
        "flops": flops.as_dict(),
        "runs": runs,
        "speedup_vs_pytorch": speedup,
        "onnxruntime_better": {"latency": best_time, "peak_rss": best_mem},
        "runtime_head": runs["runtime"].get("head_impl"),
        "runtime_sampling": runs["runtime"].get("sampling_impl"),
        "gemm": gemm,
        "floor": floor,
        "check": {"disp_max_abs_diff_vs_pytorch_vox": diffs},
        "profile": prof,
        "notes": notes,
    }


def _isolated(what: str, fn, *args):
    from pddnet.validation import machine

    try:
        return machine.run_isolated(fn, *args)
    except PddnetError:
        raise
    except Exception as exc:  # e.g. BrokenProcessPool: the child was killed (out of memory?)
        raise PddnetError(f"bench: the {what} run failed ({type(exc).__name__}: {exc}); "
                          "was its process killed for memory?") from exc


def _make_feeds(proto, image_shape, seed: int, fixed, moving) -> dict[str, np.ndarray]:
    if fixed is None:
        rng = np.random.default_rng(seed)
        return {n: rng.uniform(-2.0, 3.0, (1, 1, *image_shape)).astype(np.float32)
                for n in C.INPUTS}
    from pddnet.graph.model import read_model_info
    from pddnet.runtime.preprocess import prepare_fixed, prepare_moving

    info = read_model_info(proto)
    pf = prepare_fixed(fixed, info)
    return {C.INPUT_FIXED: pf.array, C.INPUT_MOVING: prepare_moving(moving, pf, info).array}


# --------------------------------------------------------------------------------------------
# printing
# --------------------------------------------------------------------------------------------
def format_bench(r: dict[str, Any]) -> str:
    st, m = r["settings"], r["machine"]
    lines = [f"pddnet bench: preset {st['preset']}, {'x'.join(map(str, st['image_shape']))}, "
             f"{st['threads']} thread(s), {st['warmup']} warm-up + {st['repeats']} timed runs",
             f"machine: {m['cpu_model']}, {m['logical_cores']} logical cores; load average "
             f"{m['load_average']} at start, {m.get('load_average_end')} at end",
             "",
             f"{'backend':<26} {'p50 ms':>10} {'p95 ms':>10} {'min ms':>10} {'peak RSS MB':>12} "
             f"{'speed-up':>9} {'GFLOP/s':>8}"]
    for name, run in r["runs"].items():
        lat = run["latency"]
        sp = r["speedup_vs_pytorch"].get(name, 1.0)
        ach = (r["floor"] or {}).get("achieved_gflops", {}).get(name)
        lines.append(f"{name:<26} {lat['p50_ms']:10.1f} {lat['p95_ms']:10.1f} {lat['min_ms']:10.1f} "
                     f"{run['memory']['peak_rss_mb'] or 0:12.0f} {sp:8.2f}x "
                     f"{ach if ach is not None else float('nan'):8.1f}")
    fl = r["flops"]
    lines.append("")
    lines.append(f"FLOPs: {fl['gflop']:.2f} GFLOP per pair (features {fl['features'] / 1e9:.2f}, "
                 f"head {fl['head'] / 1e9:.2f}; useful FLOPs, pddnet.validation.flops)")
    g = r["gemm"]
    if r["floor"]:
        tg = (f", torch.mm {g['torch']['gflops']:.1f} (median {g['torch']['gflops_median']:.1f})"
              if g.get("torch") else "")
        lines.append(f"GEMM fp32 {g['onnxruntime']['size']}^3, {st['threads']} thread(s), best "
                     f"of {g['onnxruntime']['repeats']}: onnxruntime "
                     f"{g['onnxruntime']['gflops']:.1f} GFLOP/s (median "
                     f"{g['onnxruntime']['gflops_median']:.1f}){tg}")
        fr = r["floor"]["fraction_of_floor"]
        lines.append(f"floor (FLOPs / ORT GEMM rate): {r['floor']['floor_ms']:.1f} ms; runs reach "
                     + ", ".join(f"{n} {100 * v:.1f}%" for n, v in fr.items()) + " of it")
    rt = [(n, run) for n, run in r["runs"].items() if "parts" in run]
    if rt:
        lines.append("")
        lines.append(f"runtime (pair runner), p50 ms: {'setting':<24} {'head impl':<16} "
                     f"{'features':>9} {'corr+head':>10} {'C kernels':>10} {'extra scan':>11}")
        for name, run in rt:
            pp = run["parts"]
            kern = pp.get("kernel", {}).get("p50_ms")
            impl = (run.get("head_impl") or {}).get("implementation", "?")
            lines.append(f"{'':31}{name:<24} {impl:<16} {pp['features']['p50_ms']:9.1f} "
                         f"{pp['head']['p50_ms']:10.1f} "
                         f"{kern if kern is not None else float('nan'):10.1f} "
                         f"{pp['extra']['p50_ms']:11.1f}")
        why = (r["runs"]["runtime"].get("head_impl") or {}).get("reason")
        if why:
            lines.append(f"  the runtime's head ran in ONNX Runtime: {why}")
        for name, run in rt:
            smp = run.get("sampling_impl") or {}
            if smp:
                lines.append(f"  {name}: features' OBELISK sampling in "
                             f"{'C' if smp['implementation'] == 'native' else 'ONNX Runtime'}"
                             + (f" ({smp['reason']})" if smp.get("reason") else ""))
    lines.append("max |disp - disp_pytorch| (voxels): " + ", ".join(
        f"{n} {v:.2e}" for n, v in r["check"]["disp_max_abs_diff_vs_pytorch_vox"].items()))
    lines.append(f"better ORT setting: latency {r['onnxruntime_better']['latency']}, peak RSS "
                 f"{r['onnxruntime_better']['peak_rss']}")
    p = r.get("profile")
    if p:
        lines.append("")
        lines.append(f"ONNX Runtime profile (mem_pattern={p['mem_pattern']}, {p['runs']} run(s), "
                     f"ms per run; model_run {p['model_run_ms']:.1f}, kernels {p['kernel_ms']:.1f}):")
        for key in ("by_prefix", "by_prefix_function", "by_function_nested"):
            tot = p["kernel_ms"] or 1.0
            lines.append(f"  {key}: " + ", ".join(f"{k} {v:.1f} ({100 * v / tot:.0f}%)"
                                                  for k, v in p[key].items()))
        lines.append("  slowest nodes: " + ", ".join(f"{t['node']} [{t['op']}] {t['ms']:.1f}"
                                                     for t in p["top_nodes"][:6]))
    lines.append("")
    lines.append("FLOPs per block:")
    tot = fl["total"] or 1
    for k, v in fl["blocks"].items():
        lines.append(f"  {k:<26} {v / 1e9:9.3f} GFLOP {100 * v / tot:5.1f}%")
    for n in r.get("notes", []):
        lines.append(f"note: {n}")
    return "\n".join(lines)
