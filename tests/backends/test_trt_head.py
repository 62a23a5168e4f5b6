"""The fused TensorRT head: the rewrite (pddnet.backends.trt.head), its place in the binding plan
and the engine build, and the four fused-head plugins (pddnet.backends.trt.plugins).

Checked: on real exports (folded and literal alphas, with and without the probs/entropy
outputs, random alphas) the rewrite leaves Correlation -> MinConvAffine -> GridSmooth ->
MinConvAffine -> DisplacementHead[Probs] with the right affine coefficients, no mean-field
function, the input model unchanged; executing the rewritten nodes with the Triton kernels
(interpreter, CPU) on ONNX Runtime's correlation output gives ONNX Runtime's grid_disp,
entropy and probs of the original model (float32 tolerances); chains it must not fuse are left
alone with a reason; ``plan_binding("auto")`` fuses only with AOT plugins; the cache label.
In a process without the interpreter: the four kernels compile to PTX for sm_90 and the plugins
register through a stand-in for ``tensorrt.plugin`` (the documented signature rules, including
multi-output ``Tuple[TensorDesc, ...]`` returns and ``NDArray[np.float32]`` attributes), with
TensorRT's AOT parameter lists and launch grids.

Not tested here (needs a GPU and TensorRT): the real parser binding the new nodes, engine
building, GPU numerics and timing (scripts/gpu_check.py has a section for them).
"""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before the first import of triton (and of the kernels)

import dataclasses  # noqa: E402
import importlib  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import pytest  # noqa: E402
from onnx import TensorProto, helper  # noqa: E402

from helpers.fake_tensorrt import write_fake_tensorrt  # noqa: E402
from pddnet.backends.trt.binding import HEAD_OPS, BindingPlan, plan_binding  # noqa: E402
from pddnet.backends.trt.build import plugins_label  # noqa: E402
from pddnet.backends.trt.head import FuseHead, displacement_table  # noqa: E402
from pddnet.graph.passes.bind_plugins import BindPlugins  # noqa: E402
from pddnet.spec import contract as C  # noqa: E402

torch = pytest.importorskip("torch")
SSD = "head/Correlation_0"


def _head(fold: bool, outputs, seed: int, grid=(3, 2, 3), L=3):
    from pddnet.export.onnx_export import export_model
    from pddnet.graph.split import split_model
    from pddnet.model.network import PDDNet
    from pddnet.spec.config import preset

    cfg = dataclasses.replace(preset("tiny"), grid=grid, disp_size=L)
    net = PDDNet(cfg, seed=seed).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        net.alpha.copy_(torch.rand(6, generator=g) * 1.5 + 0.3)
        net.alpha[1] = -0.4
        model = export_model(net, (24, 24, 24), outputs=outputs, fold_alphas=fold)
    return split_model(model).head, net


def _ops(model):
    return [n.op_type for n in model.graph.node if n.op_type != "Constant"]


def _attrs(node):
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


