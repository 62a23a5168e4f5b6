"""Runtime backends: the base class's input checking, lifecycle and timing; the ONNX Runtime backend.

Not tested here: GPU execution providers (CUDA/TensorRT EPs need onnxruntime-gpu and a GPU; only
the clear refusal when they are missing is checked), the TensorRT backend (not written yet),
model loading and splitting (tests/graph/test_graph_model.py).
"""

import numpy as np
import onnxruntime as ort
import pytest

from helpers.fake_models import make_model
from pddnet.backends import BACKENDS, Backend, TensorSpec, create_backend
from pddnet.backends.onnxrt import OnnxRuntimeBackend, resolve_providers
from pddnet.errors import PddnetError

SHAPE = (24, 21, 30)


@pytest.fixture(scope="module")
def model():
    return make_model(SHAPE, gain=0.2, seed=3)


def _feeds(rng, **override):
    f = {"fixed": rng.normal(size=(1, 1) + SHAPE).astype(np.float32),
         "moving": rng.normal(size=(1, 1) + SHAPE).astype(np.float32)}
    f.update(override)
    return {k: v for k, v in f.items() if v is not None}


def test_run_returns_all_outputs_and_times(model):
    rng = np.random.default_rng(11)
    with create_backend("onnxruntime", model, label="full", threads=1) as be:
        assert be.is_active and be.load_ms > 0
        assert [s.name for s in be.input_specs] == ["fixed", "moving"]
        assert be.input_specs[0] == TensorSpec("fixed", np.dtype(np.float32), (1, 1) + SHAPE)
        out = be.run(_feeds(rng))
        assert set(out) == {"disp", "grid_disp", "probs", "entropy"}
        assert out["disp"].shape == SHAPE + (3,) and out["disp"].dtype == np.float32
        assert be.last_run_ms > 0 and be.run_count == 1
        d = be.describe()
        assert d["backend"] == "onnxruntime" and d["threads"] == 1
        assert d["providers"] == ["CPUExecutionProvider"] and d["mem_arena"] is False
    assert not be.is_active


@pytest.mark.parametrize("override, needle", [
    ({"moving": None}, "missing ['moving']"),
    ({"extra": np.zeros(3, np.float32)}, "unexpected ['extra']"),
    ({"fixed": "not an array"}, "expected a numpy array"),
    ({"moving": np.ones((1, 1) + SHAPE, np.float64)}, "expected float32, received float64"),
    ({"fixed": np.ones((1, 1, 24, 21, 29), np.float32)},
     "expected (1, 1, 24, 21, 30), received (1, 1, 24, 21, 29)"),
    ({"fixed": np.ones(SHAPE, np.float32)}, "expected (1, 1, 24, 21, 30), received (24, 21, 30)"),
])
def test_input_checking_names_expected_and_received(model, override, needle):
    rng = np.random.default_rng(12)
    with create_backend("onnxruntime", model, label="full") as be:
        with pytest.raises(PddnetError) as ei:
            be.run(_feeds(rng, **override))
    msg = str(ei.value)
    assert needle in msg and "onnxruntime backend (full)" in msg


def test_feeds_must_be_a_mapping(model):
    with create_backend("onnxruntime", model) as be:
        with pytest.raises(PddnetError, match="dict of name -> numpy array"):
            be.run([np.zeros(3)])


def test_run_before_activate_is_refused(model):
    be = create_backend("onnxruntime", model)
    with pytest.raises(PddnetError, match="activate"):
        be.run({})


def test_non_contiguous_feeds_are_accepted(model):
    rng = np.random.default_rng(13)
    feeds = _feeds(rng)
    strided = np.asfortranarray(feeds["fixed"])
    with create_backend("onnxruntime", model) as be:
        a = be.run(feeds)["disp"]
        b = be.run({"fixed": strided, "moving": feeds["moving"]})["disp"]
    assert np.array_equal(a, b)


def test_options_are_validated():
    with pytest.raises(PddnetError, match="threads"):
        OnnxRuntimeBackend(b"", threads=0)
    with pytest.raises(PddnetError, match="optimization"):
        OnnxRuntimeBackend(b"", optimization="max")
    with pytest.raises(PddnetError, match="unknown execution provider"):
        resolve_providers(["gpu-please"])
    with pytest.raises(PddnetError, match="unknown backend 'tensorflow'"):
        create_backend("tensorflow", b"")
    assert set(BACKENDS) >= {"onnxruntime"}


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(),
                    reason="CUDA provider present; the refusal cannot be observed")
def test_missing_gpu_provider_is_a_clear_error():
    with pytest.raises(PddnetError, match=r"not available.*onnxruntime-gpu"):
        resolve_providers("cuda")


def test_unloadable_model_is_a_clear_error():
    with pytest.raises(PddnetError, match="could not load the broken model"):
        create_backend("onnxruntime", b"\x00garbage", label="broken").activate()


def test_optimisation_levels_and_arena_give_equal_results(model):
    rng = np.random.default_rng(14)
    feeds = _feeds(rng)
    outs = []
    for opt, arena in (("disable", False), ("all", True)):
        with create_backend("onnxruntime", model, optimization=opt, mem_arena=arena) as be:
            outs.append(be.run(feeds)["disp"])
    np.testing.assert_allclose(outs[0], outs[1], atol=1e-5)


class _NumpyBackend(Backend):
    """A minimal backend built on the hooks only (the shape a TensorRT backend takes)."""

    name = "numpy-test"

    def _load_impl(self):
        self.loaded = True

    def _input_specs_impl(self):
        return [TensorSpec("x", np.dtype(np.float32), (None, 3))]

    def _run_impl(self, feeds):
        return {"y": feeds["x"] * 2}

    def _describe_impl(self):
        return {"kind": "numpy"}


def test_base_class_hooks_are_enough_for_a_backend():
    rng = np.random.default_rng(15)
    x = rng.normal(size=(5, 3)).astype(np.float32)
    with _NumpyBackend(None, label="toy") as be:
        np.testing.assert_array_equal(be.run({"x": x})["y"], 2 * x)
        assert be.run({"x": x[:2]})["y"].shape == (2, 3)  # free leading axis
        with pytest.raises(PddnetError, match=r"expected \(\?, 3\), received \(5, 4\)"):
            be.run({"x": np.zeros((5, 4), np.float32)})
        assert be.describe() == {"backend": "numpy-test", "label": "toy", "kind": "numpy"}
