"""Loading an exported model: file checks, external-data safety, the pddnet metadata contract.

:func:`load_model` returns a :class:`LoadedModel`: the ``onnx.ModelProto`` with any external
data inlined, and a :class:`ModelInfo` parsed from the ``pddnet.*`` metadata of
``docs/model-format.md``. Every problem is a :class:`PddnetError` that names the file.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import onnx

from pddnet.errors import PddnetError
from pddnet.spec import contract as C
from pddnet.spec.metadata import metadata_value, raw_metadata

#: ONNX domains that are standard (everything else must be defined as a local function).
STANDARD_DOMAINS = ("", "ai.onnx", "ai.onnx.ml", "com.microsoft")


@dataclass(frozen=True)
class ModelInfo:
    """What the runtime needs to know about a model, from its metadata.

    Attributes:
        image_shape: the model grid ``(I, J, K)`` in voxels (RAS+ axes).
        spacing_mm: voxel size in mm the model was trained at, per axis (``None`` when the
            exporter did not know it; the runtime then cannot check input spacing).
        intensity: ``{"lower", "upper", "scale"}``: input is ``clip(HU, lower, upper) / scale``.
        outputs: output names present (``disp``, ``grid_disp`` and optionally ``probs``,
            ``entropy``).
        precision: ``{"mode": "fp32" | "fp16" | "int8", ...}``.
        config: the ``PDDConfig`` as a dict (``channels``, ``grid``, ``disp_size``, ...).
        num_labels: largest label value the model was trained with, if the metadata says
            (``pddnet.input["num_labels"]`` or ``config["num_labels"]``), else ``None``.
    """

    path: Path | None
    format_version: int
    config: dict[str, Any]
    image_shape: tuple[int, int, int]
    spacing_mm: tuple[float, float, float] | None
    intensity: dict[str, float]
    orientation: str
    outputs: tuple[str, ...]
    precision: dict[str, Any]
    source: dict[str, Any] = field(default_factory=dict)
    num_labels: int | None = None
    sha256: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path) if self.path else None,
            "sha256": self.sha256,
            "format": self.format_version,
            "image_shape": list(self.image_shape),
            "spacing_mm": list(self.spacing_mm) if self.spacing_mm else None,
            "intensity": dict(self.intensity),
            "orientation": self.orientation,
            "outputs": list(self.outputs),
            "precision": dict(self.precision),
            "config": dict(self.config),
            "source": dict(self.source),
        }


@dataclass
class LoadedModel:
    """An exported model in memory: ``proto`` (external data inlined) and its ``info``."""

    proto: onnx.ModelProto
    info: ModelInfo


def load_model(path: str | os.PathLike) -> LoadedModel:
    """Read and check a ``pddnet export`` model.

    Refuses, with a message naming the file: a missing path or a folder; a file that does not
    parse as ONNX (not a model, or truncated); a model whose custom-domain nodes lack their
    local function (truncated or written by another tool); external data whose location is
    absolute, leaves the model's folder (``..``, symlinks) or is missing; a model without the
    ``pddnet.format`` / ``pddnet.config`` / ``pddnet.input`` metadata (not written by
    ``pddnet export``); metadata that contradicts the graph's inputs/outputs.
    """
    p = Path(path)
    if not p.exists():
        raise PddnetError(f"{p}: no such model file; give the .onnx written by `pddnet export`")
    if not p.is_file():
        raise PddnetError(f"{p} is a folder, not a model file; give the .onnx inside it")
    data = p.read_bytes()
    proto = parse_model_bytes(data, where=str(p))
    _load_external_data(proto, p)
    info = read_model_info(proto, path=p, sha256=hashlib.sha256(data).hexdigest())
    return LoadedModel(proto, info)


def parse_model_bytes(data: bytes, *, where: str = "model") -> onnx.ModelProto:
    """Parse serialised ONNX (external data not loaded) and check it is a complete model."""
    size = len(data)
    try:
        proto = onnx.load_model_from_string(data)
    except Exception as exc:  # google.protobuf DecodeError, RuntimeWarning-as-error, ...
        raise PddnetError(
            f"{where}: not a readable ONNX model ({size} bytes; parse error: {exc}). "
            "It is either not an ONNX file or truncated (an interrupted copy or download); "
            "re-export it with `pddnet export`") from exc
    if proto.ir_version <= 0 or not proto.HasField("graph") or not proto.graph.node:
        raise PddnetError(f"{where}: not an ONNX model (no IR version or no graph in {size} "
                          "bytes); give the .onnx written by `pddnet export`")
    defined = {(f.domain, f.name) for f in proto.functions}
    for node in all_nodes(proto):
        if node.domain not in STANDARD_DOMAINS and (node.domain, node.op_type) not in defined:
            raise PddnetError(
                f"{where}: node {node.name or node.op_type!r} uses {node.domain}.{node.op_type}, "
                "but the model defines no local function of that name; the file is truncated or "
                "was not written by `pddnet export`")
    return proto


def all_nodes(proto: onnx.ModelProto) -> Iterator[onnx.NodeProto]:
    def walk(nodes):
        for n in nodes:
            yield n
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    yield from walk(a.g.node)
                elif a.type == onnx.AttributeProto.GRAPHS:
                    for g in a.graphs:
                        yield from walk(g.node)

    yield from walk(proto.graph.node)
    for f in proto.functions:
        yield from walk(f.node)


def called_functions(proto: onnx.ModelProto, nodes) -> list[onnx.FunctionProto]:
    """The local functions of ``proto`` that ``nodes`` call, directly or through other
    functions, in the model's order."""
    funcs = {(f.domain, f.name): f for f in proto.functions}
    needed: set[tuple[str, str]] = set()
    todo = [(n.domain, n.op_type) for n in nodes]
    while todo:
        key = todo.pop()
        if key in funcs and key not in needed:
            needed.add(key)
            todo.extend((n.domain, n.op_type) for n in funcs[key].node)
    return [f for f in proto.functions if (f.domain, f.name) in needed]


