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


def collect(probe: Probe | None = None) -> dict[str, Any]:
    """The doctor's findings as a JSON-ready dict (see :func:`format_report`)."""
    p = probe or Probe()
    from pddnet import __version__

    rep: dict[str, Any] = {"python": platform.python_version(), "pddnet": __version__,
                           "platform": platform.platform(), "packages": {}, "backends": [],
                           "plugin_paths": [], "problems": []}
    pk = rep["packages"]
    for mod in ("numpy", "onnx", "onnxruntime", "nibabel", "scipy"):
        m, err = _try(p.module, mod)
        pk[mod] = getattr(m, "__version__", "?") if m else f"missing ({err})"

    # ONNX Runtime wheels and providers
    ort_cpu, ort_gpu = p.dist_version("onnxruntime"), p.dist_version("onnxruntime-gpu")
    rep["onnxruntime_wheels"] = {"onnxruntime": ort_cpu, "onnxruntime-gpu": ort_gpu}
    if ort_cpu and ort_gpu:
        rep["problems"].append("both onnxruntime and onnxruntime-gpu are installed (they "
                               "overwrite each other); fix: pip uninstall -y onnxruntime "
                               "onnxruntime-gpu && " + GPU_EXTRA + " (GPU) or pip install "
                               "onnxruntime (CPU)")
    ort, ort_err = _try(p.module, "onnxruntime")
    providers = list(ort.get_available_providers()) if ort else []
    rep["onnxruntime_providers"] = providers

    # optional packages
    torch, torch_err = _try(p.module, "torch")
    triton, triton_err = _try(p.module, "triton")
    trt, trt_err = _try(p.module, "tensorrt")
    trtp, trtp_err = (_try(p.module, "tensorrt.plugin") if trt else (None, "tensorrt missing"))
    cuda_mod, cuda_err = _try(p.module, "cuda.bindings.runtime")
    if cuda_mod is None:
        cuda_mod, err2 = _try(p.module, "cuda.cudart")
        if cuda_mod is None:
            cuda_err = f"{cuda_err}; {err2}"
    cuda_ok = cuda_mod is not None
    if cuda_ok:
        gpu, gpu_err = _try(p.gpu)
    else:
        gpu, gpu_err = None, "cannot query without cuda-python"
    rep["gpu"] = gpu if gpu else {"error": gpu_err}
    torch_cuda = bool(torch) and bool(_try(p.torch_cuda, torch)[0])
    pk["torch"] = (torch.__version__ + (" (CUDA)" if torch_cuda else " (no CUDA)")) if torch \
        else torch_err
    pk["triton"] = getattr(triton, "__version__", "?") if triton else triton_err
    pk["tensorrt"] = trt.__version__ if trt else trt_err
    pk["cuda-python"] = "importable" if cuda_ok else cuda_err.split(";")[0]
    trt_ver = _ver(trt.__version__) if trt else None

    def backend(name, ok, detail, precisions=(), **extra):
        rep["backends"].append(Item(name, ok, detail,
                                    {"precisions": list(precisions) if ok else [], **extra}))

    # ONNX Runtime
    backend("onnxruntime (cpu)", bool(ort), "CPUExecutionProvider" if ort else
            f"onnxruntime not importable ({ort_err}); pip install onnxruntime",
            ("fp32", "fp16", "int8"))
    for prov, alias in (("CUDAExecutionProvider", "cuda"), ("TensorrtExecutionProvider",
                                                            "tensorrt")):
        if prov in providers:
            ok = gpu is not None
            backend(f"onnxruntime ({alias})", ok, prov if ok else
                    f"{prov} is built in but no GPU is usable ({gpu_err})",
                    ("fp32", "fp16", "int8"))
        else:
            backend(f"onnxruntime ({alias})", False,
                    f"{prov} not in this onnxruntime build; GPU providers need onnxruntime-gpu "
                    f"instead of onnxruntime: pip uninstall -y onnxruntime && {GPU_EXTRA}")

    # TensorRT backend
    why = []
    if not trt:
        why.append(f"tensorrt {trt_err}: {GPU_EXTRA} (TensorRT >= 10.9)")
    elif trt_ver < (10, 0):
        why.append(f"TensorRT {trt.__version__} is too old (needs >= 10.0; 10.9 for AOT plugins)")
    if not cuda_ok:
        why.append(f"cuda-python {cuda_err.split(';')[0]}: {GPU_EXTRA}")
    if gpu is None:
        why.append(f"no usable NVIDIA GPU ({gpu_err})")
    trt_precisions = ["fp32"]
    if gpu is not None:
        cc = _ver(gpu.get("compute_capability", "0.0"))
        if cc >= (5, 3):
            trt_precisions.append("fp16")
        if cc >= (6, 1):
            trt_precisions.append("int8")
    backend("tensorrt (--backend trt)", not why,
            f"TensorRT {trt.__version__} on {gpu['gpu_name']}" if not why else "; ".join(why),
            trt_precisions)

    # PyTorch reference
    backend("torch (reference)", bool(torch), "PyTorch " + torch.__version__ if torch else
            f"torch not importable ({torch_err}); pip install 'pddnet[train]'", ("fp32",))

    # plugin paths
    def path(name, ok, detail):
        rep["plugin_paths"].append(Item(name, ok, detail))

    base = ["needs the TensorRT backend (unusable, see above)"] if why else []
    path("native (local functions inlined by TensorRT)", not why,
         "every custom op becomes TensorRT layers; no plugin" if not why else base[0])
    aot_why = list(base)
    if trt and trt_ver < (10, 9):
        aot_why.append(f"TensorRT {trt.__version__} has no AOT Python plugins (needs >= 10.9)")
    if trt and trtp is None:
        aot_why.append(f"tensorrt.plugin not importable ({trtp_err})")
    elif trtp is not None and not hasattr(trtp, "aot_impl"):
        aot_why.append("tensorrt.plugin has no aot_impl (needs TensorRT >= 10.9)")
    if not triton:
        aot_why.append(f"triton not importable at build time ({triton_err}); pip install triton")
    path("aot (Triton PTX in the engine; no Python at run time)", not aot_why,
         "Correlation, DeformableSample3D, MinConv" if not aot_why else "; ".join(aot_why))
    jit_why = list(base)
    if trt and trt_ver < (10, 6):
        jit_why.append(f"TensorRT {trt.__version__} has no quickly deployable plugins (>= 10.6)")
    if not torch_cuda:
        jit_why.append("torch with CUDA is needed at run time"
                       + ("" if torch else f" (torch: {torch_err})"))
    if not triton:
        jit_why.append("triton is needed at run time")
    path("jit (Python plugins at run time, incl. MeanFieldStep)", not jit_why,
         "all four plugins" if not jit_why else "; ".join(jit_why))
    path("interpreter (kernels on the CPU, TRITON_INTERPRET=1; tests)", bool(triton and torch),
         "tests/test_kernels.py" if triton and torch else
         "needs triton and torch: pip install 'pddnet[train,dev]'")
    return rep


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
