"""PyTorch PDD-Net -> ONNX with the ``ai.pddnet`` custom ops as local functions.

The graph is written directly from the network's weights with ``onnx.helper`` rather than
traced: the custom ops need exact control over their nodes (domain, plugin attributes,
function bodies specialised to the model), node names must follow the contract in
docs/model-format.md, and the layouts of the cost volume are chosen for ONNX Runtime's
kernels. Equivalence with the PyTorch reference is what the parity tests check.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from pddnet import __version__
from pddnet._files import atomic_write, folder_lock, sha256_file
from pddnet.errors import PddnetError
from pddnet.graph import functions as fn
from pddnet.graph.builder import Builder, value_info
from pddnet.spec import contract as C
from pddnet.spec.config import PDDConfig


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


F32 = np.dtype(np.float32)
F16 = np.dtype(np.float16)
_PRECISION_DTYPES = {"fp32": F32, "fp16": F16}


def precision_dtypes(precision) -> dict[str, np.dtype]:
    """``{block: numpy dtype}`` for every block of :data:`contract.BLOCKS` from ``None`` (all
    float32), ``"fp32"``/``"fp16"`` (every block) or a partial ``{block: "fp32"|"fp16"}``
    (the others float32). Raises :class:`PddnetError` for an unknown block or precision."""
    if precision is None or isinstance(precision, str):
        mode = precision or "fp32"
        if mode not in _PRECISION_DTYPES:
            raise PddnetError(f"export precision must be one of {sorted(_PRECISION_DTYPES)} (INT8 "
                              f"graphs come from `pddnet calibrate`), got {mode!r}")
        return {blk: _PRECISION_DTYPES[mode] for blk in C.BLOCKS}
    unknown = sorted(set(precision) - set(C.BLOCKS))
    if unknown:
        raise PddnetError(f"unknown precision block(s) {unknown}; blocks are {list(C.BLOCKS)}")
    out = {blk: F32 for blk in C.BLOCKS}
    for blk, mode in precision.items():
        if mode not in _PRECISION_DTYPES:
            raise PddnetError(f"block {blk}: precision must be one of {sorted(_PRECISION_DTYPES)}"
                              f" in an exported graph, got {mode!r}")
        out[blk] = _PRECISION_DTYPES[mode]
    return out


class _Exporter:
    """Writes the graph block by block (``contract.BLOCKS``); each block is built in its own
    float type (``precision``), with a ``Cast`` where a tensor enters a block of another type.
    Inputs, outputs and the feature tensors at the split (``fixed_features``/
    ``moving_features``) are always float32. With every block float32 the graph is the plain
    FP32 export, node for node."""

    def __init__(self, model, image_shape, fold_alphas=True, precision=None):
        self.model = model
        alpha = _np(model.alpha)
        self.fold_alphas = bool(fold_alphas and alpha[0] > 0 and alpha[2] > 0)
        self.cfg: PDDConfig = model.config
        self.image_shape = tuple(int(n) for n in image_shape)
        self.feat_shape = PDDConfig.feature_shape(self.image_shape)
        self.plan = precision_dtypes(precision)
        self.b = Builder(dtype=F32)
        self.fns = fn.FunctionSet()
        self.blocks: dict[str, list[str]] = {blk: [] for blk in C.BLOCKS}
        self._block_name: str | None = None
        self._weights()

    # -- blocks, casts and per-dtype weights -------------------------------------------------
    @contextlib.contextmanager
    def _block(self, name: str):
        """Build the nodes of block ``name`` in its dtype; yields the dtype."""
        start = len(self.b.nodes)
        self.b.dtype = self.plan[name]
        self._block_name = name
        try:
            yield self.plan[name]
        finally:
            self.blocks[name].extend(n.name for n in self.b.nodes[start:])
            self.b.dtype = F32
            self._block_name = None

    def _as(self, x: str, have, want) -> str:
        """``x`` (of dtype ``have``) as ``want``: itself, or a ``Cast``."""
        if np.dtype(have) == np.dtype(want):
            return x
        return self._cast(x, want)

    def _cast(self, x: str, want, outputs=1) -> str:
        to = helper.np_dtype_to_tensor_dtype(np.dtype(want))
        hint = "ToFloat16" if np.dtype(want) == F16 else "ToFloat32"
        return self.b.op("Cast", x, to=to, hint=hint, outputs=outputs)

    def _w(self, key: str, dtype):
        """The initializer(s) of weight ``key`` in ``dtype`` (float16 copies made on demand,
        named ``weights/<name>_fp16_0``; the float32 ones always exist)."""
        dtype = np.dtype(dtype)
        if dtype == F32:
            return self.w[key]
        cache_key = (key, dtype.name)
        if cache_key not in self._w_lowp:
            b, prefix = self.b, self.b.prefix
            b.prefix = "weights"
            try:
                arrays = self._w_arrays[key]
                names = tuple(b.const(a, f"{hint}_fp16", dtype=dtype) for hint, a in arrays)
            finally:
                b.prefix = prefix
            self._w_lowp[cache_key] = names if len(names) > 1 else names[0]
        return self._w_lowp[cache_key]

    def _weights(self) -> None:
        """Shared initializers (BatchNorm folded), named ``weights/...``."""
        feats = self.model.features
        b = self.b
        b.prefix = "weights"
        self.w = {}
        self._w_arrays: dict[str, list[tuple[str, np.ndarray]]] = {}
        self._w_lowp: dict[tuple[str, str], object] = {}

        def keep(key, *named):
            self._w_arrays[key] = list(named)
            names = tuple(b.const(a, hint) for hint, a in named)
            self.w[key] = names if len(names) > 1 else names[0]

        # the 3x3x3 stride-2 average pool (count_include_pad) as a convolution: ONNX Runtime's
        # AveragePool-19 kernel is several times slower than its Conv
        keep("pool", ("pool_w", np.full((1, 1, 3, 3, 3), 1.0 / 27.0)))
        for name, conv, bn in (("conv0", feats.conv0, feats.bn0), ("conv1", feats.conv1, feats.bn1),
                               ("conv2", feats.conv2, feats.bn2), ("conv3", feats.conv3, None)):
            w, bias = fold_batchnorm(conv, bn)
            keep(name, (f"{name}_w", w), (f"{name}_b", bias))
        offsets = _np(feats.offsets)
        # offsets stay float32 in every graph (DeformableSample3D computes its coordinates in
        # float32, see functions.deformable_sample_function)
        keep("offsets0", ("offsets0", offsets[0]))
        keep("offsets1", ("offsets1", offsets[1]))
        if not self.fold_alphas:
            alpha = _np(self.model.alpha)
            for i, a in enumerate(alpha[:5]):
                keep(f"alpha{i}", (f"alpha{i}", np.array(a)))

    def _fn_dtype(self, *blocks: str):
        """The dtype of a local function used by ``blocks``: theirs when they agree, else
        ``None`` (a type-polymorphic body)."""
        kinds = {self.plan[blk] for blk in blocks}
        return kinds.pop() if len(kinds) == 1 else None

    # -- the network --------------------------------------------------------------------------
    def features(self, branch: str, image: str, out: str) -> str:
        b = self.b
        b.prefix = branch
        with self._block("pool") as dt:
            x = b.op("Conv", self._as(image, F32, dt), self._w("pool", dt), kernel_shape=[3, 3, 3],
                     strides=[2, 2, 2], pads=[1] * 6, hint="AvgPool")
        have = dt
        with self._block("conv0") as dt:
            x = b.op("Relu", b.op("Conv", self._as(x, have, dt), *self._w("conv0", dt),
                                  kernel_shape=[5, 5, 5], strides=[2, 2, 2], pads=[2] * 6,
                                  hint="Conv0"))
        have = dt
        with self._block("obelisk") as dt:
            x = self._as(x, have, dt)
            stem_shape = (1, 4) + tuple((((n + 1) // 2) + 1) // 2 for n in self.image_shape)
            n_off = 2 * self.cfg.channels
            self.fns.add("DeformableSample3D", (stem_shape, n_off, self.feat_shape, dt.name),
                         lambda: fn.deformable_sample_function(stem_shape, n_off, self.feat_shape,
                                                               dt))
            s0 = fn.custom_node(b, "DeformableSample3D", [x, self.w["offsets0"]],
                                output_shape=list(self.feat_shape))
            s1 = fn.custom_node(b, "DeformableSample3D", [x, self.w["offsets1"]],
                                output_shape=list(self.feat_shape))
            x = b.op("Sub", s0, s1, hint="ObeliskDiff")
        have = dt
        with self._block("conv1") as dt:
            x = b.op("Relu", b.op("Conv", self._as(x, have, dt), *self._w("conv1", dt),
                                  kernel_shape=[1, 1, 1], hint="Conv1"))
        have = dt
        with self._block("conv2") as dt:
            x = b.op("Relu", b.op("Conv", self._as(x, have, dt), *self._w("conv2", dt),
                                  kernel_shape=[3, 3, 3], pads=[1] * 6, hint="Conv2"))
        have = dt
        with self._block("conv3") as dt:
            x = self._as(x, have, dt)
            if dt == F32:
                return b.op("Conv", x, *self.w["conv3"], kernel_shape=[1, 1, 1], outputs=[out],
                            hint="Conv3")
            y = b.op("Conv", x, *self._w("conv3", dt), kernel_shape=[1, 1, 1], hint="Conv3")
            return self._cast(y, F32, outputs=[out])  # the split point stays float32

    def head(self, outputs) -> list[str]:
        b, cfg = self.b, self.cfg
        b.prefix = "head"
        grid, L = cfg.grid, cfg.disp_size
        feat_full = (1, cfg.channels) + self.feat_shape
        alpha = _np(self.model.alpha)
        pen = float(_np(self.model.penalty)) if cfg.minconv == "exact" else None
        def mean_field(x, penalty):
            extra = [b.const(np.array(penalty), "penalty")] if penalty is not None else []
            return fn.custom_node(b, "MeanFieldStep", [x, *extra], mode=cfg.minconv)

        with self._block("correlation") as dt_corr:
            self.fns.add("Correlation", (feat_full, grid, L, cfg.capture, dt_corr.name),
                         lambda: fn.correlation_function(feat_full, grid, L, cfg.capture, dt_corr))
            ssd = fn.custom_node(b, "Correlation", [self._as(C.FIXED_FEATURES, F32, dt_corr),
                                                    self._as(C.MOVING_FEATURES, F32, dt_corr)],
                                 grid=list(grid), disp_size=L, capture=float(cfg.capture))
        mf_dtype = self._fn_dtype("meanfield1", "meanfield2")
        mf_key = None if mf_dtype is None else mf_dtype.name
        self.fns.add("MinConv", (grid, L, cfg.minconv, mf_key),
                     lambda: fn.minconv_function(grid, L, cfg.minconv, mf_dtype))
        self.fns.add("MeanFieldStep", (grid, L, cfg.minconv, mf_key),
                     lambda: fn.mean_field_function(grid, L, cfg.minconv, mf_dtype))
        if self.fold_alphas:
            # MeanFieldStep(a x + c) = a MeanFieldStep_{p/a}(x) + c for a > 0, and the softmax
            # ignores constants, so the six alphas fold into two scalars and the penalties:
            # logits = -a5 a0 a2 MFS_{p/(a0 a2)}(S + (a3/a2) MFS_{p/a0}(S)), S the SSD.
            with self._block("meanfield1") as dt1:
                first = mean_field(self._as(ssd, dt_corr, dt1),
                                   None if pen is None else pen / alpha[0])
            with self._block("meanfield2") as dt2:
                second_in = b.op("Add", self._as(ssd, dt_corr, dt2),
                                 b.op("Mul", self._as(first, dt1, dt2),
                                      b.const(np.array(alpha[3] / alpha[2]), "a3_over_a2")),
                                 hint="SecondInput")
                second = mean_field(second_in, None if pen is None else pen / (alpha[0] * alpha[2]))
            scale = -alpha[5] * alpha[0] * alpha[2]
        else:  # the literal form of PDDNet.regularise
            with self._block("meanfield1") as dt1:
                a = [self._w(f"alpha{i}", dt1) for i in range(5)]
                cost = b.op("Add", b.op("Mul", self._as(ssd, dt_corr, dt1), a[0]), a[1],
                            hint="DataCost")
                first = mean_field(cost, pen)
            with self._block("meanfield2") as dt2:
                a = [self._w(f"alpha{i}", dt2) for i in range(5)]
                second_in = b.op("Add", b.op("Add", b.op("Mul", self._as(cost, dt1, dt2), a[2]),
                                             b.op("Mul", self._as(first, dt1, dt2), a[3])), a[4],
                                 hint="SecondInput")
                second = mean_field(second_in, pen)
            scale = -alpha[5]
        made = []
        with self._block("softmax") as dts:
            logits = b.reshape(b.op("Mul", self._as(second, dt2, dts),
                                    b.const(np.array(scale), "logit_scale")), (*grid, L ** 3))
            want_probs = C.OUTPUT_PROBS in outputs
            probs = b.op("Softmax", logits, axis=-1,
                         outputs=[C.OUTPUT_PROBS] if want_probs and dts == F32 else 1)
            if want_probs:
                if dts != F32:
                    self._cast(probs, F32, outputs=[C.OUTPUT_PROBS])
                made.append(C.OUTPUT_PROBS)
            disp_set = b.const(fn.displacement_set(L, cfg.capture), "displacements")
            grid_disp = b.matmul(probs, disp_set, hint="Expectation")
            if dts == F32:
                b.op("Identity", grid_disp, outputs=[C.OUTPUT_GRID_DISP])
            else:
                self._cast(grid_disp, F32, outputs=[C.OUTPUT_GRID_DISP])
            made.append(C.OUTPUT_GRID_DISP)
            if C.OUTPUT_ENTROPY in outputs:
                logp = b.op("LogSoftmax", logits, axis=-1)
                ent = b.op("Neg", b.op("ReduceSum", b.op("Mul", probs, logp), b.ints([-1]),
                                       keepdims=0),
                           outputs=[C.OUTPUT_ENTROPY] if dts == F32 else 1, hint="Entropy")
                if dts != F32:
                    self._cast(ent, F32, outputs=[C.OUTPUT_ENTROPY])
                made.append(C.OUTPUT_ENTROPY)
        with self._block("upsample") as dtu:
            made.insert(0, self.upsample(self._as(grid_disp, dts, dtu), dtu))
        return made

    def upsample(self, grid_disp: str, dtype=F32) -> str:
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
        if np.dtype(dtype) == F32:
            return b.op("Mul", x, b.const(scale, "voxels_per_unit"), outputs=[C.OUTPUT_DISP],
                        hint="ToVoxels")
        y = b.op("Mul", x, b.const(scale, "voxels_per_unit"), hint="ToVoxels")
        return self._cast(y, F32, outputs=[C.OUTPUT_DISP])

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
        used = {x for n in self.b.nodes for x in n.input}
        graph = helper.make_graph(
            self.b.nodes, "pddnet",
            [value_info(C.INPUT_FIXED, (1, 1, *self.image_shape)),
             value_info(C.INPUT_MOVING, (1, 1, *self.image_shape))],
            [value_info(n, shapes[n]) for n in made],
            # float32 weights that a reduced-precision graph replaced by float16 copies go
            initializer=[t for t in self.b.initializers if t.name in used])
        model = helper.make_model(
            graph, functions=self.fns.as_list(), producer_name="pddnet",
            producer_version=__version__,
            opset_imports=[helper.make_opsetid("", C.OPSET),
                           helper.make_opsetid(C.DOMAIN, C.DOMAIN_VERSION)])
        model.ir_version = 9
        meta = {C.META_FORMAT: C.FORMAT_VERSION, C.META_CONFIG: cfg.as_dict(),
                C.META_OUTPUTS: made, C.META_BLOCKS: self.blocks, **metadata}
        if any(dt != F32 for dt in self.plan.values()):
            meta[C.META_PRECISION] = {**meta.get(C.META_PRECISION, {}), **self.precision_meta()}
        helper.set_model_props(model, {k: json.dumps(v, sort_keys=True) for k, v in meta.items()})
        return model

    def precision_meta(self) -> dict:
        """``pddnet.precision`` of a reduced-precision graph (docs/precision.md)."""
        names = {F32: "fp32", F16: "fp16"}
        blocks = {blk: names[dt] for blk, dt in self.plan.items()}
        funcs = {}
        for op, f in self.fns.functions.items():
            sig = self.fns.signatures[op]
            funcs[op] = "polymorphic" if sig[-1] is None else \
                names.get(np.dtype(sig[-1]), str(sig[-1]))
        return {
            "mode": "fp16",
            "blocks": blocks,
            "keep_fp32": [blk for blk, p in blocks.items() if p == "fp32"],
            "nodes": {p: sorted(n for blk in C.BLOCKS if blocks[blk] == p
                                for n in self.blocks[blk])
                      for p in ("fp16", "fp32")},
            "functions": funcs,
            "io": "float32 (inputs, outputs and the fixed_features/moving_features split)",
        }


def export_model(model, image_shape, *, spacing_mm=None, outputs=(), source=None,
                 fold_alphas: bool = True, metadata: dict | None = None,
                 precision=None, num_labels: int | None = None) -> onnx.ModelProto:
    """Build the ONNX model of ``model`` (a :class:`~pddnet.model.network.PDDNet` in eval mode)
    for inputs of ``image_shape``; ``outputs`` lists optional outputs (probs, entropy);
    ``num_labels``, the largest label value it was trained on, goes into the input contract.

    ``fold_alphas`` folds the six trained scalars into two (exact algebra, see ``head``) when
    ``a0`` and ``a2`` are positive, saving four passes over the cost volume. ``metadata`` adds
    further ``pddnet.*`` keys (JSON values), e.g. ``pddnet.overrides``/``pddnet.stage2``.

    ``precision``: ``None``/``"fp32"`` (the FP32 graph), ``"fp16"`` (every block float16) or
    ``{block: "fp16"|"fp32"}`` over :data:`contract.BLOCKS` (unlisted blocks float32): the
    exporter writes each block in its type with ``Cast`` nodes at block boundaries; inputs,
    outputs and the feature tensors stay float32 (docs/precision.md)."""
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
            "num_labels": None if num_labels is None else int(num_labels),
        },
        C.META_PRECISION: {"mode": "fp32"},
        C.META_SOURCE: {"pddnet_version": __version__,
                        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                        **(source or {})},
        **(metadata or {}),
    }
    return _Exporter(model, image_shape, fold_alphas=fold_alphas,
                     precision=precision).build(tuple(outputs), meta)


def check_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """``onnx.checker`` with full_check and strict shape inference; returns the inferred model."""
    try:
        onnx.checker.check_model(model, full_check=True)
        return onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True,
                                                 data_prop=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise PddnetError(f"the exported graph fails the ONNX checker: {exc}") from exc


def export_checkpoint(checkpoint, out, *, image_shape=None, outputs=(), overwrite=False,
                      overrides: dict | None = None, stage2: bool | dict = False,
                      precision=None) -> Path:
    """``pddnet export``: checkpoint -> checked ONNX file, written atomically.

    Args:
        overrides: ``PDDConfig`` fields to change before exporting that keep the weights valid
            (``grid``, ``capture``, ``disp_size``), e.g. a stage-two model on its own; recorded
            in the ``pddnet.overrides`` metadata with the checkpoint's config.
        stage2: also write the stage-two model (``docs/refinement.md``) next to ``out`` as
            ``<stem>.stage2.onnx`` -- ``True`` for the default finer grid and smaller capture
            range (:func:`pddnet.spec.refine.stage2_overrides`), or a dict of overrides --
            and name it (file, SHA-256, overrides) in ``out``'s ``pddnet.stage2`` metadata,
            which ``pddnet register --stages 2`` follows. Both get the same ``outputs``.
        precision: as :func:`export_model` (``"fp16"``, or ``{block: "fp16"|"fp32"}``, e.g.
            from :func:`pddnet.calibration.blocks.fp16_plan`); applies to both models.

    Returns the path of ``out``.
    """
    import torch

    from pddnet.model.checkpoint import load_model
    from pddnet.model.refine import stage2_network
    from pddnet.spec import refine as R
    from pddnet.spec.refine import stage2_path

    model, ckpt = load_model(checkpoint)
    shape = tuple(image_shape or ckpt.get("image_shape") or ())
    if len(shape) != 3:
        raise PddnetError(f"{checkpoint} records no image shape; pass --shape I J K")
    spacing = (ckpt.get("metadata") or {}).get("spacing_mm")
    # the largest label value the network was trained on (`pddnet train`: 0..13), so the runtime
    # can refuse label maps from another label set
    num_labels = (ckpt.get("metadata") or {}).get("num_labels")
    if num_labels is None and ckpt.get("train") is not None:
        from pddnet.model.train import NUM_CLASSES

        num_labels = NUM_CLASSES - 1
    source = {"checkpoint": Path(checkpoint).name, "checkpoint_sha256": sha256_file(checkpoint),
              "torch_version": torch.__version__}

    def variant(ov):
        try:
            return stage2_network(model, ov).eval()
        except (PddnetError, ValueError, TypeError) as exc:
            raise PddnetError(f"export: invalid config overrides {ov}: {exc}") from exc

    def build(net, meta) -> onnx.ModelProto:
        onnx_model = export_model(net, shape, spacing_mm=spacing, outputs=outputs, source=source,
                                  metadata=meta, precision=precision, num_labels=num_labels)
        check_model(onnx_model)
        return onnx_model

    base_cfg = model.config.as_dict()
    meta: dict = {}
    if overrides:
        model = variant(dict(overrides))
        meta[C.META_OVERRIDES] = {"overrides": dict(overrides), "base_config": base_cfg}
    # both files are written under their lock to temporary names, and renamed only once both
    # are complete: an interrupt leaves the previous pair as it was
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with folder_lock(out), contextlib.ExitStack() as files:
        if stage2:
            ov2 = R.stage2_overrides(model.config.as_dict()) if stage2 is True else dict(stage2)
            second = stage2_path(out)
            tmp2 = files.enter_context(atomic_write(second, overwrite=overwrite))
            onnx.save_model(build(variant(ov2), {C.META_OVERRIDES: {
                "overrides": ov2, "base_config": model.config.as_dict()}}), tmp2)
            meta[C.META_STAGE2] = {"file": second.name, "sha256": sha256_file(tmp2),
                                   "overrides": ov2}
        tmp = files.enter_context(atomic_write(out, overwrite=overwrite))
        onnx.save_model(build(model, meta), tmp)
    return Path(out)