def all_tensors(proto: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    def in_graph(g):
        yield from g.initializer
        for s in g.sparse_initializer:
            yield s.values
            yield s.indices
        yield from in_nodes(g.node)

    def in_nodes(nodes):
        for n in nodes:
            for a in n.attribute:
                if a.HasField("t"):
                    yield a.t
                yield from a.tensors
                if a.HasField("g"):
                    yield from in_graph(a.g)
                for g in a.graphs:
                    yield from in_graph(g)

    yield from in_graph(proto.graph)
    for f in proto.functions:
        yield from in_nodes(f.node)


def check_external_data(proto: onnx.ModelProto, path: Path) -> list:
    """The tensors of ``proto`` (read from ``path``) that hold external data; refuses any
    whose location leaves the model's folder or whose file is missing."""
    folder = path.resolve().parent
    refs = []
    for t in all_tensors(proto):
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        loc = {e.key: e.value for e in t.external_data}.get("location", "")
        target = (folder / loc).resolve()
        if not loc or os.path.isabs(loc) or not target.is_relative_to(folder):
            raise PddnetError(
                f"{path}: tensor {t.name!r} refers to external data {loc!r}, which is outside "
                f"the model's folder {folder}; refusing to read it (external data must be a "
                "relative path next to the .onnx)")
        if not target.is_file():
            raise PddnetError(f"{path}: external data file {loc!r} of tensor {t.name!r} is "
                              f"missing from {folder}; copy it next to the model")
        refs.append(t)
    return refs


def _load_external_data(proto: onnx.ModelProto, path: Path) -> None:
    """Check every external-data location stays inside the model's folder, then inline it."""
    from onnx.external_data_helper import load_external_data_for_model

    folder = path.resolve().parent
    if check_external_data(proto, path):
        try:
            load_external_data_for_model(proto, str(folder))
        except Exception as exc:
            raise PddnetError(f"{path}: cannot read its external data ({exc}); is the .data "
                              "file complete?") from exc


def read_model_info(proto: onnx.ModelProto, *, path: Path | None = None,
                    sha256: str | None = None) -> ModelInfo:
    """Parse and check the ``pddnet.*`` metadata of ``proto`` against its graph."""
    where = str(path) if path else "model"
    meta = raw_metadata(proto)
    missing = [k for k in C.REQUIRED_META if k not in meta]
    if missing:
        raise PddnetError(f"{where}: the model lacks the pddnet metadata {missing}; it was not "
                          "written by `pddnet export` (or the file is truncated); export a "
                          "checkpoint with `pddnet export CKPT --out model.onnx`")
    fmt = metadata_value(meta, C.META_FORMAT, where=where)
    if fmt != C.FORMAT_VERSION:
        raise PddnetError(f"{where}: model format {fmt!r}; this pddnet reads format "
                          f"{C.FORMAT_VERSION}; re-export with this pddnet version")
    config = metadata_value(meta, C.META_CONFIG, where=where)
    inp = metadata_value(meta, C.META_INPUT, where=where)
    if not isinstance(config, dict) or not isinstance(inp, dict):
        raise PddnetError(f"{where}: metadata {C.META_CONFIG}/{C.META_INPUT} must be JSON objects")
    try:
        image_shape = tuple(int(n) for n in inp["image_shape"])
        raw = inp["spacing_mm"]
        spacing = None if raw is None else tuple(float(s) for s in raw)
        intensity = {k: float(inp["intensity"][k]) for k in ("lower", "upper", "scale")}
    except (KeyError, TypeError, ValueError) as exc:
        raise PddnetError(f"{where}: metadata {C.META_INPUT} lacks or garbles {exc}; expected "
                          "image_shape, spacing_mm and intensity {lower, upper, scale}") from exc
    if len(image_shape) != 3 or min(image_shape) < 6 or (
            spacing is not None and (len(spacing) != 3 or min(spacing) <= 0)):
        raise PddnetError(f"{where}: metadata image_shape {image_shape} / spacing_mm {spacing} "
                          "are not three positive sizes")
    if intensity["scale"] == 0 or intensity["upper"] <= intensity["lower"]:
        raise PddnetError(f"{where}: metadata intensity {intensity} is not a valid normalisation")
    outputs = tuple(metadata_value(meta, C.META_OUTPUTS, where=where)) if C.META_OUTPUTS in meta else \
        tuple(o.name for o in proto.graph.output)
    precision = metadata_value(meta, C.META_PRECISION, where=where) if C.META_PRECISION in meta else \
        {"mode": "fp32"}
    source = metadata_value(meta, C.META_SOURCE, where=where) if C.META_SOURCE in meta else {}
    num_labels = inp.get("num_labels", config.get("num_labels"))

    graph_inputs = {i.name: i for i in proto.graph.input}
    init_names = {i.name for i in proto.graph.initializer}
    real_inputs = [n for n in graph_inputs if n not in init_names]
    if sorted(real_inputs) != sorted([C.INPUT_FIXED, C.INPUT_MOVING]):
        raise PddnetError(f"{where}: graph inputs {real_inputs}; the pddnet contract has "
                          f"{[C.INPUT_FIXED, C.INPUT_MOVING]}")
    for name in (C.INPUT_FIXED, C.INPUT_MOVING):
        dims = [d.dim_value if d.HasField("dim_value") else None
                for d in graph_inputs[name].type.tensor_type.shape.dim]
        declared = [1, 1, *image_shape]
        if len(dims) != 5 or any(d is not None and d != e for d, e in zip(dims, declared)):
            raise PddnetError(f"{where}: input {name!r} has shape {dims} but the metadata says "
                              f"image_shape {list(image_shape)} (expected {declared})")
    graph_outputs = [o.name for o in proto.graph.output]
    if C.OUTPUT_DISP not in graph_outputs:
        raise PddnetError(f"{where}: the model has no {C.OUTPUT_DISP!r} output (outputs: "
                          f"{graph_outputs})")
    return ModelInfo(
        path=path, format_version=int(fmt), config=config, image_shape=image_shape,
        spacing_mm=spacing, intensity=intensity, orientation=str(inp.get("orientation", "RAS")),
        outputs=tuple(o for o in outputs if o in graph_outputs), precision=precision,
        source=source, num_labels=int(num_labels) if num_labels is not None else None,
        sha256=sha256)
