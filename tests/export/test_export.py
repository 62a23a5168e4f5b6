"""The whole exported network: checker, metadata, node naming and parity with PyTorch.

A network with random (non-trivial) weights and batch-norm statistics is exported and run
by ONNX Runtime on fresh smooth random volumes; its outputs are compared with the PyTorch
reference. Not tested here: parity of trained weights on real pairs (``pddnet validate``),
speed (``pddnet bench``), the runtime around the model (tests/test_runtime*.py).
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import scipy.ndimage as ndi
import torch

from pddnet.errors import PddnetError
from pddnet.export.onnx_export import check_model, export_checkpoint, export_model
from pddnet.model.checkpoint import save_checkpoint
from pddnet.model.network import PDDNet
from pddnet.spec import contract as C
from pddnet.spec.config import preset


@pytest.fixture
def rng():
    return np.random.default_rng()


def random_network(rng, minconv="approx"):
    model = PDDNet(preset("tiny", minconv=minconv), seed=int(rng.integers(1 << 30)))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm3d):
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)
        model.alpha.copy_(torch.tensor([300.0, 0.1, 1.0, 1.0, 0.1, 30.0]))
    return model.eval()


def smooth_volume(rng, shape):
    return (ndi.gaussian_filter(rng.normal(size=shape), 1.5) * 4).astype(np.float32)[None, None]


@pytest.mark.parametrize("minconv,fold", [("approx", True), ("exact", True), ("approx", False),
                                          ("exact", False)])
def test_exported_network_matches_pytorch(rng, minconv, fold):
    shape = (24, 21, 27)
    model = random_network(rng, minconv)
    onnx_model = check_model(export_model(model, shape, outputs=("probs", "entropy"),
                                          fold_alphas=fold))
    sess = ort.InferenceSession(onnx_model.SerializeToString(), providers=["CPUExecutionProvider"])
    fixed = smooth_volume(rng, shape)
    moving = np.roll(fixed, tuple(rng.integers(-2, 3, size=3)), axis=(2, 3, 4))  # a clear optimum
    moving = moving + 0.3 * smooth_volume(rng, shape)
    names = [o.name for o in sess.get_outputs()]
    out = dict(zip(names, sess.run(None, {C.INPUT_FIXED: fixed, C.INPUT_MOVING: moving})))
    with torch.no_grad():
        ref = model(torch.from_numpy(fixed), torch.from_numpy(moving))
        dense = ref.dense(shape).numpy()
    assert np.abs(dense).max() > 0.5, "test needs a non-trivial displacement"
    np.testing.assert_allclose(out[C.OUTPUT_DISP], dense, atol=2e-3)
    np.testing.assert_allclose(out[C.OUTPUT_GRID_DISP], ref.grid_disp.numpy(), atol=2e-4)
    np.testing.assert_allclose(out[C.OUTPUT_PROBS], ref.probs.numpy(), atol=1e-4)
    from pddnet.model import ops
    np.testing.assert_allclose(out[C.OUTPUT_ENTROPY], ops.displacement_entropy(ref.probs).numpy(),
                               atol=1e-3)


def test_graph_structure_and_metadata(rng):
    model = random_network(rng)
    m = export_model(model, (24, 24, 24), spacing_mm=(4, 4, 4))
    check_model(m)
    assert any(o.domain == C.DOMAIN for o in m.opset_import)
    assert {f.name for f in m.functions} == set(C.CUSTOM_OPS)
    custom = [n for n in m.graph.node if n.domain == C.DOMAIN]
    assert sorted({n.op_type for n in custom}) == sorted({"DeformableSample3D", "Correlation",
                                                          "MeanFieldStep"})
    for n in custom:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        assert attrs["plugin_namespace"] == b"pddnet" and attrs["plugin_version"] == b"1"
    prefixes = {n.name.split("/")[0] for n in m.graph.node}
    assert prefixes == {"fixed", "moving", "head"}
    produced = {o for n in m.graph.node for o in n.output}
    assert C.FIXED_FEATURES in produced and C.MOVING_FEATURES in produced
    meta = {p.key: json.loads(p.value) for p in m.metadata_props}
    assert set(C.REQUIRED_META) <= set(meta)
    assert meta[C.META_INPUT]["image_shape"] == [24, 24, 24]
    assert meta[C.META_INPUT]["spacing_mm"] == [4.0, 4.0, 4.0]
    assert meta[C.META_CONFIG]["grid"] == list(model.config.grid)
    assert [o.name for o in m.graph.output] == [C.OUTPUT_DISP, C.OUTPUT_GRID_DISP]


def test_export_checkpoint_writes_atomically(tmp_path, rng):
    model = random_network(rng)
    ckpt = save_checkpoint(tmp_path / "m.pt", model, image_shape=(24, 24, 24),
                           metadata={"spacing_mm": [4.0, 4.0, 4.0]})
    out = export_checkpoint(ckpt, tmp_path / "m.onnx")
    loaded = onnx.load(out)
    meta = {p.key: json.loads(p.value) for p in loaded.metadata_props}
    assert len(meta[C.META_SOURCE]["checkpoint_sha256"]) == 64
    with pytest.raises(PddnetError, match="already exists"):
        export_checkpoint(ckpt, tmp_path / "m.onnx")
    assert [p.name for p in tmp_path.iterdir() if "partial" in p.name] == []
    with pytest.raises(PddnetError, match="unknown optional output"):
        export_model(model, (24, 24, 24), outputs=("bogus",))
    with pytest.raises(PddnetError, match="eval mode"):
        export_model(model.train(), (24, 24, 24))


def test_label_range_travels_from_checkpoint_to_runtime(tmp_path, rng):
    """A trained checkpoint's label set reaches the model's input contract; the runtime then
    refuses label maps with values beyond it (and accepts those within it)."""
    from pddnet.data.io import Volume
    from pddnet.graph.model import load_model as load_onnx
    from pddnet.runtime.preprocess import check_labels

    model = random_network(rng)
    shape = (24, 24, 24)
    plain = save_checkpoint(tmp_path / "plain.pt", model, image_shape=shape)
    trained = save_checkpoint(tmp_path / "trained.pt", model, image_shape=shape,
                              metadata={"num_labels": 5})
    info = load_onnx(export_checkpoint(trained, tmp_path / "t.onnx")).info
    assert info.num_labels == 5
    assert load_onnx(export_checkpoint(plain, tmp_path / "p.onnx")).info.num_labels is None
    aff = np.diag([4.0, 4.0, 4.0, 1.0])
    image = Volume(smooth_volume(rng, shape).reshape(shape).astype(np.float32), aff)
    good = rng.integers(0, 6, shape).astype(np.uint8)
    assert check_labels(Volume(good, aff), image, info, role="labels") is not None
    bad = good.copy()
    bad[tuple(rng.integers(0, 24, 3))] = 99
    with pytest.raises(PddnetError, match=r"up to 99 \(99 unexpected\).*labels 0\.\.5"):
        check_labels(Volume(bad, aff), image, info, role="labels")
