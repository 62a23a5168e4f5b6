"""``pddnet doctor``: what can run here, and for everything that cannot, why and how to fix it.

Reports versions, ONNX Runtime's execution providers (and whether both onnxruntime wheels are
installed, which breaks it), the GPU, and then per backend (ONNX Runtime CPU/CUDA/TensorRT EP,
the TensorRT backend, the PyTorch reference) whether it is usable, which precisions it can run
(the FP32 / FP16 / Q/DQ-INT8 graphs), and the TensorRT plugin paths:

- ``native``: custom ops inlined from their local functions (any TensorRT 10.x/11.x);
- ``aot``: plugins compiled to PTX at build time, engine runs without Python (TensorRT >= 10.9
  with ``tensorrt.plugin.aot_impl``, triton at build time);
- ``jit``: Python plugins launched at run time (TensorRT >= 10.6 ``tensorrt.plugin``, torch with
  CUDA and triton at run time);
- ``interpreter``: the plugin kernels on the CPU under ``TRITON_INTERPRET=1`` (tests).

Every probe goes through :class:`Probe`, so the report logic is tested with a fake machine.
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import platform
import sys
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

GPU_EXTRA = "pip install 'pddnet[gpu]'"
#: replaces the CPU onnxruntime wheel (a core dependency) with the GPU one (docs/install.md)
ORT_GPU_SWAP = ("pip uninstall -y onnxruntime onnxruntime-gpu && pip install --force-reinstall "
                "--no-deps 'onnxruntime-gpu>=1.18'")


class Probe:
    """Access to the machine; tests replace it."""

    def module(self, name: str) -> ModuleType:
        return importlib.import_module(name)

    def dist_version(self, dist: str) -> str | None:
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            return None

    def gpu(self) -> dict[str, Any]:
        from pddnet.backends.trt.cuda import device_properties

        return device_properties(0)

    def torch_cuda(self, torch: ModuleType) -> bool:
        return bool(torch.cuda.is_available())


@dataclass
class Item:
    name: str
    ok: bool
    detail: str
    extra: dict[str, Any] = field(default_factory=dict)


def _try(fn, *args):
    try:
        return fn(*args), None
    except ModuleNotFoundError as exc:
        return None, f"not installed ({exc.name})" if exc.name else "not installed"
    except Exception as exc:  # the doctor reports every failure, whatever its type
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return None, f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


def _ver(text: str) -> tuple[int, int]:
    try:
        a, b = (str(text).split(".") + ["0"])[:2]
        return int(a), int(b)
    except ValueError:
        return (0, 0)


@dataclass
class _Found:
    """What the probes found; the report's sections read it (``*_err``: why a module is missing)."""

    ort: ModuleType | None = None
    ort_err: str | None = None
    providers: list[str] = field(default_factory=list)
    torch: ModuleType | None = None
    torch_err: str | None = None
    torch_cuda: bool = False
    triton: ModuleType | None = None
    triton_err: str | None = None
    trt: ModuleType | None = None
    trt_err: str | None = None
    trt_ver: tuple[int, int] | None = None
    trtp: ModuleType | None = None
    trtp_err: str | None = None
    cuda_ok: bool = False
    cuda_err: str | None = None
    gpu: dict[str, Any] | None = None
    gpu_err: str | None = None


def _backend(name, ok, detail, precisions=(), **extra) -> Item:
    return Item(name, ok, detail, {"precisions": list(precisions) if ok else [], **extra})


def _skeleton() -> dict[str, Any]:
    from pddnet import __version__

    return {"python": platform.python_version(), "pddnet": __version__,
            "platform": platform.platform(), "packages": {}, "backends": [],
            "plugin_paths": [], "problems": []}


def _core_versions(p: Probe, pk: dict[str, Any]) -> None:
    for mod in ("numpy", "onnx", "onnxruntime", "nibabel", "scipy"):
        m, err = _try(p.module, mod)
        pk[mod] = getattr(m, "__version__", "?") if m else f"missing ({err})"


