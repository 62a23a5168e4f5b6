"""PyTorch PDD-Net -> ONNX with the ``ai.pddnet`` custom ops as local functions.

The graph is written directly from the network's weights with ``onnx.helper`` rather than
traced: the custom ops need exact control over their nodes (domain, plugin attributes,
function bodies specialised to the model), node names must follow the contract in
docs/model-format.md, and the layouts of the cost volume are chosen for ONNX Runtime's
kernels. Equivalence with the PyTorch reference is what the parity tests check.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from pddnet import __version__
from pddnet.data.io import atomic_write
from pddnet.errors import PddnetError
from pddnet.export import contract as C
from pddnet.export import functions as fn
from pddnet.export.graph import Builder, value_info
from pddnet.model.config import PDDConfig


def _np(t) -> np.ndarray:
    return t.detach().cpu().double().numpy()


def fold_batchnorm(conv, bn) -> tuple[np.ndarray, np.ndarray]:
    """Conv weights and bias with an eval-mode BatchNorm folded in (float64)."""
    w = _np(conv.weight)
    b = _np(conv.bias) if conv.bias is not None else np.zeros(w.shape[0])
    if bn is None:
        return w, b
    scale = _np(bn.weight) / np.sqrt(_np(bn.running_var) + bn.eps)
    return w * scale[:, None, None, None, None], (b - _np(bn.running_mean)) * scale + _np(bn.bias)


class _Exporter:
    def __init__(self, model, image_shape, dtype=np.float32, fold_alphas=True):
        self.model = model
        alpha = _np(model.alpha)
        self.fold_alphas = bool(fold_alphas and alpha[0] > 0 and alpha[2] > 0)
        self.cfg: PDDConfig = model.config
        self.image_shape = tuple(int(n) for n in image_shape)
        self.feat_shape = PDDConfig.feature_shape(self.image_shape)
        self.b = Builder(dtype=dtype)
        self.fns = fn.FunctionSet(dtype=np.dtype(dtype))
        self._weights()

    def _weights(self) -> None:
        """Shared initializers (BatchNorm folded), named ``weights/...``."""
        feats = self.model.features
        b = self.b
        b.prefix = "weights"
        self.w = {}
        # the 3x3x3 stride-2 average pool (count_include_pad) as a convolution: ONNX Runtime's
        # AveragePool-19 kernel is several times slower than its Conv
        self.w["pool"] = b.const(np.full((1, 1, 3, 3, 3), 1.0 / 27.0), "pool_w")
        for name, conv, bn in (("conv0", feats.conv0, feats.bn0), ("conv1", feats.conv1, feats.bn1),
                               ("conv2", feats.conv2, feats.bn2), ("conv3", feats.conv3, None)):
            w, bias = fold_batchnorm(conv, bn)
            self.w[name] = (b.const(w, f"{name}_w"), b.const(bias, f"{name}_b"))
        offsets = _np(feats.offsets)
        self.w["offsets0"] = b.const(offsets[0], "offsets0")
        self.w["offsets1"] = b.const(offsets[1], "offsets1")
        if not self.fold_alphas:
            alpha = _np(self.model.alpha)
            self.w["alpha"] = [b.const(np.array(a), f"alpha{i}") for i, a in enumerate(alpha[:5])]

    def features(self, branch: str, image: str, out: str) -> str:
        b, w = self.b, self.w
        b.prefix = branch
        x = b.op("Conv", image, w["pool"], kernel_shape=[3, 3, 3], strides=[2, 2, 2], pads=[1] * 6,
                 hint="AvgPool")
        x = b.op("Relu", b.op("Conv", x, *w["conv0"], kernel_shape=[5, 5, 5], strides=[2, 2, 2],
                              pads=[2] * 6, hint="Conv0"))
        stem_shape = (1, 4) + tuple((((n + 1) // 2) + 1) // 2 for n in self.image_shape)
        n_off = 2 * self.cfg.channels
        self.fns.add("DeformableSample3D", (stem_shape, n_off, self.feat_shape),
                     lambda: fn.deformable_sample_function(stem_shape, n_off, self.feat_shape,
                                                           self.b.dtype))
        s0 = fn.custom_node(b, "DeformableSample3D", [x, w["offsets0"]],
                            output_shape=list(self.feat_shape))
        s1 = fn.custom_node(b, "DeformableSample3D", [x, w["offsets1"]],
                            output_shape=list(self.feat_shape))
        x = b.op("Sub", s0, s1, hint="ObeliskDiff")
        x = b.op("Relu", b.op("Conv", x, *w["conv1"], kernel_shape=[1, 1, 1], hint="Conv1"))
        x = b.op("Relu", b.op("Conv", x, *w["conv2"], kernel_shape=[3, 3, 3], pads=[1] * 6,
                              hint="Conv2"))
        return b.op("Conv", x, *w["conv3"], kernel_shape=[1, 1, 1], outputs=[out], hint="Conv3")

    def head(self, outputs) -> list[str]:
        b, w, cfg = self.b, self.w, self.cfg
        b.prefix = "head"
        grid, L = cfg.grid, cfg.disp_size
        feat_full = (1, cfg.channels) + self.feat_shape
        self.fns.add("Correlation", (feat_full, grid, L, cfg.capture),
                     lambda: fn.correlation_function(feat_full, grid, L, cfg.capture, self.b.dtype))
        ssd = fn.custom_node(b, "Correlation", [C.FIXED_FEATURES, C.MOVING_FEATURES],
                             grid=list(grid), disp_size=L, capture=float(cfg.capture))
        self.fns.add("MinConv", (grid, L, cfg.minconv),
                     lambda: fn.minconv_function(grid, L, cfg.minconv, self.b.dtype))
        self.fns.add("MeanFieldStep", (grid, L, cfg.minconv),
                     lambda: fn.mean_field_function(grid, L, cfg.minconv, self.b.dtype))
        alpha = _np(self.model.alpha)
        pen = float(_np(self.model.penalty)) if cfg.minconv == "exact" else None

        def mean_field(x, penalty):
            extra = [b.const(np.array(penalty), "penalty")] if penalty is not None else []
            return fn.custom_node(b, "MeanFieldStep", [x, *extra], mode=cfg.minconv)

        if self.fold_alphas:
            # MeanFieldStep(a x + c) = a MeanFieldStep_{p/a}(x) + c for a > 0, and the softmax
            # ignores constants, so the six alphas fold into two scalars and the penalties:
            # logits = -a5 a0 a2 MFS_{p/(a0 a2)}(S + (a3/a2) MFS_{p/a0}(S)), S the SSD.
            first = mean_field(ssd, None if pen is None else pen / alpha[0])
            second_in = b.op("Add", ssd, b.op("Mul", first, b.const(np.array(alpha[3] / alpha[2]),
                                                                     "a3_over_a2")),
                             hint="SecondInput")
            second = mean_field(second_in, None if pen is None else pen / (alpha[0] * alpha[2]))
            scale = -alpha[5] * alpha[0] * alpha[2]
        else:  # the literal form of PDDNet.regularise
            a = w["alpha"]
            cost = b.op("Add", b.op("Mul", ssd, a[0]), a[1], hint="DataCost")
            first = mean_field(cost, pen)
            second_in = b.op("Add", b.op("Add", b.op("Mul", cost, a[2]),
                                         b.op("Mul", first, a[3])), a[4], hint="SecondInput")
            second = mean_field(second_in, pen)
            scale = -alpha[5]
        logits = b.reshape(b.op("Mul", second, b.const(np.array(scale), "logit_scale")),
                           (*grid, L ** 3))
        made = []
        probs_name = C.OUTPUT_PROBS if C.OUTPUT_PROBS in outputs else None
        probs = b.op("Softmax", logits, axis=-1, outputs=[probs_name] if probs_name else 1)
        if probs_name:
            made.append(probs_name)
        disp_set = b.const(fn.displacement_set(L, cfg.capture), "displacements")
        grid_disp = b.matmul(probs, disp_set, hint="Expectation")
        b.op("Identity", grid_disp, outputs=[C.OUTPUT_GRID_DISP])
        made.append(C.OUTPUT_GRID_DISP)
        if C.OUTPUT_ENTROPY in outputs:
            logp = b.op("LogSoftmax", logits, axis=-1)
            b.op("Neg", b.op("ReduceSum", b.op("Mul", probs, logp), b.ints([-1]), keepdims=0),
                 outputs=[C.OUTPUT_ENTROPY], hint="Entropy")
            made.append(C.OUTPUT_ENTROPY)
        made.insert(0, self.upsample(grid_disp))
        return made

    def upsample(self, grid_disp: str) -> str:
        """Trilinear upsampling (``align_corners=False``) to the image grid, in voxels."""
        b, (gi, gj, gk) = self.b, self.cfg.grid
        ni, nj, nk = self.image_shape
        ui = fn.interp_matrix(fn.cell_centres(ni), gi)  # (ni, gi)
        uj = fn.interp_matrix(fn.cell_centres(nj), gj)
        uk = fn.interp_matrix(fn.cell_centres(nk), gk)
        x = b.op("Transpose", grid_disp, perm=[3, 0, 1, 2])  # (3, gi, gj, gk)
        x = b.matmul(b.const(ui), b.reshape(x, (3, gi, gj * gk)))  # (3, ni, gj*gk)
        x = b.matmul(b.const(uj), b.reshape(x, (3 * ni, gj, gk)))  # (3*ni, nj, gk)
        x = b.matmul(x, b.const(uk.T))  # (3*ni, nj, nk)
        x = b.op("Transpose", b.reshape(x, (3, ni, nj, nk)), perm=[1, 2, 3, 0])
        scale = np.array([ni / 2.0, nj / 2.0, nk / 2.0])
        return b.op("Mul", x, b.const(scale, "voxels_per_unit"), outputs=[C.OUTPUT_DISP],
                    hint="ToVoxels")

    def build(self, outputs, metadata: dict) -> onnx.ModelProto:
        for name in outputs:
            if name not in C.OPTIONAL_OUTPUTS:
                raise PddnetError(f"unknown optional output {name!r}; choose from "
                                  f"{list(C.OPTIONAL_OUTPUTS)}")
        self.features("fixed", C.INPUT_FIXED, C.FIXED_FEATURES)
        self.features("moving", C.INPUT_MOVING, C.MOVING_FEATURES)
        made = self.head(outputs)
        cfg, (gi, gj, gk), L = self.cfg, self.cfg.grid, self.cfg.disp_size
        shapes = {C.OUTPUT_DISP: (*self.image_shape, 3), C.OUTPUT_GRID_DISP: (gi, gj, gk, 3),
                  C.OUTPUT_PROBS: (gi, gj, gk, L ** 3), C.OUTPUT_ENTROPY: (gi, gj, gk)}
        graph = helper.make_graph(
            self.b.nodes, "pddnet",
            [value_info(C.INPUT_FIXED, (1, 1, *self.image_shape)),
             value_info(C.INPUT_MOVING, (1, 1, *self.image_shape))],
            [value_info(n, shapes[n]) for n in made],
            initializer=self.b.initializers)
        model = helper.make_model(
            graph, functions=self.fns.as_list(), producer_name="pddnet",
            producer_version=__version__,
            opset_imports=[helper.make_opsetid("", C.OPSET),
                           helper.make_opsetid(C.DOMAIN, C.DOMAIN_VERSION)])
        model.ir_version = 9
        meta = {C.META_FORMAT: C.FORMAT_VERSION, C.META_CONFIG: cfg.as_dict(),
                C.META_OUTPUTS: made, **metadata}
        helper.set_model_props(model, {k: json.dumps(v, sort_keys=True) for k, v in meta.items()})
        return model


def export_model(model, image_shape, *, spacing_mm=None, outputs=(), source=None,
                 fold_alphas: bool = True, metadata: dict | None = None) -> onnx.ModelProto:
    """Build the ONNX model of ``model`` (a :class:`~pddnet.model.network.PDDNet` in eval mode)
    for inputs of ``image_shape``; ``outputs`` lists optional outputs (probs, entropy).

    ``fold_alphas`` folds the six trained scalars into two (exact algebra, see ``head``) when
    ``a0`` and ``a2`` are positive, saving four passes over the cost volume. ``metadata`` adds
    further ``pddnet.*`` keys (JSON values), e.g. ``pddnet.overrides``/``pddnet.stage2``."""
    if model.training:
        raise PddnetError("export_model needs the network in eval mode (BatchNorm folding uses "
                          "the running statistics); call model.eval()")
    cfg = model.config
    meta = {
        C.META_INPUT: {
            "names": [C.INPUT_FIXED, C.INPUT_MOVING], "dtype": "float32",
            "image_shape": list(int(n) for n in image_shape),
            "spacing_mm": None if spacing_mm is None else [float(s) for s in spacing_mm],
            "orientation": "RAS", "intensity": cfg.intensity.as_dict(), "dynamic_shape": False,
        },
        C.META_PRECISION: {"mode": "fp32"},
        C.META_SOURCE: {"pddnet_version": __version__,
                        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                        **(source or {})},
        **(metadata or {}),
    }
    return _Exporter(model, image_shape, fold_alphas=fold_alphas).build(tuple(outputs), meta)


def check_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """``onnx.checker`` with full_check and strict shape inference; returns the inferred model."""
    try:
        onnx.checker.check_model(model, full_check=True)
        return onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True,
                                                 data_prop=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise PddnetError(f"the exported graph fails the ONNX checker: {exc}") from exc


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def export_checkpoint(checkpoint, out, *, image_shape=None, outputs=(), overwrite=False,
                      overrides: dict | None = None, stage2: bool | dict = False) -> Path:
    """``pddnet export``: checkpoint -> checked ONNX file, written atomically.

    Args:
        overrides: ``PDDConfig`` fields to change before exporting that keep the weights valid
            (``grid``, ``capture``, ``disp_size``), e.g. a stage-two model on its own; recorded
            in the ``pddnet.overrides`` metadata with the checkpoint's config.
        stage2: also write the stage-two model (``docs/refinement.md``) next to ``out`` as
            ``<stem>.stage2.onnx`` -- ``True`` for the default finer grid and smaller capture
            range (:func:`pddnet.runtime.refine.stage2_overrides`), or a dict of overrides --
            and name it (file, SHA-256, overrides) in ``out``'s ``pddnet.stage2`` metadata,
            which ``pddnet register --stages 2`` follows. Both get the same ``outputs``.

    Returns the path of ``out``.
    """
    import torch

    from pddnet.model.checkpoint import load_model
    from pddnet.model.refine import stage2_network
    from pddnet.runtime import refine as R
    from pddnet.runtime.stages import stage2_path

    model, ckpt = load_model(checkpoint)
    shape = tuple(image_shape or ckpt.get("image_shape") or ())
    if len(shape) != 3:
        raise PddnetError(f"{checkpoint} records no image shape; pass --shape I J K")
    spacing = (ckpt.get("metadata") or {}).get("spacing_mm")
    source = {"checkpoint": Path(checkpoint).name, "checkpoint_sha256": sha256_file(checkpoint),
              "torch_version": torch.__version__}

    def variant(ov):
        try:
            return stage2_network(model, ov).eval()
        except (ValueError, TypeError) as exc:
            raise PddnetError(f"export: invalid config overrides {ov}: {exc}") from exc

    def write(net, path, meta):
        onnx_model = export_model(net, shape, spacing_mm=spacing, outputs=outputs, source=source,
                                  metadata=meta)
        check_model(onnx_model)
        with atomic_write(path, overwrite=overwrite) as tmp:
            onnx.save_model(onnx_model, tmp)

    base_cfg = model.config.as_dict()
    meta: dict = {}
    if overrides:
        model = variant(dict(overrides))
        meta[R.META_OVERRIDES] = {"overrides": dict(overrides), "base_config": base_cfg}
    second = None
    if stage2:
        ov2 = R.stage2_overrides(model.config.as_dict()) if stage2 is True else dict(stage2)
        second = stage2_path(out)
        write(variant(ov2), second,
              {R.META_OVERRIDES: {"overrides": ov2, "base_config": model.config.as_dict()}})
        meta[R.META_STAGE2] = {"file": second.name, "sha256": sha256_file(second),
                               "overrides": ov2}
    try:
        write(model, out, meta)
    except BaseException:
        if second is not None:
            second.unlink(missing_ok=True)
        raise
    return Path(out)
