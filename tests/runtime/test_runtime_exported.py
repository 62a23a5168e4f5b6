"""The runtime on a model written by the real exporter (`pddnet.export.onnx_export`): the split
reproduces the full graph exactly, and the runtime's model-grid field equals the PyTorch
reference on the same pre-processed inputs. Needs torch (to build and export the network);
skipped without it.

Not tested here: trained weights (the network is randomly initialised, so the field is tiny and
registration quality is meaningless), export options beyond the optional outputs.
"""

import numpy as np
import pytest

from helpers.fake_models import ct_like, grid_affine

torch = pytest.importorskip("torch")

SHAPE = (24, 27, 30)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    import onnx

    from pddnet.export.onnx_export import export_model
    from pddnet.model.network import PDDNet
    from pddnet.spec.config import preset

    net = PDDNet(preset("tiny"), seed=0).eval()
    path = tmp_path_factory.mktemp("exported") / "tiny.onnx"
    onnx.save(export_model(net, SHAPE, spacing_mm=(4.0, 4.0, 4.0), outputs=("probs", "entropy")),
              str(path))
    return net, path


def test_split_of_exported_model_is_exact(exported):
    from pddnet.backends import create_backend
    from pddnet.graph.model import load_model
    from pddnet.graph.split import split_model
    from pddnet.spec import contract as C

    lm = load_model(exported[1])
    parts = split_model(lm.proto)
    rng = np.random.default_rng(71)
    f, m = (rng.normal(size=(1, 1) + SHAPE).astype(np.float32) for _ in range(2))
    with create_backend("onnxruntime", lm.proto) as full, \
            create_backend("onnxruntime", parts.features) as fe, \
            create_backend("onnxruntime", parts.head) as hd:
        ref = full.run({"fixed": f, "moving": m})
        got = hd.run({C.FIXED_FEATURES: fe.run({"image": f})["features"],
                      C.MOVING_FEATURES: fe.run({"image": m})["features"]})
    assert set(got) == set(ref) == {"disp", "grid_disp", "probs", "entropy"}
    for k in ref:
        assert np.array_equal(ref[k], got[k]), k


def test_two_stage_sessions_match_one_session(exported):
    """The ONNX Runtime backend's two sessions (cut after the first mean-field step) give the
    outputs of one session, for the whole model and for its head; a part without mean-field
    steps (the features) stays one session."""
    from pddnet.backends import create_backend
    from pddnet.graph.model import load_model
    from pddnet.graph.split import split_after_first_step, split_model
    from pddnet.spec import contract as C

    lm = load_model(exported[1])
    parts = split_model(lm.proto)
    first, second = split_after_first_step(lm.proto)
    assert [n.op_type for n in first.graph.node][-1] == "MeanFieldStep"
    assert sorted(i.name for i in second.graph.input) == ["head/Correlation_0",
                                                          "head/MeanFieldStep_0"]
    assert split_after_first_step(parts.features) is None
    rng = np.random.default_rng(72)
    f, m = (rng.normal(size=(1, 1) + SHAPE).astype(np.float32) for _ in range(2))
    feats = {}
    for model, feeds in ((lm.proto, {"fixed": f, "moving": m}), (parts.head, None)):
        if feeds is None:
            feeds = feats
        runs = []
        for stages in (False, True):
            with create_backend("onnxruntime", model, stages=stages) as be:
                assert be.describe()["stages"] == (2 if stages else 1)
                assert [s.name for s in be.input_specs] == list(feeds)
                runs.append(be.run(feeds))
        assert list(runs[0]) == list(runs[1])  # the same outputs in the same order
        assert set(runs[0]) == {"disp", "grid_disp", "probs", "entropy"}
        for k in runs[0]:
            np.testing.assert_allclose(runs[1][k], runs[0][k], rtol=1e-5, atol=1e-6, err_msg=k)
        if not feats:
            with create_backend("onnxruntime", parts.features) as fe:
                assert fe.describe()["stages"] == 1
                feats = {C.FIXED_FEATURES: fe.run({"image": f})["features"],
                         C.MOVING_FEATURES: fe.run({"image": m})["features"]}


def test_registrar_matches_pytorch_reference(exported):
    from pddnet.data.io import Volume
    from pddnet.runtime.session import Registrar

    net, path = exported
    rng = np.random.default_rng(72)
    aff = grid_affine(4.0)
    fixed, moving = Volume(ct_like(rng, SHAPE), aff), Volume(ct_like(rng, SHAPE), aff)
    with Registrar(path) as reg:
        res = reg.register(fixed, moving)
    norm = lambda v: torch.from_numpy(np.clip(v.array, -1000, 1500) / 500).float()[None, None]
    with torch.no_grad():
        ref = net(norm(fixed), norm(moving)).dense(SHAPE).numpy()
    np.testing.assert_allclose(res.disp_model, ref, atol=1e-5)
    np.testing.assert_allclose(res.disp, ref, atol=1e-5)  # RAS grid == model grid here
