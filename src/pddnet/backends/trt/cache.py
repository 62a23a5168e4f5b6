"""TensorRT engine cache: keys, metadata files and the stale/foreign decisions. Pure Python.

A serialized TensorRT engine runs only on the GPU model and TensorRT version it was built
with (NVIDIA: engines are not portable across platforms or TensorRT versions; a
hardware-compatible engine, ``HardwareCompatibilityLevel.AMPERE_PLUS``, relaxes the GPU but not
the TensorRT version). So every engine is stored with a metadata file, and looked up by a key of

    model SHA-256 (the exact ONNX bytes parsed, before the plugin rewrite),
    GPU name, compute capability, SM count, TensorRT version,
    precision (fp32 | fp16 | int8: the graph's own, strongly typed),
    plugin binding (e.g. ``aot:Correlation,DeformableSample3D,MinConv`` or ``native``),
    hardware compatibility level (``none`` unless asked for).

Files: ``<dir>/<label>-<precision>-<digest16>.engine`` and the same name ``.json``. An engine is
**never run** unless its metadata matches the key for this machine and model, and the engine
file's SHA-256 equals the one recorded at build time:

- ``stale``: built from another model, precision or plugin binding (the model changed);
- ``foreign``: built for another GPU or TensorRT version (copied from elsewhere, or the
  driver/TensorRT was upgraded);
- ``corrupt``: metadata missing or unreadable, wrong format version, engine file missing or its
  hash differs (truncated copy, edited file).

The caller decides: the runtime rebuilds into the cache (``build="auto"``), or refuses
(``build="never"`` / an explicit engine file) with the reasons. Nothing here imports tensorrt.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

from pddnet._files import atomic_write, sha256_bytes, sha256_file
from pddnet.errors import PddnetError

ENGINE_FORMAT = 1
ENGINE_SUFFIX = ".engine"
META_SUFFIX = ".json"
#: Fields that tie an engine to a machine (a mismatch is "foreign").
ENV_FIELDS = ("gpu_name", "compute_capability", "sm_count", "trt_version")
#: Fields that tie an engine to a model build (a mismatch is "stale").
BUILD_FIELDS = ("model_sha256", "precision", "plugins", "hardware_compat")
PRECISIONS = ("fp32", "fp16", "int8")


def default_cache_dir() -> Path:
    """``$PDDNET_ENGINE_CACHE``, else ``$XDG_CACHE_HOME/pddnet/engines`` (``~/.cache/...``)."""
    env = os.environ.get("PDDNET_ENGINE_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pddnet" / "engines"


@dataclass(frozen=True)
class Environment:
    """The GPU and TensorRT an engine is built for / run on."""

    gpu_name: str
    compute_capability: str   # "9.0"
    sm_count: int
    trt_version: str          # tensorrt.__version__, e.g. "10.9.0.34"

    def describe(self) -> str:
        return (f"{self.gpu_name} (compute {self.compute_capability}, {self.sm_count} SMs), "
                f"TensorRT {self.trt_version}")


@dataclass(frozen=True)
class EngineKey:
    model_sha256: str
    precision: str
    plugins: str
    env: Environment
    hardware_compat: str = "none"

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise PddnetError(f"engine precision must be one of {PRECISIONS}, got "
                              f"{self.precision!r}")

    def fields(self) -> dict[str, Any]:
        return {"model_sha256": self.model_sha256, "precision": self.precision,
                "plugins": self.plugins, "hardware_compat": self.hardware_compat,
                **asdict(self.env)}

    def digest(self) -> str:
        canon = json.dumps(self.fields(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canon.encode()).hexdigest()


@dataclass
class Verdict:
    """``status``: ``match`` | ``stale`` | ``foreign`` | ``corrupt`` | ``missing``."""

    status: str
    reasons: list[str] = field(default_factory=list)

    @property
    def usable(self) -> bool:
        return self.status == "match"

    def message(self) -> str:
        return f"{self.status}: " + "; ".join(self.reasons) if self.reasons else self.status


def _env_matches(record: dict, key: EngineKey, reasons: list[str]) -> bool:
    ok = True
    rec_env = record.get("env", {})
    compat = record.get("key", {}).get("hardware_compat", "none")
    for name in ENV_FIELDS:
        want = getattr(key.env, name)
        have = rec_env.get(name)
        if compat != "none" and name in ("gpu_name", "sm_count", "compute_capability"):
            continue  # hardware-compatible engines run on any GPU of the level (checked below)
        if have != want:
            ok = False
            reasons.append(f"built for {name.replace('_', ' ')} {have!r}, this machine has "
                           f"{want!r}")
    if compat == "ampere_plus":
        try:
            major = int(str(key.env.compute_capability).split(".")[0])
        except ValueError:
            major = 0
        if major < 8:
            ok = False
            reasons.append(f"hardware-compatible (Ampere+) engine, this GPU is compute "
                           f"{key.env.compute_capability}")
    return ok


def compare(record: dict | None, key: EngineKey, *, engine_path: str | os.PathLike | None = None,
            check_hash: bool = True) -> Verdict:
    """Decide whether the engine described by ``record`` may run for ``key``.

    Order: ``corrupt`` (no usable metadata, wrong format, missing/altered engine file) before
    ``foreign`` (machine) before ``stale`` (model build): a foreign engine says nothing about
    the model.
    """
    if record is None:
        return Verdict("corrupt", ["no metadata file (an engine is never run without one)"])
    if not isinstance(record, dict) or record.get("format") != ENGINE_FORMAT:
        return Verdict("corrupt", [f"metadata format {record.get('format') if isinstance(record, dict) else None!r}, expected {ENGINE_FORMAT}"])
    if engine_path is not None:
        p = Path(engine_path)
        if not p.is_file():
            return Verdict("corrupt", [f"engine file {p} is missing"])
        if check_hash:
            want = record.get("engine_sha256")
            if not want or sha256_file(p) != want:
                return Verdict("corrupt", [f"engine file {p.name} does not match the SHA-256 "
                                           "recorded when it was built (truncated or altered)"])
    reasons: list[str] = []
    if not _env_matches(record, key, reasons):
        return Verdict("foreign", reasons)
    rec_key = record.get("key", {})
    for name in BUILD_FIELDS:
        want = getattr(key, name)
        have = rec_key.get(name)
        if have != want:
            what = {"model_sha256": "model", "precision": "precision", "plugins":
                    "plugin binding", "hardware_compat": "hardware compatibility"}[name]
            if name == "model_sha256":
                reasons.append(f"built from another model (sha256 {str(have)[:12]}..., this "
                               f"one is {want[:12]}...)")
            else:
                reasons.append(f"built with {what} {have!r}, wanted {want!r}")
    if reasons:
        return Verdict("stale", reasons)
    return Verdict("match")


def read_record(meta_path: str | os.PathLike) -> dict | None:
    """The metadata of an engine, or ``None`` if it is missing or not valid JSON."""
    p = Path(meta_path)
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def meta_path_for(engine_path: str | os.PathLike) -> Path:
    p = Path(engine_path)
    return p.with_name(p.name[:-len(ENGINE_SUFFIX)] + META_SUFFIX) \
        if p.name.endswith(ENGINE_SUFFIX) else p.with_name(p.name + META_SUFFIX)


@dataclass
class Lookup:
    verdict: Verdict
    engine_path: Path
    meta_path: Path
    record: dict | None
    others: list[tuple[Path, Verdict]] = field(default_factory=list)  # same label, other keys

    def explain(self) -> str:
        lines = [f"{self.engine_path.name}: {self.verdict.message()}"]
        for p, v in self.others:
            lines.append(f"  ignored {p.name}: {v.message()}")
        return "\n".join(lines)


class EngineCache:
    """A folder of engines and their metadata files (see the module docstring)."""

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root) if root is not None else default_cache_dir()

    def paths(self, key: EngineKey, label: str) -> tuple[Path, Path]:
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in label) or "model"
        stem = f"{safe}-{key.precision}-{key.digest()[:16]}"
        return self.root / f"{stem}{ENGINE_SUFFIX}", self.root / f"{stem}{META_SUFFIX}"

    def records(self) -> Iterator[tuple[Path, dict | None]]:
        if not self.root.is_dir():
            return
        for meta in sorted(self.root.glob(f"*{META_SUFFIX}")):
            yield meta, read_record(meta)

    def lookup(self, key: EngineKey, label: str) -> Lookup:
        """Find the engine for ``key``; ``verdict.status`` is ``missing`` when there is none.

        ``others`` lists the cache's other engines for the same label (and why they do not
        apply), so a rebuild or refusal can say what it found.
        """
        engine, meta = self.paths(key, label)
        others = []
        for m, rec in self.records():
            if m == meta or not isinstance(rec, dict) or rec.get("label") != label:
                continue
            e = Path(str(m)[:-len(META_SUFFIX)] + ENGINE_SUFFIX)
            others.append((e, compare(rec, key, check_hash=False)))
        if not engine.exists() and not meta.exists():
            return Lookup(Verdict("missing", ["no engine for this model, precision, GPU and "
                                              "TensorRT version in " + str(self.root)]),
                          engine, meta, None, others)
        record = read_record(meta)
        return Lookup(compare(record, key, engine_path=engine), engine, meta, record, others)

    def store(self, key: EngineKey, label: str, engine: bytes, *,
              extra: dict[str, Any] | None = None) -> tuple[Path, Path]:
        """Write ``engine`` and its metadata atomically (metadata last); returns both paths."""
        engine_path, meta_path = self.paths(key, label)
        record = make_record(key, label, engine, extra=extra)
        with atomic_write(engine_path) as tmp:
            tmp.write_bytes(engine)
        with atomic_write(meta_path) as tmp:
            tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        return engine_path, meta_path


def make_record(key: EngineKey, label: str, engine: bytes, *,
                extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The metadata file's content for ``engine`` built under ``key``."""
    from pddnet import __version__

    f = key.fields()
    return {
        "format": ENGINE_FORMAT,
        "label": label,
        "key": {k: f[k] for k in BUILD_FIELDS},
        "env": {k: f[k] for k in ENV_FIELDS},
        "digest": key.digest(),
        "engine_sha256": sha256_bytes(engine),
        "engine_bytes": len(engine),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "pddnet_version": __version__,
        **(extra or {}),
    }


def check_engine_file(engine_path: str | os.PathLike, key: EngineKey) -> dict:
    """Verify an explicitly given engine file against ``key``; return its metadata or raise.

    Raises :class:`PddnetError` for anything but a match, naming what differs and how to
    rebuild (``pddnet build``).
    """
    p = Path(engine_path)
    meta = meta_path_for(p)
    record = read_record(meta)
    verdict = compare(record, key, engine_path=p)
    if not verdict.usable:
        raise PddnetError(
            f"refusing to run TensorRT engine {p}: {verdict.message()}. Engines are tied to one "
            f"GPU model and TensorRT version and to the exact model they were built from; "
            f"rebuild it here with `pddnet build --onnx MODEL.onnx --out DIR` (this machine: "
            f"{key.env.describe()})")
    return record


__all__ = ["EngineCache", "EngineKey", "Environment", "Verdict", "Lookup", "compare",
           "check_engine_file", "make_record", "read_record", "meta_path_for",
           "default_cache_dir", "PRECISIONS"]
