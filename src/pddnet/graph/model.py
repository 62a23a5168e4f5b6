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
from pddnet.spec.config import (
    MAX_NUM_LABELS,
    Intensity,
    PDDConfig,
    check_image_shape,
    is_int,
    is_real,
    show,
)
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
        intensity: the normalisation, :meth:`~pddnet.spec.config.Intensity.as_dict`:
            ``{"mode": "ct", "lower", "upper", "scale"}`` or ``{"mode": "mr", "z_lower",
            "z_upper"}`` (metadata without ``mode``, written before modes existed, reads as
            ``ct``); :meth:`normalisation` gives the :class:`Intensity`.
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
    intensity: dict[str, Any]
    orientation: str
    outputs: tuple[str, ...]
    precision: dict[str, Any]
    source: dict[str, Any] = field(default_factory=dict)
    num_labels: int | None = None
    sha256: str | None = None

    @property
    def normalisation(self) -> Intensity:
        """The intensity contract as the :class:`Intensity` that
        :func:`~pddnet.spec.config.normalise_intensity` applies."""
        return Intensity.from_dict(self.intensity)

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


#: the ``pddnet.config`` fields the runtime reads from a model (stages, refinement)
RUNTIME_CONFIG_FIELDS = ("grid", "disp_size", "capture")
_PDD_FIELDS = frozenset(PDDConfig.__dataclass_fields__)


def _meta_value(meta: dict[str, str], key: str, where: str, **kw: Any) -> Any:
    """:func:`metadata_value`, also refusing JSON nested too deeply to decode."""
    try:
        return metadata_value(meta, key, where=where, **kw)
    except RecursionError:
        raise PddnetError(f"{where}: metadata {key!r} is nested too deeply to be pddnet "
                          "metadata; re-export the model with `pddnet export`") from None


def _bad(where: str, key: str, value: Any, expected: str) -> PddnetError:
    return PddnetError(f"{where}: metadata {key} is {show(value)}; expected {expected} -- the "
                       "model was edited or not written by `pddnet export`; re-export it")