@pytest.mark.parametrize("fold", [True, False])
@pytest.mark.parametrize("outputs", [(), ("probs", "entropy")])
def test_rewrite_structure(fold, outputs):
    head, net = _head(fold, outputs, seed=3)
    before = head.SerializeToString()
    bound, _ = BindPlugins(("Correlation",)).call(head)
    fused, changed = FuseHead().call(bound)
    assert changed and head.SerializeToString() == before
    want = "DisplacementHeadProbs" if "probs" in outputs else "DisplacementHead"
    assert _ops(fused)[:5] == ["Correlation", "MinConvAffine", "GridSmooth", "MinConvAffine", want]
    assert not {"MeanFieldStep", "Softmax", "LogSoftmax", "ReduceSum"} & set(_ops(fused))
    assert fused.functions == [] and len(fused.graph.output) == len(head.graph.output)
    onnx.checker.check_model(fused)
    a = net.alpha.detach().double().numpy()
    nodes = [n for n in fused.graph.node if n.op_type in HEAD_OPS]
    c1, c2 = (_attrs(n)["coeffs"] for n in nodes if n.op_type == "MinConvAffine")
    assert [n.op_type for n in nodes] == ["MinConvAffine", "GridSmooth", "MinConvAffine", want]
    assert nodes[0].input[0] == nodes[0].input[1] == SSD and nodes[2].input[0] == SSD
    assert nodes[2].input[1] == nodes[1].output[0]  # the first step's smoothed output
    if fold:  # D, then D + (a3/a2) first; the head's scale carries -a5 a0 a2
        np.testing.assert_allclose(c1, [1, 0, 0], rtol=1e-6)
        np.testing.assert_allclose(c2, [1, a[3] / a[2], 0], rtol=1e-6)
        scale = -a[5] * a[0] * a[2]
    else:  # a0 D + a1, then a2 a0 D + a3 first + a4 + a2 a1
        np.testing.assert_allclose(c1, [a[0], 0, a[1]], rtol=1e-6)
        np.testing.assert_allclose(c2, [a[2] * a[0], a[3], a[4] + a[2] * a[1]], rtol=1e-5)
        scale = -a[5]
    h = _attrs(nodes[3])
    assert h["capture"] == pytest.approx(0.3) and h["scale"] == pytest.approx(scale, rel=1e-6)
    assert all(_attrs(n)["plugin_namespace"] == b"pddnet" for n in nodes)
    if "entropy" in outputs:
        assert nodes[3].output[1] == "entropy" and nodes[3].output[2] == "probs"


def _kernels():
    from pddnet.backends.trt import kernels as K

    if "Interpreted" not in type(K._head_kernel).__name__:
        K = importlib.reload(K)
    return K


def _run_fused(K, model, env):
    """Execute the fused-head nodes of ``model`` with the Triton launchers (others skipped)."""
    for n in model.graph.node:
        at = _attrs(n)
        ins = [env.get(x) for x in n.input]
        if n.op_type == "MinConvAffine":
            a, b, c = (float(v) for v in at["coeffs"])
            mode = at["mode"].decode()
            pen = ins[2] if mode == "exact" else None
            res = [K.minconv_affine(ins[0], ins[1] if b else None, (a, b, c), mode, pen)]
        elif n.op_type == "GridSmooth":
            res = [K.grid_smooth(ins[0])]
        elif n.op_type.startswith("DisplacementHead"):
            res = K.displacement_head(ins[0], at["scale"], at["capture"],
                                      probs=n.op_type.endswith("Probs"))
        else:
            continue
        env.update(zip(n.output, res))
    return env


@pytest.mark.parametrize("fold,seed", [(True, 5), (False, 6)])
def test_rewritten_head_computes_the_model_outputs(fold, seed):
    """ONNX Runtime on the exported head vs the Triton kernels on the rewritten one."""
    pytest.importorskip("triton")
    import onnxruntime as ort

    head, _ = _head(fold, ("probs", "entropy"), seed=seed)
    probe = onnx.ModelProto()
    probe.CopyFrom(head)
    probe.graph.output.append(helper.make_tensor_value_info(SSD, TensorProto.FLOAT, None))
    sess = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    feeds = {i.name: rng.normal(size=[d.dim_value for d in i.type.tensor_type.shape.dim])
             .astype(np.float32) for i in probe.graph.input}
    ref = dict(zip([o.name for o in probe.graph.output], sess.run(None, feeds)))
    fused, _ = FuseHead().call(BindPlugins(("Correlation",)).call(head)[0])
    env = _run_fused(_kernels(), fused, {SSD: torch.from_numpy(ref[SSD])})
    grid_disp = next(n for n in fused.graph.node if n.op_type == "Identity").input[0]
    np.testing.assert_allclose(env[grid_disp].numpy(), ref["grid_disp"], atol=2e-5)
    np.testing.assert_allclose(env["entropy"].numpy(), ref["entropy"], atol=5e-5)
    np.testing.assert_allclose(env["probs"].numpy(), ref["probs"], atol=2e-6)


