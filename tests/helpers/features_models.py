"""Small exported models and their features part, for the tests of the C features kernels
(the OBELISK sampling and the 3x3x3 convolution): offsets that reach outside the volume, odd
sizes, fresh random weights and images on every call."""

from __future__ import annotations

import contextlib

import numpy as np

from pddnet.backends.native import features as natf
from pddnet.spec import contract as C

SHAPE = (31, 26, 35)


def export(**kw):
    import torch

    from pddnet.export.onnx_export import export_model
    from pddnet.model.network import PDDNet
    from pddnet.spec.config import PDDConfig

    cfg = PDDConfig(channels=4, grid=(5, 6, 4), disp_size=5, capture=0.3)
    net = PDDNet(cfg, seed=int(np.random.default_rng().integers(1000))).eval()
    with torch.no_grad():  # offsets that reach outside the volume: the clamp matters
        net.features.offsets.uniform_(-1.2, 1.2)
    return export_model(net, SHAPE, **kw)


def image():
    return np.random.default_rng().uniform(-1, 1, (1, 1, *SHAPE)).astype(np.float32)


def features_part(model):
    from pddnet.graph.split import split_model

    return split_model(model).features


def onnx_features(features):
    from pddnet.backends.onnxrt import OnnxRuntimeBackend

    return OnnxRuntimeBackend(features, threads=2).activate()


@contextlib.contextmanager
def both(features):
    """``(C features backend, ONNX Runtime backend)`` of one features part, released after."""
    with contextlib.ExitStack() as release:
        nb = natf.NativeFeaturesBackend(features, threads=2).activate()
        release.callback(nb.deactivate)
        ob = onnx_features(features)
        release.callback(ob.deactivate)
        yield nb, ob


def features_of_both(nb, ob, img=None):
    """Both backends' features of one (fresh random) image."""
    img = image() if img is None else img
    return (nb.run({C.FEATURES_INPUT: img})[C.FEATURES_OUTPUT],
            ob.run({C.FEATURES_INPUT: img})[C.FEATURES_OUTPUT])


def assert_same_features(a, b):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(np.abs(b).max()))