def _onnxruntime(p: Probe, rep: dict[str, Any], f: _Found) -> None:
    """The installed onnxruntime wheels (both at once is a problem) and the providers."""
    ort_cpu, ort_gpu = p.dist_version("onnxruntime"), p.dist_version("onnxruntime-gpu")
    rep["onnxruntime_wheels"] = {"onnxruntime": ort_cpu, "onnxruntime-gpu": ort_gpu}
    if ort_cpu and ort_gpu:
        rep["problems"].append("both onnxruntime and onnxruntime-gpu are installed (they "
                               "overwrite each other); fix: " + ORT_GPU_SWAP + " (GPU) or "
                               "pip uninstall -y onnxruntime onnxruntime-gpu && pip install "
                               "onnxruntime (CPU); see docs/install.md")
    f.ort, f.ort_err = _try(p.module, "onnxruntime")
    f.providers = list(f.ort.get_available_providers()) if f.ort else []
    rep["onnxruntime_providers"] = f.providers


def _optional_modules(p: Probe, f: _Found) -> None:
    f.torch, f.torch_err = _try(p.module, "torch")
    f.triton, f.triton_err = _try(p.module, "triton")
    f.trt, f.trt_err = _try(p.module, "tensorrt")
    f.trtp, f.trtp_err = (_try(p.module, "tensorrt.plugin") if f.trt
                          else (None, "tensorrt missing"))
    cuda_mod, f.cuda_err = _try(p.module, "cuda.bindings.runtime")
    if cuda_mod is None:
        cuda_mod, err2 = _try(p.module, "cuda.cudart")
        if cuda_mod is None:
            f.cuda_err = f"{f.cuda_err}; {err2}"
    f.cuda_ok = cuda_mod is not None
    f.trt_ver = _ver(f.trt.__version__) if f.trt else None


def _gpu(p: Probe, rep: dict[str, Any], f: _Found) -> None:
    if f.cuda_ok:
        f.gpu, f.gpu_err = _try(p.gpu)
    else:
        f.gpu, f.gpu_err = None, "cannot query without cuda-python"
    rep["gpu"] = f.gpu if f.gpu else {"error": f.gpu_err}


def _optional_versions(p: Probe, pk: dict[str, Any], f: _Found) -> None:
    f.torch_cuda = bool(f.torch) and bool(_try(p.torch_cuda, f.torch)[0])
    pk["torch"] = (f.torch.__version__ + (" (CUDA)" if f.torch_cuda else " (no CUDA)")) \
        if f.torch else f.torch_err
    pk["triton"] = getattr(f.triton, "__version__", "?") if f.triton else f.triton_err
    pk["tensorrt"] = f.trt.__version__ if f.trt else f.trt_err
    pk["cuda-python"] = "importable" if f.cuda_ok else f.cuda_err.split(";")[0]


def _ort_backends(f: _Found) -> list[Item]:
    """ONNX Runtime: the CPU provider, then the CUDA and TensorRT execution providers."""
    out = [_backend("onnxruntime (cpu)", bool(f.ort), "CPUExecutionProvider" if f.ort else
                    f"onnxruntime not importable ({f.ort_err}); pip install onnxruntime",
                    ("fp32", "fp16", "int8"))]
    for prov, alias in (("CUDAExecutionProvider", "cuda"), ("TensorrtExecutionProvider",
                                                            "tensorrt")):
        if prov in f.providers:
            ok = f.gpu is not None
            out.append(_backend(f"onnxruntime ({alias})", ok, prov if ok else
                                f"{prov} is built in but no GPU is usable ({f.gpu_err})",
                                ("fp32", "fp16", "int8")))
        else:
            out.append(_backend(
                f"onnxruntime ({alias})", False,
                f"{prov} not in this onnxruntime build; GPU providers need onnxruntime-gpu "
                f"instead of onnxruntime: {ORT_GPU_SWAP} (docs/install.md)"))
    return out


