"""Small ONNX models that follow docs/model-format.md, built with ``onnx.helper`` for the tests.

Graph (all float32; ``(I, J, K)`` = ``image_shape``, ``(a, b, c) = (I//3, J//3, K//3)``):

* ``fixed/...`` and ``moving/...``: ``ai.pddnet.FakeObelisk(image, w, b)`` -- a local function
  (AveragePool k3 s3, then a 1x1x1 Conv to ``C`` channels and Tanh) -- then a Mul by a shared
  gain, giving ``fixed_features`` / ``moving_features`` ``(1, C, a, b, c)``; both branches use
  the same initializers.
* ``head/...``: ``d = fixed_features - moving_features``;
  ``g = translation_norm + gain * tanh(Conv1x1(d))`` ``(1, 3, a, b, c)`` in normalised units;
  ``grid_disp = g`` as ``(a, b, c, 3)``; ``disp`` = ``g`` upsampled with Resize (linear,
  ``half_pixel`` = ``align_corners=False``) to ``(I, J, K)`` and converted to voxels by the
  local function ``ai.pddnet.NormToVoxels`` (times ``n / 2`` per axis), as ``(I, J, K, 3)``;
  optional ``probs`` ``(a, b, c, 27)`` (softmax of a 1x1 conv of ``d``) and ``entropy``.

``translation=(ti, tj, tk)`` (model-grid voxels) with ``gain=0`` makes ``disp`` exactly that
constant everywhere -- the known-answer model; ``gain > 0`` makes the field depend on the images.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from pddnet.spec import contract as C

F32 = TensorProto.FLOAT


def _functions() -> list[onnx.FunctionProto]:
    obelisk = helper.make_function(
        C.DOMAIN, "FakeObelisk", ["x", "w", "b"], ["y"],
        [helper.make_node("AveragePool", ["x"], ["p"], kernel_shape=[3, 3, 3], strides=[3, 3, 3]),
         helper.make_node("Conv", ["p", "w", "b"], ["c"]),
         helper.make_node("Tanh", ["c"], ["y"])],
        [helper.make_opsetid("", C.OPSET)])
    to_vox = helper.make_function(
        C.DOMAIN, "NormToVoxels", ["g", "half_n"], ["v"],
        [helper.make_node("Mul", ["g", "half_n"], ["v"])],
        [helper.make_opsetid("", C.OPSET)])
    return [obelisk, to_vox]


def make_model(image_shape=(24, 21, 30), *, spacing_mm=(4.0, 4.0, 4.0), channels: int = 4,
               translation=(0.0, 0.0, 0.0), gain: float = 0.0, seed: int = 0,
               with_optional: bool = True, metadata: bool = True, num_labels: int | None = None,
               extra_input_meta: dict | None = None) -> onnx.ModelProto:
    """A contract-conforming fake PDD-Net (see the module docstring)."""
    I, J, K = (int(n) for n in image_shape)
    a, b, c = I // 3, J // 3, K // 3
    rng = np.random.default_rng(seed)
    t_vox = np.asarray(translation, np.float32)
    t_norm = (t_vox * 2.0 / np.asarray([I, J, K], np.float32)).reshape(1, 3, 1, 1, 1)
    inits = {
        "feat_w": rng.normal(0, 1.0, (channels, 1, 1, 1, 1)).astype(np.float32),
        "feat_b": rng.normal(0, 0.1, (channels,)).astype(np.float32),
        "feat_gain": np.float32(1.5).reshape(()),
        "head_w": rng.normal(0, 1.0, (3, channels, 1, 1, 1)).astype(np.float32),
        "head_b": rng.normal(0, 0.1, (3,)).astype(np.float32),
        "head_gain": np.float32(gain).reshape(()),
        "head_translation": t_norm.astype(np.float32),
        "head_sizes": np.asarray([1, 3, I, J, K], np.int64),
        "head_half_n": (np.asarray([I, J, K], np.float32) / 2).reshape(1, 3, 1, 1, 1),
        "head_axes0": np.asarray([0], np.int64),
        "prob_w": rng.normal(0, 1.0, (27, channels, 1, 1, 1)).astype(np.float32),
        "prob_axes": np.asarray([1], np.int64),
    }
    nodes = []
    for br in ("fixed", "moving"):
        nodes += [
            helper.make_node("FakeObelisk", [br, "feat_w", "feat_b"], [f"{br}/obelisk_out"],
                             domain=C.DOMAIN, name=f"{br}/obelisk"),
            helper.make_node("Mul", [f"{br}/obelisk_out", "feat_gain"], [f"{br}_features"],
                             name=f"{br}/gain"),
        ]
    nodes += [
        helper.make_node("Sub", [C.FIXED_FEATURES, C.MOVING_FEATURES], ["head/d"], name="head/sub"),
        helper.make_node("Conv", ["head/d", "head_w", "head_b"], ["head/conv"], name="head/conv"),
        helper.make_node("Tanh", ["head/conv"], ["head/tanh"], name="head/tanh"),
        helper.make_node("Mul", ["head/tanh", "head_gain"], ["head/scaled"], name="head/scale"),
        helper.make_node("Add", ["head/scaled", "head_translation"], ["head/g"], name="head/add"),
        helper.make_node("Squeeze", ["head/g", "head_axes0"], ["head/g3"], name="head/squeeze"),
        helper.make_node("Transpose", ["head/g3"], [C.OUTPUT_GRID_DISP], perm=[1, 2, 3, 0],
                         name="head/grid_disp"),
        helper.make_node("Resize", ["head/g", "", "", "head_sizes"], ["head/up"], mode="linear",
                         coordinate_transformation_mode="half_pixel", name="head/resize"),
        helper.make_node("NormToVoxels", ["head/up", "head_half_n"], ["head/vox"],
                         domain=C.DOMAIN, name="head/to_voxels"),
        helper.make_node("Squeeze", ["head/vox", "head_axes0"], ["head/vox3"], name="head/sq2"),
        helper.make_node("Transpose", ["head/vox3"], [C.OUTPUT_DISP], perm=[1, 2, 3, 0],
                         name="head/disp"),
    ]
    outputs = [helper.make_tensor_value_info(C.OUTPUT_DISP, F32, [I, J, K, 3]),
               helper.make_tensor_value_info(C.OUTPUT_GRID_DISP, F32, [a, b, c, 3])]
    if with_optional:
        nodes += [
            helper.make_node("Conv", ["head/d", "prob_w"], ["head/logits"], name="head/pconv"),
            helper.make_node("Softmax", ["head/logits"], ["head/p"], axis=1, name="head/softmax"),
            helper.make_node("Squeeze", ["head/p", "head_axes0"], ["head/p4"], name="head/sq3"),
            helper.make_node("Transpose", ["head/p4"], [C.OUTPUT_PROBS], perm=[1, 2, 3, 0],
                             name="head/probs"),
            helper.make_node("Log", ["head/p"], ["head/logp"], name="head/log"),
            helper.make_node("Mul", ["head/p", "head/logp"], ["head/plogp"], name="head/plogp"),
            helper.make_node("ReduceSum", ["head/plogp", "prob_axes"], ["head/sum"], keepdims=0,
                             name="head/rsum"),
            helper.make_node("Squeeze", ["head/sum", "head_axes0"], ["head/ent"], name="head/sq4"),
            helper.make_node("Neg", ["head/ent"], [C.OUTPUT_ENTROPY], name="head/entropy"),
        ]
        outputs += [helper.make_tensor_value_info(C.OUTPUT_PROBS, F32, [a, b, c, 27]),
                    helper.make_tensor_value_info(C.OUTPUT_ENTROPY, F32, [a, b, c])]
    graph = helper.make_graph(
        nodes, "fake_pddnet",
        [helper.make_tensor_value_info(C.INPUT_FIXED, F32, [1, 1, I, J, K]),
         helper.make_tensor_value_info(C.INPUT_MOVING, F32, [1, 1, I, J, K])],
        outputs, initializer=[numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", C.OPSET),
                                                    helper.make_opsetid(C.DOMAIN, C.DOMAIN_VERSION)],
                              functions=_functions(), producer_name="tests.helpers.fake_models")
    model.ir_version = 10
    if metadata:
        inp = {"names": [C.INPUT_FIXED, C.INPUT_MOVING], "dtype": "float32",
               "image_shape": [I, J, K], "spacing_mm": list(spacing_mm), "orientation": "RAS",
               "intensity": {"lower": -1000.0, "upper": 1500.0, "scale": 500.0},
               "dynamic_shape": False}
        if num_labels is not None:
            inp["num_labels"] = num_labels
        inp.update(extra_input_meta or {})
        meta = {
            C.META_FORMAT: C.FORMAT_VERSION,
            C.META_CONFIG: {"channels": channels, "grid": [a, b, c], "disp_size": 3,
                            "capture": 0.3, "minconv": "approx"},
            C.META_INPUT: inp,
            C.META_OUTPUTS: [o.name for o in outputs],
            C.META_PRECISION: {"mode": "fp32"},
            C.META_SOURCE: {"checkpoint_sha256": "0" * 64, "pddnet_version": "test",
                            "torch_version": None, "created": "2020-01-01T00:00:00Z"},
        }
        for k, v in meta.items():
            model.metadata_props.add(key=k, value=json.dumps(v))
    onnx.checker.check_model(model, full_check=True)
    return model


def save_model(model: onnx.ModelProto, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


# --------------------------------------------------------------------------------------------
# test volumes
# --------------------------------------------------------------------------------------------
def grid_affine(spacing=4.0, origin=(-40.0, -30.0, -50.0)) -> np.ndarray:
    """A RAS+ affine with isotropic ``spacing`` mm and the given world origin of voxel 0."""
    aff = np.diag([spacing, spacing, spacing, 1.0])
    aff[:3, 3] = origin
    return aff


def ct_like(rng: np.random.Generator, shape, *, sigma: float = 1.5) -> np.ndarray:
    """Random smooth CT-like float32 HU volume (roughly [-1000, 1000]), never constant."""
    from scipy import ndimage

    x = ndimage.gaussian_filter(rng.normal(size=shape), sigma)
    x = (x - x.mean()) / (x.std() + 1e-12)
    return (x * 400.0 + rng.normal(0, 20, shape)).astype(np.float32)


def blob(shape, centre, *, sigma: float = 2.5, background: float = -800.0,
         peak: float = 1200.0) -> np.ndarray:
    """A Gaussian blob (HU) centred at voxel ``centre`` on a constant background, float32."""
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    r2 = ((idx - np.asarray(centre, np.float64)) ** 2).sum(-1)
    return (background + peak * np.exp(-r2 / (2 * sigma ** 2))).astype(np.float32)


def centre_of_mass(image: np.ndarray, background: float = -800.0) -> np.ndarray:
    w = np.clip(image.astype(np.float64) - background, 0, None)
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in image.shape], indexing="ij"), -1)
    return (idx * w[..., None]).reshape(-1, 3).sum(0) / w.sum()


def reorient(array: np.ndarray, affine: np.ndarray, flips=(), perm=(0, 1, 2)):
    """Store the same world content differently: flip ``flips`` axes, then transpose by ``perm``.

    Returns ``(new_array, new_affine)``; trailing axes (field components) are kept in place.
    """
    n = array.shape[:3]
    a = np.flip(array, tuple(flips)) if flips else array
    a = a.transpose(tuple(perm) + tuple(range(3, array.ndim)))
    t = np.zeros((4, 4))
    t[3, 3] = 1.0
    for j, i in enumerate(perm):  # new axis j is old axis i
        t[i, j] = -1.0 if i in flips else 1.0
        t[i, 3] = n[i] - 1.0 if i in flips else 0.0
    return np.ascontiguousarray(a), affine @ t


def field_back(disp: np.ndarray, flips=(), perm=(0, 1, 2)) -> np.ndarray:
    """Inverse of :func:`reorient` for a displacement field, components included."""
    inv = tuple(int(v) for v in np.argsort(perm))
    a = disp.transpose(inv + (3,))
    if flips:
        a = np.flip(a, tuple(flips))
    out = np.empty_like(a)
    for j, i in enumerate(perm):  # stored component j is along old axis i
        out[..., i] = (-1.0 if i in flips else 1.0) * a[..., j]
    return out


def volume_back(array: np.ndarray, flips=(), perm=(0, 1, 2)) -> np.ndarray:
    """Inverse of :func:`reorient` for a 3D volume."""
    a = array.transpose(tuple(int(v) for v in np.argsort(perm)))
    return np.flip(a, tuple(flips)) if flips else a


def save_volume(path, array, affine) -> Path:
    import nibabel as nib

    path = Path(path)
    nib.save(nib.Nifti1Image(np.asarray(array), affine), str(path))
    return path
