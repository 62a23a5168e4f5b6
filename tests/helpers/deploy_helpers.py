"""Shared helpers of the deployment tests: fake precision graphs, hand-made validation reports,
fake TensorRT engines in the real engine-cache layout, and a bundle built from them.

The models are :mod:`helpers.fake_models` graphs (contract-conforming, milliseconds to run); an "fp16"
or "int8" graph here is the same float32 graph with ``pddnet.precision`` metadata saying so --
enough for packaging and selection logic, which read the metadata. Engines are random bytes
with a metadata record made by :func:`pddnet.backends.trt.cache.make_record` for a given GPU
environment, keyed to the real ``features``/``head``/``full`` parts of a graph.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from helpers.fake_models import make_model, save_model

SHAPE = (24, 21, 30)


def precision_model(path: Path, precision: str = "fp32", *, seed: int = 0, gain: float = 0.3,
                    translation=(1.0, -2.0, 0.5), **kw) -> Path:
    model = make_model(SHAPE, translation=translation, gain=gain, seed=seed, **kw)
    for p in model.metadata_props:
        if p.key == "pddnet.precision":
            p.value = json.dumps({"mode": precision})
    return save_model(model, path)


def sha256(path) -> str:
    from pddnet._files import sha256_file

    return sha256_file(path)


def candidate(name, model, precision, *, backend="onnxruntime", passed=True, p50=100.0,
              providers=("CPUExecutionProvider",), mode="ff", disp_mm=(0.1, 0.3)):
    return {
        "name": name, "backend": backend, "model": str(model),
        "model_sha256": sha256(model) if model else None, "precision": precision,
        "reference": False, "mode": mode, "describe": {"providers": list(providers)},
        "summary": {"dice_mean": 0.5, "delta_dice_points_max_abs": 0.01 if passed else 3.0,
                    "disp_diff_max_vox": 1e-5, "disp_diff_mean_vox": 1e-6,
                    "disp_diff_p99_mm": disp_mm[0], "disp_diff_max_mm": disp_mm[1],
                    "dice_per_label": {"1": 0.5}},
        "latency": {"n": 3, "p50_ms": p50, "p95_ms": p50 * 1.1, "p99_ms": p50 * 1.2,
                    "samples_ms": [p50, p50 * 1.05, p50 * 1.2]},
        "memory": {"peak_rss_mb": 300.0},
        "speedup_vs_reference": 2.0,
        "gates": [{"metric": "delta_dice_points", "description": "|delta mean Dice|",
                   "unit": "points", "threshold": 0.5,
                   "measured": 0.01 if passed else 3.0, "passed": passed,
                   "worst_pair": "a <- b",
                   "reason": "0.01 <= 0.5 points" if passed else "3 > 0.5 points"}],
        "passed": passed,
    }


def write_report(folder: Path, candidates: list[dict]) -> Path:
    """A minimal ``pddnet validate`` report.json holding ``candidates`` (plus a reference)."""
    from pddnet.validation.compare import SCHEMA

    ref = candidate("pytorch", None, "fp32", backend="torch", p50=500.0)
    ref.update(reference=True, gates=[], passed=True)
    cands = {"pytorch": ref, **{c["name"]: c for c in candidates}}
    report = {"schema": SCHEMA, "created": "2026-01-01T00:00:00+00:00", "duration_s": 1.0,
              "status": "passed" if all(c["passed"] for c in candidates) else "failed",
              "failed_gates": [], "reference": "pytorch",
              "settings": {"data": "d", "split": "test", "pairs": 1, "warmup": 1, "repeats": 3,
                           "isolated": False, "threads": 1},
              "machine": {"cpu_model": "test cpu", "usable_cores": 2, "threads": 1},
              "pairs": [{"pair": "a <- b", "dice_mean_before": 0.3}],
              "label_names": {"1": "spleen"}, "candidates": cands, "notes": []}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "report.json").write_text(json.dumps(report, indent=1))
    return folder


def environment(gpu="NVIDIA H100 80GB HBM3", cc="9.0", sms=132, trt="10.9.0.34"):
    from pddnet.backends.trt.cache import Environment

    return Environment(gpu, cc, sms, trt)


def fake_engines(model_path: Path, folder: Path, env, *, labels=("features", "head", "full"),
                 plugins="native", jit_ops=()) -> list[Path]:
    """Engines for the parts of ``model_path`` in ``folder`` (engine-cache layout)."""
    from pddnet._files import sha256_bytes
    from pddnet.backends.trt.build import model_bytes, model_precision, runtime_parts
    from pddnet.backends.trt.cache import EngineCache, EngineKey
    from pddnet.graph.model import load_model

    proto = load_model(model_path).proto
    cache = EngineCache(folder)
    out = []
    rng = np.random.default_rng(len(str(model_path)))
    for label, part in runtime_parts(proto, whole=True):
        if label not in labels:
            continue
        key = EngineKey(sha256_bytes(model_bytes(part)), model_precision(proto), plugins, env)
        io = [{"name": i.name, "io": "input",
               "shape": [d.dim_value for d in i.type.tensor_type.shape.dim], "dtype": "FLOAT"}
              for i in part.graph.input if i.name not in {t.name for t in part.graph.initializer}]
        io += [{"name": o.name, "io": "output",
                "shape": [d.dim_value for d in o.type.tensor_type.shape.dim], "dtype": "FLOAT"}
               for o in part.graph.output]
        engine, _ = cache.store(key, label, rng.bytes(64),
                                extra={"io": io, "binding": {"jit_ops": list(jit_ops)}})
        out.append(engine)
    return out


def build_bundle(tmp: Path, precisions=("fp32",), *, passed=None, p50=None, engines_env=None,
                 tar=False, allow_unvalidated=False, name="bundle", disp_mm=None,
                 gates=None):
    """Package fake graphs of ``precisions`` with a report saying ``passed``/``p50`` per
    precision; returns ``(bundle path, {precision: model path})``."""
    from pddnet.deploy.package import package

    passed = passed or {}
    p50 = p50 or {}
    models = {p: precision_model(tmp / "src" / f"model.{p}.onnx", p, seed=i)
              for i, p in enumerate(precisions)}
    disp_mm = disp_mm or {}
    cands = [candidate(f"onnxruntime-{p}", m, p, passed=passed.get(p, True),
                       p50=p50.get(p, 100.0), disp_mm=disp_mm.get(p, (0.1, 0.3)))
             for p, m in models.items()]
    engine_paths = []
    if engines_env is not None:
        for p, m in models.items():
            engine_paths += fake_engines(m, tmp / "engines", engines_env)
            cands.append(candidate(f"tensorrt-{p}", m, p, backend="tensorrt", p50=5.0))
    report = write_report(tmp / "report", cands)
    res = package(models["fp32"], report_dir=report, fp16=models.get("fp16"),
                  int8=models.get("int8"),
                  engines=[tmp / "engines"] if engine_paths else (), out=tmp / name, tar=tar,
                  allow_unvalidated=allow_unvalidated, echo=lambda s: None, **(gates or {}))
    return res, models