def _trt_unusable(f: _Found) -> list[str]:
    """Why the TensorRT backend cannot run here (empty: it can)."""
    why = []
    if not f.trt:
        why.append(f"tensorrt {f.trt_err}: {GPU_EXTRA} (TensorRT >= 10.9)")
    elif f.trt_ver < (10, 0):
        why.append(f"TensorRT {f.trt.__version__} is too old (needs >= 10.0; 10.9 for AOT "
                   "plugins)")
    if not f.cuda_ok:
        why.append(f"cuda-python {f.cuda_err.split(';')[0]}: {GPU_EXTRA}")
    if f.gpu is None:
        why.append(f"no usable NVIDIA GPU ({f.gpu_err})")
    return why


def _trt_backend(f: _Found, why: list[str]) -> Item:
    precisions = ["fp32"]
    if f.gpu is not None:
        cc = _ver(f.gpu.get("compute_capability", "0.0"))
        if cc >= (5, 3):
            precisions.append("fp16")
        if cc >= (6, 1):
            precisions.append("int8")
    return _backend("tensorrt (--backend trt)", not why,
                    f"TensorRT {f.trt.__version__} on {f.gpu['gpu_name']}" if not why
                    else "; ".join(why), precisions)


def _torch_backend(f: _Found) -> Item:
    return _backend("torch (reference)", bool(f.torch),
                    "PyTorch " + f.torch.__version__ if f.torch else
                    f"torch not importable ({f.torch_err}); pip install 'pddnet[train]'",
                    ("fp32",))


def _aot_unusable(f: _Found, base: list[str]) -> list[str]:
    why = list(base)
    if f.trt and f.trt_ver < (10, 9):
        why.append(f"TensorRT {f.trt.__version__} has no AOT Python plugins (needs >= 10.9)")
    if f.trt and f.trtp is None:
        why.append(f"tensorrt.plugin not importable ({f.trtp_err})")
    elif f.trtp is not None and not hasattr(f.trtp, "aot_impl"):
        why.append("tensorrt.plugin has no aot_impl (needs TensorRT >= 10.9)")
    if not f.triton:
        why.append(f"triton not importable at build time ({f.triton_err}); pip install triton")
    return why


def _jit_unusable(f: _Found, base: list[str]) -> list[str]:
    why = list(base)
    if f.trt and f.trt_ver < (10, 6):
        why.append(f"TensorRT {f.trt.__version__} has no quickly deployable plugins (>= 10.6)")
    if not f.torch_cuda:
        why.append("torch with CUDA is needed at run time"
                   + ("" if f.torch else f" (torch: {f.torch_err})"))
    if not f.triton:
        why.append("triton is needed at run time")
    return why


def _plugin_paths(f: _Found, trt_why: list[str]) -> list[Item]:
    """The TensorRT plugin paths: native, aot, jit, interpreter."""
    base = ["needs the TensorRT backend (unusable, see above)"] if trt_why else []
    aot_why, jit_why = _aot_unusable(f, base), _jit_unusable(f, base)
    cpu_ok = bool(f.triton and f.torch)
    return [
        Item("native (local functions inlined by TensorRT)", not trt_why,
             "every custom op becomes TensorRT layers; no plugin" if not trt_why else base[0]),
        Item("aot (Triton PTX in the engine; no Python at run time)", not aot_why,
             "Correlation, DeformableSample3D, MinConv" if not aot_why else "; ".join(aot_why)),
        Item("jit (Python plugins at run time, incl. MeanFieldStep)", not jit_why,
             "all four plugins" if not jit_why else "; ".join(jit_why)),
        Item("interpreter (kernels on the CPU, TRITON_INTERPRET=1; tests)", cpu_ok,
             "tests/backends/test_kernels.py" if cpu_ok else
             "needs triton and torch: pip install 'pddnet[train,dev]'"),
    ]


def collect(probe: Probe | None = None) -> dict[str, Any]:
    """The doctor's findings as a JSON-ready dict (see :func:`format_report`)."""
    p = probe or Probe()
    rep = _skeleton()
    f = _Found()
    _core_versions(p, rep["packages"])
    _onnxruntime(p, rep, f)
    _optional_modules(p, f)
    _gpu(p, rep, f)
    _optional_versions(p, rep["packages"], f)
    trt_why = _trt_unusable(f)
    rep["backends"] += [*_ort_backends(f), _trt_backend(f, trt_why), _torch_backend(f)]
    rep["plugin_paths"] += _plugin_paths(f, trt_why)
    rep["native"] = _native()
    return rep


