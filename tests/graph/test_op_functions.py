"""ONNX function bodies of the ai.pddnet ops, run by ONNX Runtime, against the PyTorch reference.

Each op is wrapped alone in a model (one custom node plus its local function, nothing
registered) and compared with ``pddnet.model.ops`` in float64 on fresh random inputs of
several shapes, including odd sizes and points sampled beyond the volume border.
Not tested here: the whole exported network (tests/export/test_export.py), TensorRT plugins.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import helper

from pddnet.graph import functions as fn
from pddnet.graph.builder import Builder, value_info
from pddnet.model import ops
from pddnet.spec import contract as C


@pytest.fixture
def rng():
    return np.random.default_rng()


def run_single(op_type, function, inputs: dict, output_shape, attrs, extra_functions=()):
    """Build a one-node model calling ``op_type`` and run it in ONNX Runtime."""
    b = Builder("test")
    out = fn.custom_node(b, op_type, list(inputs), **attrs)
    b.op("Identity", out, outputs=["y"])
    graph = helper.make_graph(b.nodes, "t", [value_info(k, v.shape) for k, v in inputs.items()],
                              [value_info("y", output_shape)])
    model = helper.make_model(graph, functions=[function, *extra_functions],
                              opset_imports=[helper.make_opsetid("", C.OPSET),
                                             helper.make_opsetid(C.DOMAIN, 1)])
    model.ir_version = 9
    onnx.checker.check_model(model, full_check=True)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {k: v.astype(np.float32) for k, v in inputs.items()})[0]


@pytest.mark.parametrize("in_shape,n_off,out_shape,scale", [
    ((1, 3, 6, 5, 7), 4, (8, 4, 9), 0.1),
    ((1, 4, 9, 8, 11), 6, (12, 10, 14), 0.6),   # offsets reach past the border
])
def test_deformable_sample_body(rng, in_shape, n_off, out_shape, scale):
    x = rng.normal(size=in_shape)
    off = rng.normal(scale=scale, size=(n_off, 3))
    got = run_single("DeformableSample3D",
                     fn.deformable_sample_function(in_shape, n_off, out_shape, np.float32),
                     {"x": x, "off": off}, (1, in_shape[1] * n_off, *out_shape),
                     {"output_shape": list(out_shape)})
    ref = ops.deformable_sample(torch.from_numpy(x), torch.from_numpy(off), out_shape).numpy()
    np.testing.assert_allclose(got, ref, atol=1e-5)


@pytest.mark.parametrize("feat_shape,grid,L,q", [
    ((1, 3, 7, 6, 9), (3, 4, 5), 3, 0.3),
    ((1, 5, 10, 9, 12), (4, 3, 6), 5, 0.7),      # displaced points leave the volume
    ((1, 2, 6, 6, 6), (2, 2, 2), 7, 0.25),
])
def test_correlation_body(rng, feat_shape, grid, L, q):
    ff, fm = rng.normal(size=feat_shape), rng.normal(size=feat_shape)
    got = run_single("Correlation", fn.correlation_function(feat_shape, grid, L, q, np.float32),
                     {"ff": ff, "fm": fm}, (*grid, L, L, L),
                     {"grid": list(grid), "disp_size": L, "capture": q})
    ref = ops.correlation(torch.from_numpy(ff), torch.from_numpy(fm), grid, L, q).numpy()
    np.testing.assert_allclose(got, ref, atol=1e-4 * np.abs(ref).max())


@pytest.mark.parametrize("mode", ["approx", "exact"])
@pytest.mark.parametrize("grid,L", [((3, 2, 4), 5), ((2, 3, 2), 7)])
def test_minconv_and_mean_field_bodies(rng, mode, grid, L):
    cost = rng.normal(size=(*grid, L, L, L)) * 3
    inputs = {"cost": cost}
    extra = {}
    if mode == "exact":
        pen = float(rng.uniform(0.2, 2.0))
        inputs["pen"] = np.array(pen)
        extra = {"penalty": pen}
    mc = fn.minconv_function(grid, L, mode, np.float32, max_broadcast=2000)  # forces chunks
    got = run_single("MinConv", mc, inputs, cost.shape, {"mode": mode})
    ref = ops.minconv(torch.from_numpy(cost), mode, extra.get("penalty")).numpy()
    np.testing.assert_allclose(got, ref, atol=1e-5 * np.abs(ref).max())
    mf = fn.mean_field_function(grid, L, mode, np.float32)
    got = run_single("MeanFieldStep", mf, inputs, cost.shape, {"mode": mode}, extra_functions=[mc])
    ref = ops.mean_field_step(torch.from_numpy(cost), mode, extra.get("penalty")).numpy()
    np.testing.assert_allclose(got, ref, atol=1e-5 * np.abs(ref).max())


def test_numpy_helpers_match_reference(rng):
    pos = rng.uniform(-1.3, 1.3, size=(3, 11))
    np.testing.assert_allclose(fn.interp_matrix(pos, 7),
                               ops.interp_weights(torch.from_numpy(pos), 7).numpy(), atol=1e-15)
    for n in (3, 5, 16):
        np.testing.assert_allclose(fn.smoothing_matrix(n),
                                   ops.smoothing_matrix(n, dtype=torch.float64).numpy(), atol=1e-15)
    np.testing.assert_allclose(fn.displacement_set(5, 0.3),
                               ops.displacement_set(5, 0.3, dtype=torch.float64).reshape(-1, 3).numpy())
