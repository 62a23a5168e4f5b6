"""The pair runner (pddnet.runtime.runner): the one place a model runs on a pair.

Checked on contract-conforming fake models (tests/helpers/fake_models.py) with fresh random
inputs: split (features + head) and whole-model runs give the same outputs; precomputed fixed
features give the same result as computing them; the timings say which parts ran; a runner
shares another's feature backend exactly when the feature graphs are identical, and closing it
leaves the shared backend usable.

Not tested here: the Registrar and the stage pipeline around it (test_runtime_session.py,
tests/model/test_refine.py).
"""

from __future__ import annotations

import numpy as np
import pytest

from helpers.fake_models import make_model
from pddnet.runtime.runner import PairRunner
from pddnet.spec import contract as C

SHAPE = (24, 21, 30)


def _pair(rng):
    return tuple(rng.uniform(-2.0, 3.0, (1, 1, *SHAPE)).astype(np.float32) for _ in range(2))


@pytest.fixture
def model():
    return make_model(SHAPE, gain=0.4, seed=int(np.random.default_rng().integers(1000)))


def test_split_and_whole_model_agree(model):
    rng = np.random.default_rng()
    fixed, moving = _pair(rng)
    split = PairRunner(model, "onnxruntime", {"threads": 1})
    whole = PairRunner(model, "onnxruntime", {"threads": 1}, split=False)
    try:
        assert split.is_split and not whole.is_split and split.split_error is None
        a, b = split.run_pair(fixed, moving), whole.run_pair(fixed, moving)
        assert set(a.outputs) == set(b.outputs) >= {C.OUTPUT_DISP, C.OUTPUT_GRID_DISP}
        for k in a.outputs:
            np.testing.assert_allclose(a.outputs[k], b.outputs[k], rtol=1e-5, atol=1e-6)
        assert a.features_ms > 0 and a.head_ms > 0
        assert b.features_ms is None and b.head_ms > 0  # the whole model is the "head"
        assert whole.features(fixed) == (None, 0.0)
        assert split.describe()["label"] == "features" and whole.describe()["label"] == "full"
    finally:
        split.close()
        whole.close()


def test_precomputed_fixed_features_give_the_same_result(model, monkeypatch):
    rng = np.random.default_rng()
    fixed, moving = _pair(rng)
    r = PairRunner(model, "onnxruntime", {"threads": 1})
    try:
        ff, ms = r.features(fixed)
        assert ff.shape[:2] == (1, 4) and ms > 0
        runs = []
        real = r._features.run
        monkeypatch.setattr(r._features, "run", lambda feeds: runs.append(1) or real(feeds))
        reused = r.run_pair(fixed, moving, ff)
        assert len(runs) == 1  # with the fixed features given only the moving branch runs
        fresh = r.run_pair(fixed, moving)
        assert len(runs) == 3
        np.testing.assert_array_equal(reused.outputs[C.OUTPUT_DISP], fresh.outputs[C.OUTPUT_DISP])
    finally:
        r.close()


def test_shares_the_feature_backend_only_for_an_identical_feature_graph():
    rng = np.random.default_rng()
    seed = int(rng.integers(1000))
    first = PairRunner(make_model(SHAPE, gain=0.3, seed=seed), "onnxruntime", {"threads": 1})
    same = PairRunner(make_model(SHAPE, gain=0.9, seed=seed), "onnxruntime", {"threads": 1},
                      share=first, suffix="2")        # other head, same feature weights
    other = PairRunner(make_model(SHAPE, gain=0.3, seed=seed + 1), "onnxruntime",
                       {"threads": 1}, share=first, suffix="2")   # other feature weights
    try:
        assert same.shares_features and not other.shares_features
        assert not first.shares_features
        assert other.describe()["label"] == "features2"
        fixed, moving = _pair(rng)
        want = first.run_pair(fixed, moving).outputs[C.OUTPUT_DISP]
        same.close()  # must not deactivate the feature backend it borrowed
        np.testing.assert_array_equal(first.run_pair(fixed, moving).outputs[C.OUTPUT_DISP], want)
    finally:
        first.close()
        other.close()
