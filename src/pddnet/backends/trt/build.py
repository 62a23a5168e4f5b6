"""Building TensorRT engines from the exported ONNX graphs (``pddnet build``).

Written against the TensorRT Python API of 10.x and 11.x (``tensorrt`` is imported lazily,
only here and in the runtime backend):

- ``trt.Builder(logger).create_network(flags)`` with
  ``1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)`` (TensorRT >= 9.1; strong
  typing is the only mode in 11.x, where FP16/INT8 builder flags, precision constraints and
  implicit INT8 calibration are removed): tensor types come from the graph, so the FP32, FP16
  and Q/DQ-INT8 graphs of the calibration issue each build as they are;
  ``PREFER_AOT_PYTHON_PLUGINS`` (>= 10.9) when AOT plugins are bound (TensorRT refuses to choose
  between a plugin's AOT and JIT implementation without it);
- ``trt.OnnxParser(network, logger).parse(bytes)``; errors read with ``num_errors`` /
  ``get_error(i)`` (``desc()``, ``node_name()``, ``node_operator()``,
  ``local_function_stack()`` where the release has them). The parser flag
  ``OnnxParserFlag.ENABLE_PLUGIN_OVERRIDE`` (10.15+) is *not* set: the binding pass
  (:mod:`pddnet.backends.trt.binding`) drops the bound ops' local functions, which binds them on
  every release, and the flag would also let registered plugins capture nodes meant to stay
  functions;
- ``IBuilderConfig``: ``set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, bytes)``;
  timing cache ``create_timing_cache(bytes)`` / ``set_timing_cache(cache, ignore_mismatch=False)``
  / ``get_timing_cache().serialize()``; ``hardware_compatibility_level =
  trt.HardwareCompatibilityLevel.AMPERE_PLUS`` on request; ``BuilderFlag.TF32`` cleared for
  FP32 graphs (TF32 is on by default and rounds MatMul inputs to 10 mantissa bits, which the
  expanded SSD of the correlation cannot afford);
- ``builder.build_serialized_network(network, config)`` -> ``IHostMemory`` (``None`` on failure).

Nothing here has run: no GPU or TensorRT where it was written (docs/tensorrt.md).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import onnx

from pddnet._files import atomic_write, sha256_bytes
from pddnet._optional import require
from pddnet.backends.trt.binding import JIT_ONLY_OPS, BindingPlan, plan_binding
from pddnet.backends.trt.cache import EngineCache, EngineKey, Environment, Lookup
from pddnet.errors import PddnetError
from pddnet.graph.passes.bind_plugins import BindPlugins
from pddnet.spec import contract as C
from pddnet.spec.metadata import read_metadata

_PURPOSE = "building TensorRT engines (pddnet build)"

#: Feature -> first TensorRT version (docs/tensorrt.md has the sources).
FEATURES = {
    "strongly typed networks (NetworkDefinitionCreationFlag.STRONGLY_TYPED)": (9, 1),
    "quickly deployable Python plugins (tensorrt.plugin.register/impl), parsed from ONNX": (10, 6),
    "registered plugin preferred over a local function by the ONNX parser": (10, 7),
    "AOT Python plugins (tensorrt.plugin.aot_impl, PREFER_AOT_PYTHON_PLUGINS)": (10, 9),
    "OnnxParserFlag.ENABLE_PLUGIN_OVERRIDE": (10, 15),
    "weak typing removed (FP16/INT8 builder flags, INT8 calibrators)": (11, 0),
    "5D (volumetric) GridSample": (11, 2),
}


def parse_version(text: str) -> tuple[int, int]:
    parts = str(text).split(".")
    try:
        return int(parts[0]), int(parts[1]) if len(parts) > 1 else 0
    except ValueError as exc:
        raise PddnetError(f"cannot read the TensorRT version {text!r}") from exc


def parse_size(text: str | int | None) -> int | None:
    """``"4G"``, ``"512M"``, ``"1048576"`` -> bytes; ``None`` stays ``None``."""
    if text is None or isinstance(text, int):
        return text
    s = str(text).strip().upper().removesuffix("B").removesuffix("I")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    try:
        if s and s[-1] in mult:
            value = int(float(s[:-1]) * mult[s[-1]])
        else:
            value = int(s)
    except ValueError as exc:
        raise PddnetError(f"workspace size {text!r}: expected bytes or a size like 2G, 512M") \
            from exc
    if value <= 0:
        raise PddnetError(f"workspace size must be positive, got {text!r}")
    return value


def tensorrt():
    return require("tensorrt", _PURPOSE)


def current_environment(device: int = 0) -> Environment:
    """The GPU (cuda-python) and TensorRT version of this machine."""
    trt = tensorrt()
    from pddnet.backends.trt.cuda import device_properties

    p = device_properties(device)
    return Environment(p["gpu_name"], p["compute_capability"], p["sm_count"], trt.__version__)


def model_precision(model: onnx.ModelProto) -> str:
    """``fp32`` / ``fp16`` / ``int8``: the ``pddnet.precision`` metadata, else from the graph
    (Q/DQ nodes -> int8; float16 initializers or casts to float16 -> fp16)."""
    recorded = read_metadata(model).get(C.META_PRECISION)
    mode = recorded.get("mode") if isinstance(recorded, dict) else None
    if mode in ("fp32", "fp16", "int8"):
        return mode
    nodes = list(model.graph.node) + [n for f in model.functions for n in f.node]
    if any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in nodes):
        return "int8"
    f16 = onnx.TensorProto.FLOAT16
    if any(t.data_type == f16 for t in model.graph.initializer) or any(
            n.op_type == "Cast" and any(a.name == "to" and a.i == f16 for a in n.attribute)
            for n in nodes):
        return "fp16"
    return "fp32"


def model_bytes(model: onnx.ModelProto) -> bytes:
    return model.SerializeToString(deterministic=True)


@dataclass
class BuildOptions:
    """Options of ``pddnet build`` (see :func:`build_engine`)."""

    plugins: str = "auto"
    workspace: int | None = None
    timing_cache: str | os.PathLike | None = None
    hardware_compat: str = "none"          # "none" | "ampere_plus"
    tf32: bool = False
    optimization_level: int | None = None  # builder_optimization_level, 0-5 (TensorRT default 3)
    device: int = 0
    verbose: bool = False
    ops: Sequence[str] | None = None       # explicit plugin ops (library use)

    def __post_init__(self) -> None:
        if self.hardware_compat not in ("none", "ampere_plus"):
            raise PddnetError(f"hardware_compat must be 'none' or 'ampere_plus', got "
                              f"{self.hardware_compat!r}")
        self.workspace = parse_size(self.workspace)


@dataclass
class BuiltEngine:
    engine: bytes
    key: EngineKey
    plan: BindingPlan
    io: list[dict[str, Any]]
    build_s: float
    notes: list[str] = field(default_factory=list)

    def record_extra(self, options: BuildOptions, source: str | None) -> dict[str, Any]:
        return {
            "binding": {"mode": self.plan.mode, "ops": list(self.plan.ops or []),
                        "aot": self.plan.aot, "fused_head": list(self.plan.fused),
                        "jit_ops": [o for o in (self.plan.ops or []) if o in JIT_ONLY_OPS]},
            "io": self.io, "build_s": round(self.build_s, 3), "notes": self.notes,
            "builder": {"workspace": options.workspace, "tf32": options.tf32,
                        "optimization_level": options.optimization_level,
                        "timing_cache": None if options.timing_cache is None
                        else os.fspath(options.timing_cache)},
            "source": source,
        }


def plugins_label(plan: BindingPlan) -> str:
    """The plugin part of the cache key."""
    if plan.ops is None:
        return "none"
    if not plan.ops and not plan.fused:
        return "native"
    return ("aot:" if plan.aot else "jit:") + ",".join(sorted(plan.ops)) + (
        "+head:" + ",".join(plan.fused) if plan.fused else "")


def engine_key(model: onnx.ModelProto, plan: BindingPlan, env: Environment,
               options: BuildOptions) -> EngineKey:
    return EngineKey(sha256_bytes(model_bytes(model)), model_precision(model),
                     plugins_label(plan), env, options.hardware_compat)


def make_plan(model: onnx.ModelProto, options: BuildOptions, trt_version: str) -> BindingPlan:
    from pddnet._optional import available

    return plan_binding(options.plugins, model, trt_version=parse_version(trt_version),
                        triton_available=available("triton"), ops=options.ops)


def _parser_errors(parser) -> str:
    out = []
    for i in range(parser.num_errors):
        e = parser.get_error(i)
        parts = [e.desc()]
        for attr in ("node_name", "node_operator"):
            fn = getattr(e, attr, None)
            if fn is not None:
                try:
                    v = fn()
                except Exception:
                    v = None
                if v:
                    parts.append(f"{attr.replace('_', ' ')}: {v}")
        stack = getattr(e, "local_function_stack", None)
        if stack is not None:
            try:
                s = list(stack())
            except Exception:
                s = []
            if s:
                parts.append("in local function(s) " + " > ".join(s))
        out.append("; ".join(parts))
    return "\n  ".join(out) or "(the parser reported no details)"


def build_engine(model: onnx.ModelProto, *, options: BuildOptions | None = None,
                 env: Environment | None = None, label: str = "model",
                 echo: Callable[[str], None] | None = None) -> BuiltEngine:
    """Parse ``model`` (after the plugin rewrite) as a strongly typed network and build it.

    Raises :class:`PddnetError` with the parser's messages when the graph does not import, or
    when the builder fails (out of memory, unsupported layer on this GPU, ...).
    """
    options = options or BuildOptions()
    trt = tensorrt()
    env = env or current_environment(options.device)
    plan = make_plan(model, options, trt.__version__)
    key = engine_key(model, plan, env, options)
    notes = list(plan.notes)
    say = echo or (lambda s: None)

    parsed = model
    if plan.ops is not None:
        parsed, _ = BindPlugins(plan.ops).call(model)
        if plan.fused:
            from pddnet.backends.trt.head import FuseHead

            fuse = FuseHead()
            parsed, _ = fuse.call(parsed)
            notes.extend(f"fused head: {line}" for line in fuse.log)
        if plan.ops or plan.fused:
            from pddnet.backends.trt.plugins import register_plugins

            register_plugins(tuple(plan.ops) + tuple(plan.fused))
            say(f"{label}: bound {', '.join(plan.ops + plan.fused)} to the pddnet plugins "
                f"({'AOT' if plan.aot else 'JIT'})")

    t0 = time.perf_counter()
    logger = trt.Logger(trt.Logger.VERBOSE if options.verbose else trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    ntf = trt.NetworkDefinitionCreationFlag
    if hasattr(ntf, "STRONGLY_TYPED"):
        flags |= 1 << int(ntf.STRONGLY_TYPED)
    elif parse_version(trt.__version__) < (11, 0):
        raise PddnetError(f"TensorRT {trt.__version__} has no strongly typed networks; pddnet "
                          "needs TensorRT >= 10.0 (pip install 'pddnet[gpu]')")
    if (plan.ops or plan.fused) and plan.aot:
        if not hasattr(ntf, "PREFER_AOT_PYTHON_PLUGINS"):
            raise PddnetError(f"TensorRT {trt.__version__} cannot build AOT plugins (needs "
                              ">= 10.9); use --plugins native")
        flags |= 1 << int(ntf.PREFER_AOT_PYTHON_PLUGINS)
    elif (plan.ops or plan.fused) and hasattr(ntf, "PREFER_JIT_PYTHON_PLUGINS"):
        flags |= 1 << int(ntf.PREFER_JIT_PYTHON_PLUGINS)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(model_bytes(parsed)):
        raise PddnetError(f"TensorRT {trt.__version__} could not parse the {label} model "
                          f"(plugins: {plan.describe()}):\n  {_parser_errors(parser)}\n"
                          "`pddnet check-trt MODEL` lists the nodes TensorRT cannot import")
    io = []
    for i in range(network.num_inputs):
        t = network.get_input(i)
        io.append({"name": t.name, "io": "input", "shape": [int(s) for s in t.shape],
                   "dtype": str(t.dtype).split(".")[-1]})
    for i in range(network.num_outputs):
        t = network.get_output(i)
        io.append({"name": t.name, "io": "output", "shape": [int(s) for s in t.shape],
                   "dtype": str(t.dtype).split(".")[-1]})

    config = builder.create_builder_config()
    if options.workspace is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace))
    tf32 = getattr(trt.BuilderFlag, "TF32", None)
    if tf32 is not None and not options.tf32:
        config.clear_flag(tf32)
    if options.optimization_level is not None:
        config.builder_optimization_level = int(options.optimization_level)
    if options.hardware_compat == "ampere_plus":
        config.hardware_compatibility_level = trt.HardwareCompatibilityLevel.AMPERE_PLUS
    cache = None
    if options.timing_cache is not None:
        tc = Path(options.timing_cache)
        data = tc.read_bytes() if tc.is_file() else b""
        cache = config.create_timing_cache(data)
        config.set_timing_cache(cache, ignore_mismatch=False)
        notes.append(f"timing cache {tc} ({'loaded ' + str(len(data)) + ' B' if data else 'new'})")
    say(f"{label}: building the {key.precision} engine on {env.describe()} ...")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise PddnetError(f"TensorRT {trt.__version__} failed to build the {label} engine "
                          f"(plugins: {plan.describe()}); rerun with --verbose for the builder "
                          "log (out of GPU memory? try a larger --workspace)")
    engine = bytes(memoryview(serialized))
    if options.timing_cache is not None:
        out = config.get_timing_cache().serialize()
        with atomic_write(options.timing_cache) as tmp:
            tmp.write_bytes(bytes(memoryview(out)))
    return BuiltEngine(engine, key, plan, io, time.perf_counter() - t0, notes)


# ------------------------------------------------------------------------------------------
# Engines the runtime uses: the split parts (features, head) or the whole model
# ------------------------------------------------------------------------------------------

def runtime_parts(model: onnx.ModelProto, *, whole: bool = False) -> list[tuple[str, onnx.ModelProto]]:
    """``[(label, model)]`` exactly as :class:`~pddnet.runtime.session.Registrar` creates its
    backends: ``features`` and ``head`` from :func:`~pddnet.graph.split.split_model`, or
    ``full`` when the model cannot be split; ``whole=True`` adds the full model (for trtexec or
    a Triton server)."""
    from pddnet.graph.split import split_model

    try:
        parts = split_model(model)
        out = [("features", parts.features), ("head", parts.head)]
    except PddnetError:
        out = [("full", model)]
        whole = False
    if whole:
        out.append(("full", model))
    return out


def build_cached(model: onnx.ModelProto, cache: EngineCache, *, label: str,
                 options: BuildOptions | None = None, env: Environment | None = None,
                 force: bool = False, source: str | None = None,
                 echo: Callable[[str], None] | None = None) -> tuple[Lookup, bool]:
    """Return the cache entry for ``model`` on this machine, building it when missing, stale,
    foreign or corrupt (or ``force``). Returns ``(lookup, built)``."""
    options = options or BuildOptions()
    trt = tensorrt()
    env = env or current_environment(options.device)
    plan = make_plan(model, options, trt.__version__)
    key = engine_key(model, plan, env, options)
    found = cache.lookup(key, label)
    say = echo or (lambda s: None)
    if found.verdict.usable and not force:
        say(f"{label}: cached engine {found.engine_path} matches (model, precision, GPU, "
            "TensorRT)")
        return found, False
    if found.verdict.status != "missing":
        say(f"{label}: not using {found.engine_path.name}: {found.verdict.message()}")
    for p, v in found.others:
        say(f"{label}: ignoring {p.name} ({v.message()})")
    built = build_engine(model, options=options, env=env, label=label, echo=echo)
    cache.store(built.key, label, built.engine, extra=built.record_extra(options, source))
    again = cache.lookup(built.key, label)
    if not again.verdict.usable:  # pragma: no cover - would be a bug in the cache
        raise PddnetError(f"engine cache: the engine just written does not verify: "
                          f"{again.verdict.message()}")
    say(f"{label}: wrote {again.engine_path} ({len(built.engine) / 1e6:.1f} MB, "
        f"{built.build_s:.1f} s)")
    return again, True


def build_command(onnx_path: str | os.PathLike, out_dir: str | os.PathLike, *,
                  options: BuildOptions, whole: bool = False, force: bool = False,
                  echo: Callable[[str], None] = print) -> list[Lookup]:
    """``pddnet build``: engines for every part the runtime runs, into ``out_dir``."""
    from pddnet.graph.model import load_model

    loaded = load_model(onnx_path)
    cache = EngineCache(out_dir)
    results = []
    for label, part in runtime_parts(loaded.proto, whole=whole):
        lookup, _ = build_cached(part, cache, label=label, options=options, force=force,
                                 source=os.fspath(onnx_path), echo=echo)
        results.append(lookup)
    return results


__all__ = ["BuildOptions", "BuiltEngine", "build_engine", "build_cached", "build_command",
           "runtime_parts", "model_precision", "current_environment", "engine_key",
           "plugins_label", "parse_size", "parse_version", "FEATURES"]
