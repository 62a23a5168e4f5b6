"""GPU check for the TensorRT path (called by scripts/gpu_check.sh; see docs/tensorrt.md).

Sections, each skipped with a printed reason when its requirements are missing:

1. ``kernels``: every Triton kernel of the TensorRT plugins on CUDA (torch CUDA tensors) against
   the PyTorch reference (``pddnet.model.ops``) at the Learn2Reg/paper geometry, float32 and
   float16, at the tolerances of docs/ops.md; median time per kernel (CUDA events).
   ``fused head``: the fused-head kernels (MinConvAffine, GridSmooth, the four-launch head
   against the model's literal head in float64) and the head's time next to the unfused path.
2. ``reference``: PyTorch eager latency of the whole model on CUDA at the same geometry (FP32 and
   FP16 autocast), the baseline for the engines.
3. ``engines``: with tensorrt importable, ``pddnet build`` of every precision graph given
   (FP32 exported here from the checkpoint; FP16/INT8 from ``--fp16``/``--int8`` or the
   calibration issue's ``pddnet calibrate`` when it exists), then the TensorRT backend's latency
   on the whole model at 192x160x256 (target: FP16 < 15 ms on an H100-class GPU).
4. ``validate``: ``pddnet validate --backend trt`` with the Dice gates where the validate command
   has that option; otherwise the TensorRT backend against ONNX Runtime on the same synthetic
   pairs (max |disp difference|, Dice difference), printed.

Exit status 1 when a check that ran failed, else 0. Sections 1 and 2 ran on an H200 without
TensorRT (2026-12-04, all kernels passed; figures in docs/tensorrt.md); the ``fused head`` part
of 1 (added 2026-12-07) and sections 3 and 4 have not run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

RESULTS: list[tuple[str, str, str]] = []  # (section, status ok|FAIL|skipped, detail)


def note(section: str, status: str, detail: str) -> None:
    RESULTS.append((section, status, detail))
    print(f"[{status:7s}] {section}: {detail}", flush=True)


def have(module: str) -> str | None:
    try:
        __import__(module)
        return None
    except Exception as exc:  # report any import failure
        return f"{module} not importable ({exc})"


def cuda_times_ms(fn, repeats: int, warmup: int = 1) -> tuple[float, float]:
    """(min, median) milliseconds of ``fn`` on the GPU over ``repeats`` runs (CUDA events)."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[0], times[len(times) // 2]