def test_chains_it_cannot_fuse_are_left_alone():
    head, _ = _head(True, ("entropy",), seed=7)
    bound, _ = BindPlugins(("Correlation",)).call(head)
    # a displacement table that is not the displacement set: the softmax stays
    tables = [t for t in bound.graph.initializer if t.name.startswith("head/displacements")]
    if tables:
        arr = onnx.numpy_helper.to_array(tables[0]).copy()
        arr[1, 2] += 0.01
        tables[0].CopyFrom(onnx.numpy_helper.from_array(arr, tables[0].name))
    else:  # a Constant node
        node = next(n for n in bound.graph.node if n.output[0].startswith("head/displacements"))
        arr = onnx.numpy_helper.to_array(node.attribute[0].t).copy()
        arr[1, 2] += 0.01
        node.attribute[0].t.CopyFrom(onnx.numpy_helper.from_array(arr))
    f = FuseHead()
    out, changed = f.call(bound)
    assert changed and "Softmax" in _ops(out) and "GridSmooth" in _ops(out)
    assert "MeanFieldStep" not in _ops(out)
    assert any("not the displacement set" in line for line in f.log)
    # no mean-field step at all: unchanged
    plain = helper.make_model(helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])]))
    assert FuseHead().call(plain)[1] is False


def test_broadcast_operands_are_not_folded_into_the_load():
    """``Add(D, b)`` with ``b`` not a cost-sized custom-op output stays a node of its own."""
    f = helper.make_tensor_value_info
    nodes = [helper.make_node("Correlation", ["ff", "fm"], ["ssd"], domain=C.DOMAIN,
                              grid=[2, 2, 2], disp_size=3, capture=0.3),
             helper.make_node("Add", ["ssd", "b"], ["x"]),
             helper.make_node("Mul", ["x", "two"], ["x2"]),
             helper.make_node("MeanFieldStep", ["x2"], ["y"], domain=C.DOMAIN, mode="exact")]
    graph = helper.make_graph(
        nodes, "g", [f("ff", TensorProto.FLOAT, [1, 2, 4, 4, 4]),
                     f("fm", TensorProto.FLOAT, [1, 2, 4, 4, 4]),
                     f("b", TensorProto.FLOAT, [1, 1, 1, 1, 1, 1])],
        [f("y", TensorProto.FLOAT, [2, 2, 2, 3, 3, 3])],
        initializer=[onnx.numpy_helper.from_array(np.array(2.0, np.float32), "two")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20),
                                                    helper.make_opsetid(C.DOMAIN, 1)])
    fuse = FuseHead()
    out, changed = fuse.call(model)
    mca = next(n for n in out.graph.node if n.op_type == "MinConvAffine")
    assert changed and list(mca.input[:2]) == ["x2", "x2"]
    np.testing.assert_array_equal(_attrs(mca)["coeffs"], [1, 0, 0])
    assert _attrs(mca)["mode"] == b"exact" and mca.input[2] == "pddnet/head_penalty_unused"
    assert [n.op_type for n in out.graph.node] == ["Correlation", "Add", "Mul", "MinConvAffine",
                                                   "GridSmooth"]
    assert any("softmax left unfused" in line for line in fuse.log)


def test_displacement_table_is_the_reference_set():
    from pddnet.model import ops

    for L, q in ((1, 0.5), (3, 0.3), (5, 0.4)):
        ref = ops.displacement_set(L, q, dtype=torch.float64).reshape(-1, 3).numpy()
        np.testing.assert_allclose(displacement_table(L, q), ref, rtol=0, atol=1e-15)


def test_plan_fuses_only_with_aot_plugins():
    head, _ = _head(True, (), seed=1)
    plan = plan_binding("auto", head, trt_version=(10, 9), triton_available=True)
    assert plan.ops == ("Correlation",) and plan.fused == HEAD_OPS and plan.aot
    assert "fused head" in plan.describe()
    assert plugins_label(plan) == "aot:Correlation+head:" + ",".join(HEAD_OPS)
    for kw in (dict(trt_version=(10, 8), triton_available=True),
               dict(trt_version=(10, 9), triton_available=False)):
        assert plan_binding("auto", head, **kw).fused == ()
    assert plan_binding("auto", head, trt_version=(10, 9), triton_available=True,
                        fuse_head=False).fused == ()
    assert plan_binding("native", head, trt_version=(10, 9), triton_available=True).fused == ()
    assert plugins_label(BindingPlan("auto", ("Correlation",), True)) == "aot:Correlation"