def _native() -> dict[str, Any]:
    """The C kernel library of the fused head (:mod:`pddnet.backends.native`): built or not,
    the kernel sets this CPU runs, the one the runtime uses, or why the head runs in ONNX
    Runtime; ``sampling``: whether the runtime runs the features' OBELISK sampling in it."""
    import platform

    from pddnet.backends import native

    try:
        st = native.status()
    except Exception as exc:  # a bad PDDNET_NATIVE value: report it, do not fail the doctor
        return {"built": None, "isa": None, "reason": str(exc), "isas": {}, "path": None,
                "machine": platform.machine()}
    st["machine"] = platform.machine()
    from pddnet.backends.native import features

    ok, why = features.sampling_status()
    st["sampling"] = {"runs": ok, "reason": why}
    return st


def format_report(rep: dict[str, Any]) -> str:
    out = [f"pddnet {rep['pddnet']} on Python {rep['python']} ({rep['platform']})", "",
           "packages:"]
    for k, v in rep["packages"].items():
        out.append(f"  {k:12s} {v}")
    w = rep.get("onnxruntime_wheels", {})
    out.append(f"  wheels       onnxruntime={w.get('onnxruntime')}, "
               f"onnxruntime-gpu={w.get('onnxruntime-gpu')}")
    out.append("onnxruntime providers: " + (", ".join(rep["onnxruntime_providers"]) or "none"))
    g = rep["gpu"]
    out.append("gpu: " + (f"{g['gpu_name']} (compute {g['compute_capability']}, "
                          f"{g['sm_count']} SMs)" if "gpu_name" in g else f"none ({g['error']})"))
    out.append("")
    out.append("backends:")
    for b in rep["backends"]:
        prec = ", ".join(b.extra.get("precisions", []))
        out.append(f"  [{'ok' if b.ok else '--'}] {b.name}: {b.detail}"
                   + (f" -- precisions: {prec}" if b.ok else ""))
    nat = rep.get("native")
    if nat is not None:
        sets = ", ".join(k for k, v in nat.get("isas", {}).items() if v) or "none"
        if nat.get("isa"):
            line = (f"  [ok] C head kernels: {nat['isa']} (this CPU runs: {sets}; "
                    f"{nat['machine']}); the runtime runs the standard float32 head in them")
        else:
            line = (f"  [--] C head kernels: not used ({nat.get('reason')}); the head runs in "
                    "ONNX Runtime (its function bodies)")
        out.append(line)
        smp = nat.get("sampling") or {}
        if smp.get("runs"):
            out.append("  [ok] C OBELISK sampling: the runtime runs the standard float32 features' "
                       "two DeformableSample3D nodes and their difference in it")
        else:
            out.append(f"  [--] C OBELISK sampling: not used ({smp.get('reason')}); the "
                       "features' DeformableSample3D nodes run in ONNX Runtime")
    out.append("")
    out.append("TensorRT plugin paths:")
    for pth in rep["plugin_paths"]:
        out.append(f"  [{'ok' if pth.ok else '--'}] {pth.name}: {pth.detail}")
    if rep["problems"]:
        out.append("")
        out.append("problems:")
        out += [f"  {x}" for x in rep["problems"]]
    return "\n".join(out)


def as_json(rep: dict[str, Any]) -> dict[str, Any]:
    def conv(x):
        if isinstance(x, Item):
            return {"name": x.name, "ok": x.ok, "detail": x.detail, **x.extra}
        if isinstance(x, dict):
            return {k: conv(v) for k, v in x.items()}
        if isinstance(x, list):
            return [conv(v) for v in x]
        return x
    return conv(rep)


def main() -> int:  # pragma: no cover - thin wrapper
    print(format_report(collect()))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