# ------------------------------------------------------------------------------------------
def check_kernels(repeats: int) -> None:
    missing = have("torch") or have("triton")
    if missing:
        return note("kernels", "skipped", missing)
    import torch

    if not torch.cuda.is_available():
        return note("kernels", "skipped", "torch has no CUDA device")
    from pddnet.backends.trt import kernels as K
    from pddnet.model import ops
    from pddnet.spec.config import PDDConfig, preset

    cfg = preset("paper")
    shape = (192, 160, 256)
    feat = PDDConfig.feature_shape(shape)
    stem = tuple(((n + 1) // 2 + 1) // 2 for n in shape)
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)

    def timed(fn):
        return cuda_times_ms(fn, repeats)[1]

    x = torch.randn(1, 4, *stem, device=dev, generator=g)
    off = (torch.rand(2 * cfg.channels, 3, device=dev, generator=g) * 2 - 1) * 0.1
    f = torch.randn(1, cfg.channels, *feat, device=dev, generator=g)
    m = torch.randn(1, cfg.channels, *feat, device=dev, generator=g)
    L = cfg.disp_size
    cost = torch.rand(*cfg.grid, L, L, L, device=dev, generator=g) * 10
    pen = torch.tensor(0.7, device=dev)
    cases = [
        ("DeformableSample3D", lambda t: K.deformable_sample(x.to(t), off, feat),
         lambda: ops.deformable_sample(x.double(), off.double(), feat), 1e-5, x),
        ("Correlation", lambda t: K.correlation(f.to(t), m.to(t), cfg.grid, L, cfg.capture),
         lambda: ops.correlation(f.double(), m.double(), cfg.grid, L, cfg.capture), 1e-4, None),
        ("MinConv approx", lambda t: K.minconv(cost.to(t), "approx"),
         lambda: ops.minconv_approx(cost.double()), 1e-5, cost),
        ("MinConv exact", lambda t: K.minconv(cost.to(t), "exact", pen),
         lambda: ops.minconv_exact(cost.double(), pen.double()), 1e-5, cost),
        ("MeanFieldStep approx", lambda t: K.mean_field_step(cost.to(t), "approx"),
         lambda: ops.mean_field_step(cost.double(), "approx"), 1e-5, cost),
    ]
    for name, run, ref_fn, tol32, rng_src in cases:
        try:
            ref = ref_fn()
            scale = float(ref.abs().max()) if name == "Correlation" else 1.0
            for dt, label in ((torch.float32, "fp32"), (torch.float16, "fp16")):
                got = run(dt)
                err = float((got.double() - ref).abs().max())
                if dt == torch.float32:
                    tol = tol32 * (scale if name == "Correlation" else max(1.0, float(
                        ref.abs().max())))
                else:
                    span = float(rng_src.max() - rng_src.min()) if rng_src is not None else scale
                    tol = 2e-3 * span
                ms = timed(lambda: run(dt))
                status = "ok" if err <= tol else "FAIL"
                note("kernels", status, f"{name} {label}: max err {err:.3g} (tol {tol:.3g}), "
                     f"{ms:.3f} ms median of {repeats}")
            del ref
            torch.cuda.empty_cache()
        except Exception as exc:
            note("kernels", "FAIL", f"{name}: {type(exc).__name__}: {exc}")


def check_fused_head(repeats: int, device: str = "cuda", cfg=None, timer=None) -> None:
    """The fused-head kernels (docs/tensorrt.md, "Fused head") on CUDA at the paper geometry:
    each against the float64 reference, the four-launch head against the model's literal head
    (``PDDNet.regularise`` + softmax + expectation + entropy), and its time next to the unfused
    path (two ``mean_field_step`` calls, the input combination, softmax, MatMul and
    entropy in torch: what an engine without the fusion runs, give or take TensorRT's own
    kernels). ``device``/``cfg``/``timer`` exist for a dry run of this function on the CPU
    under ``TRITON_INTERPRET=1`` at a tiny geometry (how it was checked without a GPU)."""
    missing = have("torch") or have("triton")
    if missing:
        return note("fused head", "skipped", missing)
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        return note("fused head", "skipped", "torch has no CUDA device")
    from pddnet.backends.trt import kernels as K
    from pddnet.model import ops
    from pddnet.spec.config import preset

    cfg = cfg or preset("paper")
    timer = timer or cuda_times_ms
    L, q = cfg.disp_size, float(cfg.capture)
    dev = torch.device(device)
    g = torch.Generator(device=dev).manual_seed(2)
    ssd = torch.rand(*cfg.grid, L, L, L, device=dev, generator=g) * 10
    other = torch.rand(*cfg.grid, L, L, L, device=dev, generator=g) * 10
    alpha = [float(a) for a in cfg.alpha_init]

    def err(a, b):
        return float((a.double() - b).abs().max())

    def unfused(x):
        a0, a1, a2, a3, a4, a5 = alpha
        cost = a1 + a0 * x
        first = K.mean_field_step(cost)
        second = K.mean_field_step(a4 + a2 * cost + a3 * first)
        p = torch.softmax(-a5 * second.reshape(*cfg.grid, -1), -1)
        disp = p @ ops.displacement_set(L, q, dtype=x.dtype, device=x.device).reshape(-1, 3)
        return disp, -(p * torch.log(p.clamp_min(1e-30))).sum(-1)

    try:
        ref = ops.minconv(0.7 * ssd.double() - 0.3 * other.double() + 1.5, "approx")
        for dt, label, tol in ((torch.float32, "fp32", 1e-5), (torch.float16, "fp16", 2e-2)):
            got = K.minconv_affine(ssd.to(dt), other.to(dt), (0.7, -0.3, 1.5))
            e = err(got, ref)
            ms = timer(lambda: K.minconv_affine(ssd.to(dt), other.to(dt),
                                                        (0.7, -0.3, 1.5)), repeats)[1]
            t = tol * max(1.0, float(ref.abs().max()))
            note("fused head", "ok" if e <= t else "FAIL",
                 f"MinConvAffine {label}: max err {e:.3g} (tol {t:.3g}), {ms:.3f} ms")
        ref = ops.smooth_grid(ssd.double())
        e = err(K.grid_smooth(ssd), ref)
        ms = timer(lambda: K.grid_smooth(ssd), repeats)[1]
        note("fused head", "ok" if e <= 1e-4 else "FAIL",
             f"GridSmooth fp32: max err {e:.3g} (tol 1e-4), {ms:.3f} ms")
        del ref
        # the whole head after the correlation, against the literal model head in float64
        a0, a1, a2, a3, a4, a5 = alpha
        cost = a1 + a0 * ssd.double()
        first = ops.mean_field_step(cost)
        second = ops.mean_field_step(a4 + a2 * cost + a3 * first)
        del cost, first
        probs = ops.displacement_probabilities(second, a5)
        del second
        rdisp = ops.expected_displacement(probs, L, q)
        rent = ops.displacement_entropy(probs)
        del probs
        if device == "cuda":
            torch.cuda.empty_cache()
        for dt, label, tol in ((torch.float32, "fp32", 1e-4), (torch.float16, "fp16", 2e-2)):
            x = ssd.to(dt)
            disp, ent = K.fused_head(x, alpha, q)
            ed, ee = err(disp, rdisp), err(ent, rent)
            ok = ed <= tol * q and ee <= tol * max(1.0, float(rent.abs().max()))
            ms = timer(lambda: K.fused_head(x, alpha, q), repeats)[1]
            ums = timer(lambda: unfused(x), repeats)[1]
            note("fused head", "ok" if ok else "FAIL",
                 f"fused head {label} (4 launches): grid_disp max err {ed:.3g} (tol "
                 f"{tol * q:.3g}), entropy {ee:.3g}; {ms:.3f} ms vs {ums:.3f} ms unfused "
                 f"(mean_field_step kernels + torch softmax/expectation/entropy), median of "
                 f"{repeats}")
    except Exception as exc:
        note("fused head", "FAIL", f"{type(exc).__name__}: {exc}")


def check_reference(shape, repeats: int) -> None:
    """PyTorch eager latency of the whole paper-preset model on CUDA: the baseline the
    TensorRT engines are measured against (random weights: latency does not depend on them)."""
    missing = have("torch")
    if missing:
        return note("reference", "skipped", missing)
    import torch

    if not torch.cuda.is_available():
        return note("reference", "skipped", "torch has no CUDA device")
    from pddnet.model.network import PDDNet
    from pddnet.spec.config import preset

    try:
        dev = torch.device("cuda")
        model = PDDNet(preset("paper"), seed=0).to(dev).eval()
        g = torch.Generator(device=dev).manual_seed(1)
        fixed = torch.randn(1, 1, *shape, device=dev, generator=g)
        moving = torch.randn(1, 1, *shape, device=dev, generator=g)
        for dtype, label in ((None, "fp32"), (torch.float16, "fp16 autocast")):
            with torch.no_grad(), torch.autocast("cuda", dtype=dtype or torch.float32,
                                                 enabled=dtype is not None):
                low, median = cuda_times_ms(lambda: model(fixed, moving).dense(shape), repeats,
                                            warmup=3)
            note("reference", "ok", f"PyTorch eager {label}, paper preset at "
                 f"{'x'.join(map(str, shape))}: {median:.2f} ms median of {repeats} (min "
                 f"{low:.2f}, peak memory {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB)")
        model = fixed = moving = None  # free the GPU memory before the kernels
        torch.cuda.empty_cache()
    except Exception as exc:
        note("reference", "FAIL", f"{type(exc).__name__}: {exc}")


# ------------------------------------------------------------------------------------------
def pddnet(*args, check=True, capture=False):
    cmd = [sys.executable, "-c", "from pddnet.cli import main; main()", *map(str, args)]
    print("$ pddnet " + " ".join(map(str, args)), flush=True)
    return subprocess.run(cmd, check=check, text=True,
                          stdout=subprocess.PIPE if capture else None,
                          stderr=subprocess.STDOUT if capture else None)


def has_command(name: str, option: str | None = None) -> bool:
    r = pddnet(name, "--help", check=False, capture=True)
    return r.returncode == 0 and (option is None or option in r.stdout)


def find_checkpoint(arg: str | None) -> Path | None:
    if arg:
        return Path(arg)
    import pddnet

    shipped = sorted((Path(pddnet.__file__).parent / "weights").glob("*.pt"))
    return shipped[0] if shipped else None


def check_engines(args, work: Path) -> dict[str, Path]:
    missing = have("tensorrt") or have("cuda.bindings.runtime") and have("cuda.cudart")
    if missing:
        note("engines", "skipped", f"{missing}: pip install 'pddnet[gpu]'")
        return {}
    ckpt = find_checkpoint(args.checkpoint)
    if ckpt is None or not ckpt.exists():
        note("engines", "skipped", "no checkpoint: pass --checkpoint (no shipped weights found "
             "in pddnet/weights/)")
        return {}
    graphs: dict[str, Path] = {}
    fp32 = work / "model_fp32.onnx"
    pddnet("export", ckpt, "--out", fp32, "--shape", *args.shape, "--overwrite")
    graphs["fp32"] = fp32
    for prec in ("fp16", "int8"):
        given = getattr(args, prec)
        if given:
            graphs[prec] = Path(given)
        elif has_command("calibrate"):
            note("engines", "skipped", f"{prec}: `pddnet calibrate` exists but its interface is "
                 f"not known to this script; pass --{prec} PATH")
        else:
            note("engines", "skipped", f"{prec}: no {prec} graph (the calibration issue's "
                 f"`pddnet calibrate` is not available; pass --{prec} PATH)")
    engines = work / "engines"
    import numpy as np

    from pddnet.backends import create_backend

    for prec, path in graphs.items():
        try:
            pddnet("check-trt", path)
            pddnet("build", "--onnx", path, "--out", engines, "--whole",
                   "--timing-cache", work / "timing.cache", "--workspace", args.workspace)
            with create_backend("trt", path, label="full", engine_cache=engines, build="never",
                                warmup=3, cuda_graph=args.cuda_graph) as b:
                rng = np.random.default_rng(0)
                feeds = {s.name: rng.normal(size=s.shape).astype(s.dtype) for s in b.input_specs}
                wall, gpu = [], []
                for _ in range(args.repeats):
                    b.run(feeds)
                    wall.append(b.last_run_ms)
                    gpu.append(b.last_gpu_ms)
                p50, g50 = float(np.median(wall)), float(np.median(gpu))
                ok = "ok" if prec != "fp16" or g50 < 15.0 else "FAIL"
                note("engines", ok, f"{prec}: full model {'x'.join(args.shape)} GPU {g50:.2f} ms "
                     f"(wall incl. copies {p50:.2f} ms) median of {args.repeats}"
                     + ("; target < 15 ms" if prec == "fp16" else ""))
        except Exception as exc:
            note("engines", "FAIL", f"{prec}: {type(exc).__name__}: {exc}")
    os.environ["PDDNET_ENGINE_CACHE"] = str(engines)
    return graphs


def check_validate(args, graphs: dict[str, Path], work: Path) -> None:
    if not graphs:
        return note("validate", "skipped", "no engines were built")
    ckpt = find_checkpoint(args.checkpoint)
    data = Path(args.data) if args.data else work / "synth"
    if not args.data and not data.exists():
        pddnet("data", "synth", "--out", data, "--subjects", 8, "--preset", "l2r",
               "--no-progress")
    if has_command("validate", "--backend"):
        for prec, path in graphs.items():
            r = pddnet("validate", "--checkpoint", ckpt, "--onnx", path, "--data", data,
                       "--backend", "trt", "--out", work / f"report_{prec}", "--overwrite",
                       "--max-pairs", args.pairs, check=False)
            note("validate", "ok" if r.returncode == 0 else "FAIL",
                 f"{prec}: pddnet validate --backend trt exit {r.returncode} "
                 f"(report in {work / f'report_{prec}'})")
        return
    note("validate", "skipped", "`pddnet validate` has no --backend option yet; comparing the "
         "TensorRT backend with ONNX Runtime on the same pairs instead")
    from pddnet.data.learn2reg import Learn2RegDataset
    from pddnet.runtime.session import Registrar

    ds = Learn2RegDataset(data)
    pairs = list(ds.pairs("test"))[: args.pairs]
    for prec, path in graphs.items():
        try:
            with Registrar(path, "onnxruntime") as ref, Registrar(path, "trt") as trt:
                for pair in pairs:
                    fx, mv, fl, ml = ds.load_pair(pair)
                    a = ref.register(fx, mv, ml, fl)
                    b = trt.register(fx, mv, ml, fl)
                    diff = float(abs(a.disp - b.disp).max())
                    dd = None if a.dice is None else 100 * abs(a.dice - b.dice)
                    note("validate", "ok", f"{prec} {pair}: max |disp trt - ort| {diff:.3f} vox, "
                         f"|delta Dice| {dd if dd is None else round(dd, 2)} points, TensorRT "
                         f"head {b.timings_ms.get('head')} ms")
        except Exception as exc:
            note("validate", "FAIL", f"{prec}: {type(exc).__name__}: {exc}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", help="weights (default: the shipped pddnet/weights/*.pt)")
    ap.add_argument("--fp16", help="FP16 graph from the calibration issue")
    ap.add_argument("--int8", help="Q/DQ INT8 graph from the calibration issue")
    ap.add_argument("--data", help="Learn2Reg-layout dataset (default: synthesised, l2r preset)")
    ap.add_argument("--shape", nargs=3, default=["192", "160", "256"])
    ap.add_argument("--workspace", default="8G")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--cuda-graph", action="store_true")
    ap.add_argument("--skip-kernels", action="store_true")
    ap.add_argument("--work", default="gpu-check-out")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if shutil.which("nvidia-smi"):
        subprocess.run(["nvidia-smi", "-L"], check=False)
    pddnet("doctor", check=False)
    check_reference(tuple(int(n) for n in args.shape), args.repeats)
    if args.skip_kernels:
        note("kernels", "skipped", "--skip-kernels")
    else:
        check_kernels(args.repeats)
        check_fused_head(args.repeats)
    graphs = check_engines(args, work)
    check_validate(args, graphs, work)
    print("\n==== summary ({:.0f} s) ====".format(time.time() - t0))
    for section, status, detail in RESULTS:
        print(f"[{status:7s}] {section}: {detail}")
    (work / "gpu_check.json").write_text(json.dumps(
        [dict(section=s, status=st, detail=d) for s, st, d in RESULTS], indent=2))
    return 1 if any(st == "FAIL" for _, st, _ in RESULTS) else 0


if __name__ == "__main__":
    sys.exit(main())