# ------------------------------------------------------------------ AOT: PTX + plugin stand-in

_AOT_SCRIPT = r'''
import struct, sys
import numpy as np
sys.path.insert(0, sys.argv[1])
import tensorrt.plugin as trtp
from triton.backends.compiler import GPUTarget
from pddnet.backends.trt import kernels as K, plugins as P

K.AOT_TARGET = GPUTarget("cuda", 90, 32)
ids = P.register_plugins(P.HEAD_OPS)
assert ids == ["pddnet::" + o for o in P.HEAD_OPS], ids
assert all(P.registered()[i] == "aot+jit" for i in ids)

def bits(v):
    return struct.unpack("<i", struct.pack("<f", v))[0]

def desc(shape, dt):
    return trtp.TensorDesc(tuple(trtp.ShapeExpr(s) for s in shape), dt)

def run(pid, inputs, attrs, out_shapes, grid, args):
    d = trtp.REG[pid]
    outs = d["register"](*inputs, *attrs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    assert [tuple(e.value for e in o.shape_expr) for o in outs] == out_shapes, pid
    assert len(outs) == d["n_out"]
    name, ptx, lp, extra = d["aot"](*inputs, *attrs, outs, 0)
    params = K._entry_params(ptx, name)
    want = [".u64"] * len(inputs) + [".u32"] * len(extra) + [".u64"] * len(outs)
    assert [p.split()[1] for p in params] == want, (pid, params)
    assert (lp.grid_x.value, lp.grid_y.value) == grid, (pid, lp.grid_x.value, lp.grid_y.value)
    assert [e.value for e in extra] == args, (pid, [e.value for e in extra])
    assert lp.shared_mem.value <= 48 * 1024

cube = (3, 5, 6, 15, 15, 15)
for dt in ("FLOAT", "HALF"):
    for mode in ("approx", "exact"):
        run("pddnet::MinConvAffine", [desc(cube, dt), desc(cube, dt), desc((), "FLOAT")],
            [mode, np.array([0.5, 2.0, -1.0], np.float32)], [cube], (90, 1),
            [bits(0.5), bits(2.0), bits(-1.0)])
    run("pddnet::GridSmooth", [desc(cube, dt)], [], [cube], (15, 3375 // 128 + 1),
        [3, 5, 6, 3375])
    run("pddnet::DisplacementHead", [desc(cube, dt)], [0.4, -2.5],
        [(3, 5, 6, 3), (3, 5, 6)], (15, 1), [3, 5, 6, bits(-2.5), bits(0.4)])
    run("pddnet::DisplacementHeadProbs", [desc(cube, dt)], [0.4, -2.5],
        [(3, 5, 6, 3), (3, 5, 6), (3, 5, 6, 3375)], (15, 1), [3, 5, 6, bits(-2.5), bits(0.4)])
print("AOT-HEAD-OK")
'''


def test_head_kernels_compile_and_plugins_register(tmp_path):
    """In a process without the interpreter: PTX for sm_90 with TensorRT's parameter lists."""
    pytest.importorskip("triton")
    fake = write_fake_tensorrt(tmp_path / "fake")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    proc = subprocess.run([sys.executable, "-c", _AOT_SCRIPT, str(fake)], env=env,
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 and ("ptxas" in proc.stderr and "No such file" in proc.stderr):
        pytest.skip("triton's bundled ptxas cannot run here: " + proc.stderr[-300:])
    assert proc.returncode == 0 and "AOT-HEAD-OK" in proc.stdout, \
        proc.stdout + proc.stderr[-4000:]


def test_contract_names():
    assert C.PLUGIN_NAMESPACE == "pddnet"
    from pddnet.backends.trt import plugins

    assert plugins.HEAD_OPS == HEAD_OPS
