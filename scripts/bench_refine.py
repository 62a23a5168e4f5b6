"""Speed of the instance optimisation: numpy (the runtime's choice) vs an ONNX graph of the same
step run by ONNX Runtime, and the share of a feed-forward registration it adds.

    .venv/bin/python scripts/bench_refine.py [--model model.onnx] [--threads 2] [--repeats 5]

1. ``numpy``: :func:`pddnet.runtime.refine.instance_optimise` (50 steps), median wall time at the
   ``small`` (the preset's grid, 20^3, L = 11) and ``paper`` (32^3, L = 15) geometries on random peaked
   probabilities.
2. ``onnx``: one refinement step (smoothing, trilinear sampling with its gradient, diffusion
   gradient, the transposed smoothing, Adam) written as an ONNX graph of standard ops
   (:func:`step_graph`, 90-odd nodes; checked against the numpy step), run 50 times by ONNX
   Runtime with the state fed back -- the cheapest form an unrolled 50-step graph could take
   per step (an unrolled graph runs the same kernels, plus 50x the nodes to load).
3. ``features`` (issue 13, the default method): :func:`pddnet.runtime.refine.feature_optimise`
   (40 steps, k = 4) on the ``small`` preset's feature grid (32 x 26 x 42, 16 channels of
   smooth random features, the moving map shifted), the numpy loop against the C loop of the
   kernel library (``impl="numpy"`` / ``"c"``, single thread and ``--threads``), interleaved
   repeats in one run, with the largest difference of the two fields.
4. With ``--model`` (an export with ``probs``): the feed-forward latency of that model on a
   synthetic pair at its grid (``Registrar.register``: preprocess + features + head), to put the
   refinement's time in proportion.

Timings are wall-clock medians; on a shared machine compare numbers from one run only.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from pddnet.runtime import refine as R
from pddnet.spec.config import preset
from pddnet.spec.refine import RefineOptions

F64 = TensorProto.DOUBLE
I64 = TensorProto.INT64


def step_graph(grid, L: int, q: float, weight: float, lr: float, betas=(0.9, 0.999),
               eps: float = 1e-8) -> onnx.ModelProto:
    """One Adam step of the refinement as an ONNX graph (float64, like the numpy path).

    Inputs: ``theta``, ``m``, ``v`` ``(G_i, G_j, G_k, 3)``, ``probs`` ``(K * L^3,)`` (flat),
    ``step`` ``()`` (1-based). Outputs: the updated ``theta``, ``m``, ``v``.
    """
    gi, gj, gk = grid
    K = gi * gj * gk
    h = 2.0 * q / (L - 1)
    nodes, inits = [], []
    count = [0]

    def const(value, dtype=np.float64):
        name = f"c{len(inits)}"
        inits.append(numpy_helper.from_array(np.asarray(value, dtype), name))
        return name

    def op(kind, *inputs, **attrs):
        count[0] += 1
        out = f"t{count[0]}"
        nodes.append(helper.make_node(kind, list(inputs), [out], **attrs))
        return out

    mats = [R.smoothing_matrix(n) for n in grid]
    lap = []
    for a, n in enumerate(grid):  # D^T D per axis, times 2 / (number of differences)
        d = np.diff(np.eye(n), axis=0)
        n_diff = (n - 1) * K // n * 3
        lap.append(d.T @ d * (2.0 * weight / n_diff))

    def along(x, mat_name, axis):
        eq = {0: "ai,ijkc->ajkc", 1: "bj,ijkc->ibkc", 2: "zk,ijkc->ijzc"}[axis]
        return op("Einsum", mat_name, x, equation=eq)

    s_names = [const(m) for m in mats]
    st_names = [const(m.T.copy()) for m in mats]
    lap_names = [const(m) for m in lap]
    u = "theta"
    for a in range(3):
        u = along(u, s_names[a], a)
    uf = op("Reshape", u, const([K, 3], np.int64))
    t = op("Div", op("Add", uf, const(q)), const(h))
    fl = op("Floor", t)
    f = op("Sub", t, fl)
    lo = op("Cast", fl, to=I64)
    hi = op("Add", lo, const(1, np.int64))
    zero, top = const(0, np.int64), const(L - 1, np.int64)

    def valid(i):
        return op("Cast", op("And", op("GreaterOrEqual", i, zero), op("LessOrEqual", i, top)),
                  to=F64)

    def col(x, a):
        return op("Gather", x, const(a, np.int64), axis=1)

    base = const(np.arange(K, dtype=np.int64) * L ** 3, np.int64)
    strides = (L * L, L, 1)
    idx, ok, w = [], [], []
    one = const(1.0)
    for a in range(3):
        la, ha, fa = col(lo, a), col(hi, a), col(f, a)
        idx.append([op("Mul", op("Clip", i, zero, top), const(strides[a], np.int64))
                    for i in (la, ha)])
        ok.append([valid(la), valid(ha)])
        w.append([op("Sub", one, fa), fa])
    v = {}
    for a in (0, 1):
        for b in (0, 1):
            ab = op("Add", op("Add", base, idx[0][a]), idx[1][b])
            for c in (0, 1):
                g = op("Gather", "probs", op("Add", ab, idx[2][c]), axis=0)
                mask = op("Mul", op("Mul", ok[0][a], ok[1][b]), ok[2][c])
                v[a, b, c] = op("Mul", g, mask)

    def lerp(x0, x1, wt):
        return op("Add", op("Mul", x0, wt[0]), op("Mul", x1, wt[1]))

    vk = {(a, b): lerp(v[a, b, 0], v[a, b, 1], w[2]) for a in (0, 1) for b in (0, 1)}
    vjk = {a: lerp(vk[a, 0], vk[a, 1], w[1]) for a in (0, 1)}
    dk = lerp(lerp(op("Sub", v[0, 0, 1], v[0, 0, 0]), op("Sub", v[0, 1, 1], v[0, 1, 0]), w[1]),
              lerp(op("Sub", v[1, 0, 1], v[1, 0, 0]), op("Sub", v[1, 1, 1], v[1, 1, 0]), w[1]),
              w[0])
    dj = lerp(op("Sub", vk[0, 1], vk[0, 0]), op("Sub", vk[1, 1], vk[1, 0]), w[0])
    di = op("Sub", vjk[1], vjk[0])
    dp = op("Concat", *[op("Unsqueeze", d, const([1], np.int64)) for d in (di, dj, dk)], axis=1)
    du = op("Mul", dp, const(-1.0 / (K * h)))
    du = op("Reshape", du, const([gi, gj, gk, 3], np.int64))
    for a in range(3):
        du = op("Add", du, along(u, lap_names[a], a))
    g = du
    for a in range(3):
        g = along(g, st_names[a], a)
    b1, b2 = betas
    m_new = op("Add", op("Mul", "m", const(b1)), op("Mul", g, const(1 - b1)))
    v_new = op("Add", op("Mul", "v", const(b2)), op("Mul", op("Mul", g, g), const(1 - b2)))
    stepf = op("Cast", "step", to=F64)
    bc1 = op("Sub", one, op("Pow", const(b1), stepf))
    bc2 = op("Sqrt", op("Sub", one, op("Pow", const(b2), stepf)))
    denom = op("Add", op("Div", op("Sqrt", v_new), bc2), const(eps))
    upd = op("Div", op("Mul", m_new, op("Div", const(lr), bc1)), denom)
    nodes.append(helper.make_node("Sub", ["theta", upd], ["theta_out"]))
    nodes.append(helper.make_node("Identity", [m_new], ["m_out"]))
    nodes.append(helper.make_node("Identity", [v_new], ["v_out"]))
    shp = [gi, gj, gk, 3]
    graph = helper.make_graph(
        nodes, "refine_step",
        [helper.make_tensor_value_info("theta", F64, shp), helper.make_tensor_value_info("m", F64, shp),
         helper.make_tensor_value_info("v", F64, shp),
         helper.make_tensor_value_info("probs", F64, [K * L ** 3]),
         helper.make_tensor_value_info("step", I64, [])],
        [helper.make_tensor_value_info(n, F64, shp) for n in ("theta_out", "m_out", "v_out")],
        initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model


def _probs(rng, grid, L):
    logits = rng.normal(0.0, 3.0, (*grid, L ** 3)).astype(np.float32)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)).astype(np.float32)


def bench_geometry(name, grid, L, q, threads, repeats, steps=50):
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    p = _probs(rng, grid, L)
    e = rng.normal(0, 0.3 * q, (*grid, 3)).astype(np.float32)
    opts = RefineOptions(steps=steps)
    t_np = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        res = R.instance_optimise(p, e, L, q, opts)
        t_np.append((time.perf_counter() - t0) * 1e3)
    model = step_graph(grid, L, q, opts.weight, opts.lr)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    # the probabilities are bound once (an OrtValue), so no step copies them
    flat = ort.OrtValue.ortvalue_from_numpy(p.astype(np.float64).reshape(-1))
    t_ox = []
    for _ in range(repeats):
        theta = e.astype(np.float64)
        m = np.zeros_like(theta)
        v = np.zeros_like(theta)
        t0 = time.perf_counter()
        for s in range(1, steps + 1):
            feeds = {"theta": theta, "m": m, "v": v, "step": np.array(s, np.int64)}
            feeds = {k: ort.OrtValue.ortvalue_from_numpy(x) for k, x in feeds.items()}
            feeds["probs"] = flat
            theta, m, v = (o.numpy() for o in sess.run_with_ort_values(
                ["theta_out", "m_out", "v_out"], feeds))
        t_ox.append((time.perf_counter() - t0) * 1e3)
    got = R.smooth(theta).astype(np.float32)
    err = float(np.abs(got - res.grid_disp).max())
    med_np, med_ox = statistics.median(t_np), statistics.median(t_ox)
    print(f"{name:<6} grid {grid} L={L}: numpy {med_np:7.1f} ms ({med_np / steps:.2f} ms/step)  "
          f"onnxruntime {med_ox:7.1f} ms ({med_ox / steps:.2f} ms/step, {len(model.graph.node)} "
          f"nodes/step)  max |onnx - numpy| = {err:.1e}")
    return med_np, med_ox


def _smooth_features(rng, c, shape, shift=(1.5, -1.0, 2.0)):
    """``c`` channels of a few random sinusoids each on ``shape``, and the same shifted."""
    x = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"))
    freq = rng.uniform(0.1, 0.5, (c, 3, 3)) * rng.choice([-1, 1], (c, 3, 3))
    phase = rng.uniform(0, 2 * np.pi, (c, 3))

    def f(pts):
        return np.stack([sum(np.sin(np.einsum("a,a...->...", freq[ch, t], pts) + phase[ch, t])
                             for t in range(3)) for ch in range(c)])

    sh = np.asarray(shift)[:, None, None, None]
    return f(x)[None].astype(np.float32), f(x - sh)[None].astype(np.float32)


def bench_features(threads, repeats):
    from pddnet.backends import native

    cfg = preset("small")
    shape = cfg.feature_shape((96, 80, 128))
    rng = np.random.default_rng(0)
    f, m = _smooth_features(rng, cfg.channels, shape)
    g = rng.normal(0, 0.02, (*cfg.grid, 3))
    opts = RefineOptions()  # features: 40 steps, lr 0.02, lam 4, k 4
    ok, why = native.refine_status()
    runs = [("numpy", "numpy", 1)] + ([("c", "c", 1), (f"c x{threads}", "c", threads)]
                                      if ok else [])
    times: dict[str, list[float]] = {name: [] for name, _, _ in runs}
    out = {}
    for _ in range(repeats):
        for name, impl, th in runs:
            res = R.feature_optimise(f, m, g, opts, impl=impl, threads=th)
            times[name].append(res.ms)
            out[name] = res
    med = {k: statistics.median(v) for k, v in times.items()}
    line = (f"features grid {shape} k={opts.components} {opts.steps} steps: numpy "
            f"{med['numpy']:.1f} ms ({med['numpy'] / opts.steps:.2f} ms/step)")
    if not ok:
        print(f"{line}; C loop not run: {why}")
        return med
    for name, ms in med.items():
        if name != "numpy":
            line += (f"  {name} {ms:.1f} ms ({ms / opts.steps:.2f} ms/step, "
                     f"{med['numpy'] / ms:.1f}x)")
    err = float(np.abs(out["c"].grid_disp - out["numpy"].grid_disp).max())
    de = max(abs(a - b) / abs(b) for a, b in zip(out["c"].energy, out["numpy"].energy))
    print(f"{line}  max |c - numpy| field {err:.1e}, energy rel {de:.1e}")
    return med


def bench_model(path, threads, repeats, steps=50):
    from pddnet.data.io import Volume
    from pddnet.runtime.session import Registrar

    with Registrar(path, threads=threads, refine=steps) as reg:
        shape = reg.info.image_shape
        rng = np.random.default_rng(1)
        img = rng.normal(0, 300, shape).astype(np.float32)
        aff = np.diag([*(reg.info.spacing_mm or (1.0, 1.0, 1.0)), 1.0])
        fixed, moving = Volume(img, aff), Volume(np.roll(img, 2, axis=0), aff)
        ff, ref = [], []
        for _ in range(repeats):
            r = reg.register(fixed, moving)
            t = r.timings_ms
            ff.append(t["preprocess"] + t["features"] + t["head"])
            ref.append(t["refine"])
    a, b = statistics.median(ff), statistics.median(ref)
    print(f"model {path}: feed-forward (preprocess+features+head) {a:.0f} ms, refinement "
          f"({steps} steps + upsampling) {b:.0f} ms = +{100 * b / a:.1f}%")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="an exported model with probs (feed-forward comparison)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-paper", action="store_true", help="skip the 32^3 geometry")
    ap.add_argument("--features-only", action="store_true",
                    help="only the features refinement, numpy vs C")
    a = ap.parse_args()
    bench_features(a.threads, a.repeats)
    if a.features_only:
        return
    small = preset("small")
    bench_geometry("small", small.grid, small.disp_size, small.capture, a.threads, a.repeats)
    if not a.no_paper:
        bench_geometry("paper", (32, 32, 32), 15, 0.4, a.threads, max(1, a.repeats // 2))
    if a.model:
        bench_model(a.model, a.threads, a.repeats)


if __name__ == "__main__":
    main()
