"""The PyTorch reference as a runtime backend (``create_backend("torch", ...)``).

:class:`TorchBackend` runs a checkpoint's :class:`~pddnet.model.network.PDDNet` behind the same
interface as :class:`~pddnet.backends.onnxrt.OnnxRuntimeBackend`: it is given the
exported ONNX (sub-)model whose *interface* it mirrors -- input names, dtypes and shapes, output
names, and the part (``features``, ``head`` or the whole model, from the ``pddnet.part``
metadata that :func:`pddnet.graph.split.split_model` writes) -- and computes those outputs
with PyTorch from the checkpoint's weights. So the :class:`~pddnet.runtime.session.Registrar`
pipeline (pre-processing, split, post-processing, metrics) runs unchanged on top of it, and a
comparison of backends differs only in the model execution.

Parts (``docs/model-format.md``):

``features``  ``image`` ``(1, 1, I, J, K)`` -> ``features`` ``(1, C, I//3, J//3, K//3)``:
    ``PDDNet.features``.
``head``      ``fixed_features``, ``moving_features`` -> ``disp`` ``(I, J, K, 3)`` voxels,
    ``grid_disp`` ``(G_i, G_j, G_k, 3)`` normalised, optionally ``probs`` and ``entropy``:
    ``PDDNet.register_features`` then ``Registration.dense`` (trilinear, ``align_corners=False``).
full          ``fixed``, ``moving`` -> the same outputs: both of the above.

This module imports torch when a backend is *loaded* (``activate``), never at import time; the
runtime registers it only by its import string, so the torch-free runtime stays torch-free.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from pddnet.backends.base import Backend, TensorSpec
from pddnet.errors import PddnetError
from pddnet.spec import contract as C
from pddnet.spec.metadata import metadata_value, raw_metadata


class TorchBackend(Backend):
    """Run the PyTorch PDD-Net for the interface of an exported ONNX (sub-)model.

    Args:
        model: the ONNX model whose interface to mirror: an ``onnx.ModelProto``, serialised
            bytes or a path (a full model from ``pddnet export`` or a part from
            :func:`~pddnet.graph.split.split_model`). Only its graph inputs/outputs and
            ``pddnet.*`` metadata are read; its weights are not used.
        checkpoint: a checkpoint written by ``pddnet train`` (the weights that run).
        network: alternatively, a :class:`~pddnet.model.network.PDDNet` instance (put in eval
            mode on load).
        threads: ``torch.set_num_threads`` on load (process-wide in PyTorch; ``None`` keeps it).

    The checkpoint's config must match the model's ``pddnet.config`` metadata, else loading
    raises :class:`PddnetError`. Only ``grid``, ``capture`` and ``disp_size`` may differ (an
    export on another grid, e.g. a stage-two model: the same weights apply,
    :func:`pddnet.model.refine.network_for_config`). Whether the weights are the ones the ONNX
    file was exported from is what a comparison measures.
    """

    name = "torch"

    def __init__(self, model: Any, *, label: str = "model", checkpoint: str | os.PathLike | None
                 = None, network: Any = None, threads: int | None = None):
        super().__init__(model, label=label)
        if (checkpoint is None) == (network is None):
            raise PddnetError("torch backend: give exactly one of checkpoint=PATH (a pddnet "
                              "checkpoint) or network=PDDNet(...)")
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int)
                                    or threads < 1):
            raise PddnetError(f"threads must be a positive integer or None, got {threads!r}")
        self.checkpoint = None if checkpoint is None else Path(checkpoint)
        self.threads = threads
        self._network = network
        self._net = None
        self._torch = None
        self.part = "full"
        self.image_shape: tuple[int, int, int] | None = None
        self._inputs: list[TensorSpec] = []
        self._outputs: list[str] = []

    # -- hooks ----------------------------------------------------------------------------
    def _load_impl(self) -> None:
        from pddnet import _optional

        torch = _optional.torch()
        self._torch = torch
        self._read_interface(self._model)
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        if self.checkpoint is not None:
            from pddnet.model.checkpoint import load_model

            net, _ = load_model(self.checkpoint)
        else:
            net = self._network.eval()
        self._net = self._for_model(net)

    def _unload_impl(self) -> None:
        self._net = None

    def _input_specs_impl(self) -> list[TensorSpec]:
        return list(self._inputs)

    @property
    def output_names(self) -> list[str]:
        self._require_active("output_names")
        return list(self._outputs)

    def _run_impl(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self._torch
        t = {k: torch.from_numpy(v) for k, v in feeds.items()}
        with torch.inference_mode():
            if self.part == "features":
                return {C.FEATURES_OUTPUT: _np(self._net.features(t[C.FEATURES_INPUT]))}
            if self.part == "head":
                ff, mf = t[C.FIXED_FEATURES], t[C.MOVING_FEATURES]
            else:
                ff = self._net.features(t[C.INPUT_FIXED])
                mf = self._net.features(t[C.INPUT_MOVING])
            return self._head(ff, mf)

    def _describe_impl(self) -> dict[str, Any]:
        return {
            "torch": self._torch.__version__,
            "threads": self._torch.get_num_threads(),
            "device": "cpu",
            "part": self.part,
            "checkpoint": str(self.checkpoint) if self.checkpoint else "<in-memory network>",
        }

    # -- internals ------------------------------------------------------------------------
    def _head(self, ff, mf) -> dict[str, np.ndarray]:
        from pddnet.model import ops

        reg = self._net.register_features(ff, mf)
        out: dict[str, np.ndarray] = {}
        for name in self._outputs:
            if name == C.OUTPUT_DISP:
                out[name] = _np(reg.dense(self.image_shape))
            elif name == C.OUTPUT_GRID_DISP:
                out[name] = _np(reg.grid_disp)
            elif name == C.OUTPUT_PROBS:
                out[name] = _np(reg.probs)
            elif name == C.OUTPUT_ENTROPY:
                out[name] = _np(ops.displacement_entropy(reg.probs))
        return out

    def _read_interface(self, model: Any) -> None:
        import onnx

        if isinstance(model, (bytes, bytearray)):
            proto = onnx.load_model_from_string(bytes(model), load_external_data=False)
        elif isinstance(model, (str, os.PathLike)):
            proto = onnx.load_model(os.fspath(model), load_external_data=False)
        elif hasattr(model, "graph"):
            proto = model
        else:
            raise PddnetError(f"torch backend ({self.label}): model must be the ONNX model whose "
                              f"interface to mirror (ModelProto, bytes or path), received "
                              f"{type(model).__name__}")
        meta = raw_metadata(proto)
        where = f"torch backend ({self.label})"
        if C.META_INPUT not in meta or C.META_CONFIG not in meta:
            raise PddnetError(f"{where}: the model lacks the pddnet metadata; give a model "
                              "written by `pddnet export` (or a part of one)")
        self._meta_config = metadata_value(meta, C.META_CONFIG, where=where)
        self.image_shape = tuple(int(n) for n in
                                 metadata_value(meta, C.META_INPUT, where=where)["image_shape"])
        self.part = metadata_value(meta, C.META_PART, where=where, default="full")
        inits = {i.name for i in proto.graph.initializer}
        specs = []
        for vi in proto.graph.input:
            if vi.name in inits:
                continue
            tt = vi.type.tensor_type
            dims = tuple(d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim)
            specs.append(TensorSpec(vi.name, np.dtype(onnx.helper.tensor_dtype_to_np_dtype(
                tt.elem_type)), dims))
        self._inputs = specs
        self._outputs = [o.name for o in proto.graph.output]
        expected = {"features": [C.FEATURES_INPUT], "head": [C.FIXED_FEATURES, C.MOVING_FEATURES],
                    "full": [C.INPUT_FIXED, C.INPUT_MOVING]}.get(self.part)
        if expected is None or sorted(s.name for s in specs) != sorted(expected):
            raise PddnetError(f"{where}: part {self.part!r} with inputs {[s.name for s in specs]} "
                              "is not one the PyTorch reference can run (expected the full model, "
                              "or the features/head parts of split_model)")
        known = {C.FEATURES_OUTPUT} if self.part == "features" else {
            C.OUTPUT_DISP, C.OUTPUT_GRID_DISP, *C.OPTIONAL_OUTPUTS}
        unknown = [o for o in self._outputs if o not in known]
        if unknown:
            raise PddnetError(f"{where}: outputs {unknown} have no PyTorch counterpart "
                              f"(known: {sorted(known)})")

    def _for_model(self, net):
        """``net`` as the model's ``pddnet.config`` describes it (refused if not the same
        architecture)."""
        from pddnet.model.refine import network_for_config

        try:
            return network_for_config(net, self._meta_config)
        except (PddnetError, ValueError) as exc:
            src = str(self.checkpoint) if self.checkpoint else "the network"
            raise PddnetError(f"torch backend ({self.label}): {src} has another configuration "
                              f"than the ONNX model ({exc}); they are not the same "
                              "network") from exc


def _np(t) -> np.ndarray:
    return np.ascontiguousarray(t.detach().cpu().numpy(), dtype=np.float32)