def read_model_info(proto: onnx.ModelProto, *, path: Path | None = None,
                    sha256: str | None = None) -> ModelInfo:
    """Parse and check the ``pddnet.*`` metadata of ``proto`` against its graph.

    Every value is type-checked (one :class:`PddnetError` naming the key and what it should
    be): ``pddnet.format`` the integer :data:`~pddnet.spec.contract.FORMAT_VERSION`;
    ``pddnet.config`` a valid ``PDDConfig`` (:mod:`pddnet.spec.config` bounds) with ``grid``,
    ``disp_size`` and ``capture``; ``pddnet.input``: ``image_shape`` three integers in
    [6, 1024], ``spacing_mm`` ``null`` or three positive finite numbers, ``intensity``
    an :class:`Intensity` dict (``mode`` ct or mr, default ct, with that mode's finite numbers), ``orientation`` a
    string, ``num_labels`` ``null`` or an integer in [0, 255]; ``pddnet.outputs`` a list of
    strings; ``pddnet.precision`` / ``pddnet.source`` objects; the graph's inputs and its
    ``disp`` output must have the shapes ``(1, 1, I, J, K)`` and ``(I, J, K, 3)``.
    """
    where = str(path) if path else "model"
    meta = raw_metadata(proto)
    missing = [k for k in C.REQUIRED_META if k not in meta]
    if missing:
        raise PddnetError(f"{where}: the model lacks the pddnet metadata {missing}; it was not "
                          "written by `pddnet export` (or the file is truncated); export a "
                          "checkpoint with `pddnet export CKPT --out model.onnx`")
    fmt = _meta_value(meta, C.META_FORMAT, where)
    if not is_int(fmt) or fmt != C.FORMAT_VERSION:
        raise PddnetError(f"{where}: model format {show(fmt)} ({C.META_FORMAT}); this pddnet "
                          f"reads format {C.FORMAT_VERSION}; re-export with this pddnet version")
    config = _meta_value(meta, C.META_CONFIG, where)
    inp = _meta_value(meta, C.META_INPUT, where)
    if not isinstance(config, dict) or not isinstance(inp, dict):
        raise PddnetError(f"{where}: metadata {C.META_CONFIG}/{C.META_INPUT} must be JSON objects")
    _check_config(config, where)
    for key in ("image_shape", "spacing_mm", "intensity"):
        if key not in inp:
            raise PddnetError(f"{where}: metadata {C.META_INPUT} lacks {key!r}; expected "
                              "image_shape, spacing_mm and intensity {lower, upper, scale} -- "
                              "re-export the model with `pddnet export`")
    try:
        image_shape = check_image_shape(inp["image_shape"],
                                        name=f"metadata {C.META_INPUT}.image_shape")
    except PddnetError as exc:
        raise PddnetError(f"{where}: {exc} -- re-export the model with `pddnet export`") \
            from None
    raw = inp["spacing_mm"]
    if raw is not None and not (isinstance(raw, list) and len(raw) == 3 and all(
            is_real(s) and s > 0 for s in raw)):
        raise _bad(where, f"{C.META_INPUT}.spacing_mm", raw,
                   "null or three positive finite numbers (mm per voxel)")
    spacing = None if raw is None else tuple(float(s) for s in raw)
    ints = inp["intensity"]
    expected = ('an object {"mode": "ct", lower, upper, scale} or {"mode": "mr", z_lower, '
                "z_upper} of finite numbers (no mode: ct)")
    if not isinstance(ints, dict):
        raise _bad(where, f"{C.META_INPUT}.intensity", ints, expected)
    try:
        intensity = Intensity.from_dict(ints).as_dict()
    except PddnetError as exc:
        raise PddnetError(f"{where}: metadata {C.META_INPUT}.intensity is {show(ints)}, not a "
                          f"valid normalisation ({exc}); expected {expected} -- re-export the "
                          "model with `pddnet export`") from None
    orientation = inp.get("orientation", "RAS")
    if not isinstance(orientation, str) or not 0 < len(orientation) <= 16:
        raise _bad(where, f"{C.META_INPUT}.orientation", orientation, "a string such as 'RAS'")
    if C.META_OUTPUTS in meta:
        listed = _meta_value(meta, C.META_OUTPUTS, where)
        if not isinstance(listed, list) or not all(isinstance(o, str) for o in listed):
            raise _bad(where, C.META_OUTPUTS, listed, "a list of output names (strings)")
        outputs = tuple(listed)
    else:
        outputs = tuple(o.name for o in proto.graph.output)
    precision = _meta_value(meta, C.META_PRECISION, where) if C.META_PRECISION in meta else \
        {"mode": "fp32"}
    if not isinstance(precision, dict) or not isinstance(precision.get("mode", ""), str):
        raise _bad(where, C.META_PRECISION, precision, 'an object such as {"mode": "fp32"}')
    source = _meta_value(meta, C.META_SOURCE, where) if C.META_SOURCE in meta else {}
    if not isinstance(source, dict):
        raise _bad(where, C.META_SOURCE, source, "an object")
    key = f"{C.META_INPUT}.num_labels" if "num_labels" in inp else f"{C.META_CONFIG}.num_labels"
    num_labels = inp.get("num_labels", config.get("num_labels"))
    if num_labels is not None and not (is_int(num_labels) and 0 <= num_labels <= MAX_NUM_LABELS):
        raise _bad(where, key, num_labels,
                   f"null or an integer in [0, {MAX_NUM_LABELS}] (the largest label value)")

    graph_inputs = {i.name: i for i in proto.graph.input}
    init_names = {i.name for i in proto.graph.initializer}
    real_inputs = [n for n in graph_inputs if n not in init_names]
    if sorted(real_inputs) != sorted([C.INPUT_FIXED, C.INPUT_MOVING]):
        raise PddnetError(f"{where}: graph inputs {real_inputs}; the pddnet contract has "
                          f"{[C.INPUT_FIXED, C.INPUT_MOVING]}")
    for name in (C.INPUT_FIXED, C.INPUT_MOVING):
        dims = _dims(graph_inputs[name])
        declared = [1, 1, *image_shape]
        if len(dims) != 5 or any(d is not None and d != e for d, e in zip(dims, declared)):
            raise PddnetError(f"{where}: input {name!r} has shape {dims} but the metadata says "
                              f"image_shape {list(image_shape)} (expected {declared})")
    graph_outputs = {o.name: o for o in proto.graph.output}
    if C.OUTPUT_DISP not in graph_outputs:
        raise PddnetError(f"{where}: the model has no {C.OUTPUT_DISP!r} output (outputs: "
                          f"{list(graph_outputs)})")
    dims = _dims(graph_outputs[C.OUTPUT_DISP])
    declared = [*image_shape, 3]
    if dims and (len(dims) != 4 or any(d is not None and d != e for d, e in zip(dims, declared))):
        raise PddnetError(f"{where}: output {C.OUTPUT_DISP!r} has shape {dims} but the metadata "
                          f"says image_shape {list(image_shape)} (expected {declared}: a "
                          "displacement per voxel of the model grid)")
    return ModelInfo(
        path=path, format_version=int(fmt), config=config, image_shape=image_shape,
        spacing_mm=spacing, intensity=intensity, orientation=orientation,
        outputs=tuple(o for o in outputs if o in graph_outputs), precision=precision,
        source=source, num_labels=int(num_labels) if num_labels is not None else None,
        sha256=sha256)


def _dims(value_info: onnx.ValueInfoProto) -> list[int | None]:
    """The declared dimensions (``None`` for a symbolic or unknown one)."""
    return [d.dim_value if d.HasField("dim_value") else None
            for d in value_info.type.tensor_type.shape.dim]


def _check_config(config: dict[str, Any], where: str) -> None:
    """``pddnet.config`` must hold the fields the runtime reads and be a valid ``PDDConfig``
    (other keys, such as ``num_labels``, are allowed)."""
    lacking = [k for k in RUNTIME_CONFIG_FIELDS if k not in config]
    if lacking:
        raise PddnetError(f"{where}: metadata {C.META_CONFIG} lacks {lacking}; expected the "
                          "PDDConfig of the export (grid, disp_size, capture, ...) -- re-export "
                          "the model with `pddnet export`")
    try:
        PDDConfig.from_dict({k: v for k, v in config.items() if k in _PDD_FIELDS})
    except PddnetError as exc:
        raise PddnetError(f"{where}: metadata {C.META_CONFIG}: {exc} -- re-export the model "
                          "with `pddnet export`") from None
