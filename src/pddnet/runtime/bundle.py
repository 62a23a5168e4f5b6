"""Deployment bundles: verify one before anything in it is loaded, then pick what to run.

A bundle is a folder (or a ``.tar.gz`` of one) written by ``pddnet package``
(:mod:`pddnet.deploy.package`; layout and schema in ``docs/bundle.md``)::

    manifest.json            schema pddnet.bundle/1: versions, models, SHA-256 of every file
    preprocessing.json       the input contract (grid, spacing, intensity window, orientation)
    models/<precision>/      model.onnx per precision (+ its stage-two model when it has one)
    engines/                 TensorRT engines + their metadata .json (pddnet build's layout)
    validation/              the report.json (and report.md/html) each model passed

:func:`open_bundle` verifies, in this order and before any model is parsed: the manifest
(strict JSON, schema, every listed path relative and inside the bundle, no symbolic links),
every listed file (exists, regular file, byte size, SHA-256), that every file in the bundle
is listed, and that every model and engine the manifest names is a listed file. Any failure is
a :class:`~pddnet.errors.PddnetError` naming the file and what is wrong; nothing is loaded.
The manifest's schema (:func:`check_manifest`: the type of every field the runtime reads, paths,
nesting depth, numbers) is checked before any of its fields is used.

A ``.tar.gz`` is checked member by member BEFORE anything is extracted (:func:`open_bundle`):
its headers are read in one pass over the archive and ``manifest.json`` (at most
:data:`MAX_MANIFEST_BYTES`) is read into memory from it; every other member must be a regular
file or a folder (no links, devices, fifos, sparse files), stay inside the bundle folder, be
listed in the manifest (a folder: lie on the way to a listed file) with exactly the manifest's
byte size, appear once, and all members together must stay within a size budget
(:data:`DEFAULT_MAX_BUNDLE_BYTES`, ``open_bundle(max_bytes=...)``). Only then is the archive
unpacked into a private temporary folder (Python's ``data`` filter as a second guard) and
verified there like a folder; the folder is removed on every failure (Ctrl-C included) and
when the bundle is closed.

:meth:`Bundle.select` then picks the backend and precision to run on this machine (or checks
the one asked for) and says which and why (:class:`Selection`):

1. TensorRT, when ``tensorrt`` and a CUDA device are usable here and the bundle holds engines
   built for this GPU model and TensorRT version (the identity check of
   :mod:`pddnet.backends.trt.cache`) whose validation passed: the lowest such precision
   (int8, then fp16, then fp32);
2. ONNX Runtime with the CUDA execution provider, when onnxruntime-gpu sees a device: the
   validated ONNX model of the lowest precision among fp16, fp32, int8 (in that order);
3. ONNX Runtime on the CPU: the validated ONNX model with the lowest p50 latency in the
   bundle's validation (which ran on a CPU with ONNX Runtime), else fp32.

Only models whose validation gates passed are picked automatically. A model packaged with
``--allow-unvalidated`` (or whose gates failed) runs only when asked for by precision, with a
warning in the selection's notes. Torch-free.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import tarfile
import tempfile
import weakref
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Callable

from pddnet._files import read_json, sha256_file
from pddnet.errors import PddnetError
from pddnet.spec.config import is_int, show

SCHEMA = "pddnet.bundle/1"
MANIFEST = "manifest.json"
PREPROCESSING = "preprocessing.json"
TAR_SUFFIXES = (".tar.gz", ".tgz", ".tar")
PRECISION_ORDER_GPU = ("int8", "fp16", "fp32")     # TensorRT: lowest validated precision first
PRECISION_ORDER_CUDA = ("fp16", "fp32", "int8")    # ONNX Runtime CUDA EP
BACKEND_ALIASES = {"auto": "auto", "onnxruntime": "onnxruntime", "ort": "onnxruntime",
                   "tensorrt": "tensorrt", "trt": "tensorrt"}
PRECISIONS = ("fp32", "fp16", "int8")
MODEL_KINDS = ("onnx", "tensorrt")

#: Default size budget of an unpacked ``.tar.gz`` bundle (the sum of its members' sizes):
#: 4 GiB. A bundle holds graphs of a few MB (the paper's network has 120k weights) and TensorRT
#: engines of tens to hundreds of MB, so this leaves room for every precision and several
#: engine sets, while a compressed archive that claims more (a decompression bomb: 7.7 MB of
#: gzip can hold a 4 GB member) is refused before a byte is written. ``open_bundle(max_bytes=)``
#: changes it.
DEFAULT_MAX_BUNDLE_BYTES = 4 * 1024 ** 3
#: Largest ``manifest.json`` read (1 MiB; a real one is ~10 KB per model), from a folder or an
#: archive: it is parsed in memory before anything else.
MAX_MANIFEST_BYTES = 1024 ** 2
#: Most members an archive may have (a bundle holds a few dozen files); headers are checked in
#: memory before anything is extracted.
MAX_ARCHIVE_MEMBERS = 100_000
#: Largest GNU long-name / PAX extended header of an archive member (tarfile reads them into
#: memory while listing the members).
MAX_EXTENDED_HEADER_BYTES = 1024 ** 2
#: Deepest nesting of the manifest's JSON (a real one nests 6 levels); deeper is refused, so no
#: reader of the manifest can run out of recursion.
MAX_MANIFEST_DEPTH = 32
#: Longest path the manifest may list.
MAX_PATH_CHARS = 1024
_MODEL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_PLAIN_KEY = re.compile(r"[A-Za-z0-9_.+-]{1,40}")


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def is_bundle(path: str | os.PathLike) -> bool:
    """True for a folder (every folder is treated as a bundle, so a folder without a manifest
    is refused with a clear message) or a file named ``*.tar.gz`` / ``*.tgz`` / ``*.tar``."""
    p = Path(path)
    if p.is_dir():
        return True
    return p.name.lower().endswith(TAR_SUFFIXES)


def check_relative(rel: Any, *, where: str) -> PurePosixPath:
    """A manifest path must be a relative POSIX path without ``..``, ``.`` or empty parts."""
    if not isinstance(rel, str) or not rel:
        raise PddnetError(f"{where}: the manifest lists a path {show(rel)} that is not a "
                          "non-empty string; the manifest is damaged -- re-create the bundle "
                          "with `pddnet package`")
    if len(rel) > MAX_PATH_CHARS or any(ord(c) < 32 or ord(c) == 127 for c in rel):
        raise PddnetError(f"{where}: the manifest lists {_q(rel)}, a path with control "
                          f"characters or longer than {MAX_PATH_CHARS} characters; the "
                          "manifest is damaged -- refusing the bundle")
    p = PurePosixPath(rel)
    if "\\" in rel or rel.startswith("/") or p.is_absolute() or (len(rel) > 1 and rel[1] == ":"):
        raise PddnetError(f"{where}: the manifest lists {rel!r}, an absolute path outside the "
                          "bundle; refusing the bundle (every path must be relative to the "
                          "bundle folder)")
    if any(part in ("..", ".", "") for part in rel.split("/")):
        raise PddnetError(f"{where}: the manifest lists {rel!r}, which leaves the bundle folder "
                          "(or is not normalised); refusing the bundle (every path must stay "
                          "inside it)")
    return p


def _q(text: str, limit: int = 120) -> str:
    """``repr(text)``, abridged past ``limit`` characters (messages stay one short line)."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + "..."


def _inside(root: Path, rel: PurePosixPath, *, where: str) -> Path:
    """``root / rel``, refusing symbolic links anywhere below ``root`` and escapes."""
    path = root
    for part in rel.parts:
        path = path / part
        if path.is_symlink():
            raise PddnetError(f"{where}: {rel} is (or lies under) a symbolic link ({path.name}); "
                              "a bundle holds regular files only -- refusing it")
    real_root = root.resolve()
    if not path.resolve().is_relative_to(real_root):
        raise PddnetError(f"{where}: {rel} resolves outside the bundle; refusing it")
    return path


# --------------------------------------------------------------------------------------------
# the selection
# --------------------------------------------------------------------------------------------
@dataclass
class Option:
    """One way to run the bundle, and whether it can run here."""

    model_id: str
    backend: str
    precision: str
    usable: bool
    why: str
    validated: bool = False
    p50_ms: float | None = None
    validation: str = "not validated"

    def label(self) -> str:
        return f"{self.backend} {self.precision} ({self.model_id})"


@dataclass
class Selection:
    """What :meth:`Bundle.select` chose: the ONNX file to load (inside the verified bundle),
    the backend, its options, and the reason. ``considered`` lists every option with why it
    was or was not usable; ``notes`` warnings (e.g. an unvalidated model run on request)."""

    model_id: str
    model: Path
    sha256: str
    backend: str
    precision: str
    backend_options: dict[str, Any]
    reason: str
    validation: dict[str, Any] | None
    considered: list[Option] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    stage2: Path | None = None

    def describe(self) -> str:
        lines = [f"selected: {self.backend} {self.precision} -- {self.reason}"]
        for o in self.considered:
            if o.model_id == self.model_id and o.backend == self.backend:
                continue
            lines.append(f"  {'usable' if o.usable else 'not usable'}: {o.label()}: {o.why}; "
                         f"{o.validation}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        return {"model_id": self.model_id, "model": str(self.model), "sha256": self.sha256,
                "backend": self.backend, "precision": self.precision, "reason": self.reason,
                "validation": self.validation, "notes": list(self.notes),
                "considered": [{"model_id": o.model_id, "backend": o.backend,
                                "precision": o.precision, "usable": o.usable, "why": o.why,
                                "validation": o.validation}
                               for o in self.considered]}


# --------------------------------------------------------------------------------------------
# the bundle
# --------------------------------------------------------------------------------------------
class Bundle:
    """A verified bundle (use :func:`open_bundle`). ``root`` is the folder that was verified
    (for a ``.tar.gz``, the private unpacked copy, removed by :meth:`close`)."""

    def __init__(self, root: Path, manifest: dict[str, Any], source: Path,
                 tmpdir: Path | None = None):
        self.root = root
        self.manifest = manifest
        self.source = source
        self._tmpdir = tmpdir
        self._finalizer = (weakref.finalize(self, shutil.rmtree, str(tmpdir), True)
                           if tmpdir is not None else None)

    # -- lifecycle --------------------------------------------------------------------------
    def close(self) -> None:
        if self._finalizer is not None:
            self._finalizer()

    def __enter__(self) -> "Bundle":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- content ----------------------------------------------------------------------------
    @property
    def models(self) -> list[dict[str, Any]]:
        return list(self.manifest.get("models", []))

    def path(self, rel: str) -> Path:
        return self.root / rel

    def model(self, model_id: str) -> dict[str, Any]:
        for m in self.models:
            if m.get("id") == model_id:
                return m
        raise PddnetError(f"bundle {self.source}: no model {model_id!r} (has "
                          f"{[m.get('id') for m in self.models]})")

    def summary(self) -> str:
        """A few lines: what the bundle holds and how each model was validated."""
        m = self.manifest
        lines = [f"bundle {self.source}: {m.get('name')} (created {m.get('created')}, pddnet "
                 f"{_obj(m.get('versions')).get('pddnet')}); {len(_obj(m.get('files')))} files "
                 "verified (SHA-256)"]
        pre = _obj(m.get("preprocessing"))
        lines.append(f"  input: {pre.get('image_shape')} voxels @ {pre.get('spacing_mm')} mm, "
                     f"{pre.get('orientation')}, intensity {pre.get('intensity')}")
        for mod in self.models:
            v = _obj(mod.get("validation"))
            if not v:
                val = "not validated"
            else:
                best = _best_candidate(v)
                val = ("validation PASSED" if v.get("passed") else "validation FAILED")
                if best:
                    dd = _fmt(best.get('delta_dice_points_max_abs'), '.3f')
                    val += (f" ({best.get('name')}: dDice {dd} "
                            f"pt, max|du| {_fmt(best.get('disp_diff_max_vox'), '.2e')} vox, p50 "
                            f"{_fmt(_obj(best.get('latency')).get('p50_ms'), '.0f')} ms)")
            what = mod.get("file") if mod.get("kind") == "onnx" else \
                ", ".join(sorted(str(e) for e in _obj(mod.get("engines")).values()))
            extra = ""
            if mod.get("kind") == "tensorrt":
                env = _obj(mod.get("env"))
                extra = f" for {env.get('gpu_name')} / TensorRT {env.get('trt_version')}"
            lines.append(f"  {mod.get('id')}: {mod.get('kind')} {mod.get('precision')}{extra}: "
                         f"{what}; {val}")
        return "\n".join(lines)

    # -- selection --------------------------------------------------------------------------
    def options(self, *, providers: list[str] | None = None,
                env: Any = "probe") -> list[Option]:
        """Every (model, backend) pair with whether it can run here and why."""
        import onnxruntime as ort

        opts: list[Option] = []
        avail = ort.get_available_providers()
        cuda = "CUDAExecutionProvider" in avail
        for m in self.models:
            validated = bool((m.get("validation") or {}).get("passed"))
            vtext = "validated" if validated else (
                "validation FAILED" if m.get("validation") else "not validated")
            if m.get("kind") == "onnx":
                p50 = _cpu_p50(m)
                where = "CUDA" if (cuda and providers is None) or _wants_cuda(providers) else "CPU"
                opts.append(Option(m["id"], "onnxruntime", m["precision"], True,
                                   f"ONNX Runtime {ort.__version__} ({where})",
                                   validated, p50, vtext))
            elif m.get("kind") == "tensorrt":
                usable, why = self._engine_usable(m, env)
                opts.append(Option(m["id"], "tensorrt", m["precision"], usable, why,
                                   validated, None, vtext))
        return opts

    def _engine_usable(self, m: dict[str, Any], env: Any) -> tuple[bool, str]:
        from pddnet.backends.trt import cache as ec

        if env == "probe":
            env, problem = trt_environment()
        else:
            problem = None if env is not None else "no TensorRT environment given"
        built = _obj(m.get("env"))
        built_desc = (f"built for {built.get('gpu_name')} (compute "
                      f"{built.get('compute_capability')}, {built.get('sm_count')} SMs), "
                      f"TensorRT {built.get('trt_version')}")
        if env is None:
            return False, f"TensorRT is not usable here ({problem}); engines {built_desc}"
        for part, rel in sorted((m.get("engines") or {}).items()):
            record = ec.read_record(self.path(_meta_rel(rel)))
            if record is not None and (not isinstance(record, dict)
                                       or not isinstance(record.get("key", {}), dict)):
                return False, (f"engine {rel}: its metadata is damaged (not a JSON object with "
                               "a key object)")
            key_fields = (record or {}).get("key", {})
            try:
                key = ec.EngineKey(key_fields.get("model_sha256", ""),
                                   key_fields.get("precision", m.get("precision", "fp32")),
                                   key_fields.get("plugins", ""), env,
                                   key_fields.get("hardware_compat", "none"))
                verdict = ec.compare(record, key, engine_path=self.path(rel), check_hash=False)
            except PddnetError as exc:
                return False, f"engine {rel}: {exc}"
            except (TypeError, ValueError, AttributeError, KeyError) as exc:
                return False, (f"engine {rel}: its metadata is damaged "
                               f"({type(exc).__name__})")
            if not verdict.usable:
                return False, (f"engine {rel} ({part}) is {verdict.message()} -- engines run "
                               f"only on the GPU model and TensorRT version they were built for "
                               f"(this machine: {env.describe()})")
        return True, f"TensorRT engines {built_desc}, match this machine"

    def select(self, backend: str = "auto", precision: str | None = None, *,
               providers: list[str] | str | None = None, env: Any = "probe") -> Selection:
        """Pick what to run (module docstring), or check the ``backend``/``precision`` asked
        for. Raises :class:`PddnetError` when nothing asked for can run here (or when the
        manifest does not pass :func:`check_manifest`)."""
        check_manifest(self.manifest, where=f"bundle {self.source}")
        want = BACKEND_ALIASES.get(str(backend).lower())
        if want is None:
            raise PddnetError(f"bundle {self.source}: backend {backend!r} cannot run a bundle; use "
                              "auto, onnxruntime or tensorrt (a bundle holds no PyTorch "
                              "checkpoint)")
        if precision is not None and precision not in ("fp32", "fp16", "int8"):
            raise PddnetError(f"precision must be fp32, fp16 or int8, got {precision!r}")
        if isinstance(providers, str):
            providers = [p for p in providers.split(",") if p.strip()]
        opts = self.options(providers=providers, env=env)
        have = sorted({(o.backend, o.precision) for o in opts})
        pool = [o for o in opts if (want == "auto" or o.backend == want)
                and (precision is None or o.precision == precision)]
        if not pool:
            raise PddnetError(
                f"bundle {self.source} holds no "
                f"{' '.join(w for w in (None if want == 'auto' else want, precision) if w)} "
                f"model; it has {', '.join(f'{b} {p}' for b, p in have)}")
        usable = [o for o in pool if o.usable]
        if not usable:
            reasons = "; ".join(f"{o.label()}: {o.why}" for o in pool)
            what = pool[0].backend + (f" {precision}" if precision else "")
            raise PddnetError(f"bundle {self.source}: refusing to run {what}: {reasons}")
        notes: list[str] = []
        explicit = precision is not None
        chosen, reason = self._choose(usable, want, explicit, providers)
        if explicit:
            reason = f"{precision} as asked for; {chosen.why} ({chosen.validation})"
        if not chosen.validated:
            notes.append(f"{chosen.model_id} ({chosen.precision}) did not pass validation "
                         f"({chosen.validation}); running it because it was asked for")
        return self._selection(chosen, reason, opts, notes, providers)

    def _choose(self, usable: list[Option], want: str, explicit: bool,
                providers: list[str] | None) -> tuple[Option, str]:
        ok = [o for o in usable if o.validated]
        if not ok:
            if not explicit:
                raise PddnetError(
                    f"bundle {self.source}: no usable model passed validation here ("
                    + "; ".join(f"{o.label()}: {o.validation}" for o in usable)
                    + "); ask for one "
                    "explicitly with --precision (precision=) to run it anyway")
            ok = usable
        trt = [o for o in ok if o.backend == "tensorrt"]
        if trt and want in ("auto", "tensorrt"):
            o = _first_by(trt, PRECISION_ORDER_GPU)
            return o, (f"{o.why}; the lowest validated precision among "
                       f"{sorted({t.precision for t in trt})}")
        ort = [o for o in ok if o.backend == "onnxruntime"]
        if not ort:
            o = ok[0]
            return o, o.why
        import onnxruntime

        gpu = (providers is None and "CUDAExecutionProvider" in
               onnxruntime.get_available_providers()) or _wants_cuda(providers)
        if gpu:
            o = _first_by(ort, PRECISION_ORDER_CUDA)
            return o, (f"ONNX Runtime with CUDA; no usable TensorRT engine; {o.precision} is "
                       f"the preferred validated precision on a GPU")
        timed = [o for o in ort if o.p50_ms is not None]
        if len(ort) == 1:
            o = ort[0]
            return o, (f"ONNX Runtime on the CPU; the only {'validated ' if o.validated else ''}"
                       f"ONNX model that can run here")
        if timed:
            o = min(timed, key=lambda t: t.p50_ms)
            others = ", ".join(f"{t.precision} {t.p50_ms:.0f} ms" for t in timed if t is not o)
            return o, (f"ONNX Runtime on the CPU; the fastest validated model in the bundle's "
                       f"validation (p50 {o.p50_ms:.0f} ms; {others})")
        o = _first_by(ort, ("fp32", "int8", "fp16"))
        return o, "ONNX Runtime on the CPU; no latency recorded, so fp32"

    def _selection(self, o: Option, reason: str, opts: list[Option], notes: list[str],
                   providers: list[str] | None) -> Selection:
        m = self.model(o.model_id)
        if o.backend == "tensorrt":
            onnx_m = self.model(m["model"])
            record = read_json(self.path(_meta_rel(next(iter(m["engines"].values())))))
            plugins = str((record or {}).get("key", {}).get("plugins", "auto"))
            mode = plugins if plugins in ("native", "none") else "auto"
            options = {"engine_cache": str(self.path("engines")), "build": "never",
                       "plugins": mode,
                       "hardware_compat": (record or {}).get("key", {}).get(
                           "hardware_compat", "none")}
        else:
            onnx_m = m
            options = {}
            if providers is not None:
                options["providers"] = list(providers)
            else:
                import onnxruntime

                if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
                    options["providers"] = ["cuda"]
        stage2 = self.path(onnx_m["stage2"]) if onnx_m.get("stage2") else None
        return Selection(
            model_id=o.model_id, model=self.path(onnx_m["file"]),
            sha256=self.manifest["files"][onnx_m["file"]]["sha256"], backend=o.backend,
            precision=o.precision, backend_options=options, reason=reason,
            validation=m.get("validation"), considered=opts, notes=notes, stage2=stage2)


def _first_by(opts: list[Option], order: tuple[str, ...]) -> Option:
    rank = {p: i for i, p in enumerate(order)}
    return min(opts, key=lambda o: rank.get(o.precision, len(order)))


def _wants_cuda(providers: list[str] | None) -> bool:
    return bool(providers) and any(p.lower() in ("cuda", "cudaexecutionprovider", "tensorrt",
                                                 "tensorrtexecutionprovider")
                                   for p in providers)


def _cpu_p50(m: dict[str, Any]) -> float | None:
    """The p50 of the model's ONNX Runtime CPU candidate in its validation, if any."""
    v = _obj(m.get("validation"))
    for c in v.get("candidates") or []:
        if not isinstance(c, dict):
            continue
        if c.get("backend") == "onnxruntime" and c.get("passed") and \
                c.get("device", "cpu") == "cpu" and not c.get("emulated") and \
                c.get("mode", "ff") == "ff":
            p50 = _obj(c.get("latency")).get("p50_ms")
            if _number(p50):
                return float(p50)
    return None


def _best_candidate(v: dict[str, Any]) -> dict[str, Any] | None:
    cands = v.get("candidates") or []
    return cands[0] if isinstance(cands, list) and cands and isinstance(cands[0], dict) else None


def _obj(v: Any) -> dict[str, Any]:
    """``v`` when it is a dict, else ``{}`` (for the lenient summary)."""
    return v if isinstance(v, dict) else {}


def _number(v: Any) -> bool:
    """A finite int or float (not a bool) that converts to float."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    try:
        return math.isfinite(float(v))
    except OverflowError:
        return False


def _fmt(v: Any, spec: str) -> str:
    return format(v, spec) if _number(v) else "-"


def _meta_rel(engine_rel: str) -> str:
    from pddnet.backends.trt.cache import meta_path_for

    return str(PurePosixPath(meta_path_for(PurePosixPath(engine_rel)).as_posix()))


def trt_environment(device: int = 0) -> tuple[Any, str | None]:
    """``(Environment, None)`` when tensorrt and a CUDA device are usable, else
    ``(None, why not)``. Never raises; never imports tensorrt unless it is installed."""
    from pddnet._optional import available

    if not available("tensorrt"):
        return None, "the tensorrt package is not installed (pip install 'pddnet[gpu]')"
    try:
        from pddnet.backends.trt.build import current_environment

        return current_environment(device), None
    except Exception as exc:  # PddnetError (no cuda-python / no device) or a driver error
        return None, str(exc).split("\n")[0]


# --------------------------------------------------------------------------------------------
# opening and verifying
# --------------------------------------------------------------------------------------------
def open_bundle(path: str | os.PathLike, *, echo: Callable[[str], None] | None = None,
                max_bytes: int = DEFAULT_MAX_BUNDLE_BYTES) -> Bundle:
    """Verify the bundle at ``path`` (folder or ``.tar.gz``) and return it (module docstring).

    Nothing in the bundle is parsed as a model before every check has passed. For an archive,
    every member is checked against the manifest read from it before anything is extracted;
    ``max_bytes`` is the size budget of its members together (default
    :data:`DEFAULT_MAX_BUNDLE_BYTES`). The private temporary folder it is unpacked into is
    removed on any failure (Ctrl-C included) and when the bundle is closed."""
    src = Path(path)
    if not src.exists():
        raise PddnetError(f"{src}: no such bundle (a folder or .tar.gz written by `pddnet "
                          "package`)")
    if src.is_dir():
        manifest = verify_folder(src)
        return Bundle(src, manifest, src)
    if not src.name.lower().endswith(TAR_SUFFIXES):
        raise PddnetError(f"{src} is neither a bundle folder nor a .tar.gz bundle")
    if not is_int(max_bytes) or max_bytes <= 0:
        raise PddnetError(f"max_bytes must be a positive number of bytes, got {show(max_bytes)}")
    tmp: Path | None = None
    try:
        with _reading(src):
            with tarfile.open(src, "r:*", tarinfo=_CheckedTarInfo) as tar:
                prefix, members = check_archive(tar, src, max_bytes=max_bytes)
                remove_stale_unpacked()
                try:
                    tmp = Path(tempfile.mkdtemp(prefix=f"{UNPACK_PREFIX}{os.getpid()}-"))
                except OSError as exc:
                    raise PddnetError(f"{src}: cannot create a temporary folder to unpack it "
                                      f"into ({exc}); set TMPDIR to a writable folder") from None
                _unpack(tar, members, tmp, src)
        root = tmp.joinpath(*prefix)
        manifest = verify_folder(root, where=str(src))
        bundle = Bundle(root, manifest, src, tmpdir=tmp)
        if echo:
            echo(f"bundle {src}: unpacked into {root} and verified")
        return bundle
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


#: temporary folders of unpacked archives: ``pddnet-bundle-<pid>-<random>``
UNPACK_PREFIX = "pddnet-bundle-"


def remove_stale_unpacked(tmpdir: str | os.PathLike | None = None) -> list[Path]:
    """Remove the unpack folders of processes that no longer exist (a ``kill -9`` during
    ``register`` from a ``.tar.gz`` leaves one); returns what was removed. A folder whose PID is
    alive, or that is not ours by name, is never touched."""
    removed = []
    for d in Path(tmpdir or tempfile.gettempdir()).glob(f"{UNPACK_PREFIX}*-*"):
        pid = d.name[len(UNPACK_PREFIX):].split("-", 1)[0]
        if not pid.isdigit() or not d.is_dir() or d.is_symlink():
            continue
        try:
            os.kill(int(pid), 0)
            continue  # alive (or another user's: not ours to judge)
        except ProcessLookupError:
            pass
        except OSError:
            continue
        shutil.rmtree(d, ignore_errors=True)
        removed.append(d)
    return removed


@contextlib.contextmanager
def _reading(src: Path):
    """Turn the errors of a damaged archive (tarfile, gzip, zlib, I/O) into one line."""
    try:
        yield
    except PddnetError:
        raise
    except (tarfile.TarError, EOFError, OSError, zlib.error, ValueError,
            RecursionError) as exc:
        text = " ".join(str(exc).split())[:200]
        raise PddnetError(f"{src}: not a readable bundle archive ({type(exc).__name__}: "
                          f"{text}); it is truncated or not a .tar.gz written by `pddnet "
                          "package --tar`") from None


class _CheckedTarInfo(tarfile.TarInfo):
    """Refuses a GNU long-name or PAX extended header larger than
    :data:`MAX_EXTENDED_HEADER_BYTES` before ``tarfile`` reads it into memory."""

    def _check_size(self) -> None:
        if self.size > MAX_EXTENDED_HEADER_BYTES or self.size < 0:
            raise tarfile.ReadError(f"an extended header claims {self.size} bytes (at most "
                                    f"{MAX_EXTENDED_HEADER_BYTES})")

    def _proc_gnulong(self, tf):   # tarfile's hooks for those headers
        self._check_size()
        return super()._proc_gnulong(tf)

    def _proc_pax(self, tf):
        self._check_size()
        return super()._proc_pax(tf)


def _member_kind(mem: tarfile.TarInfo) -> str:
    if mem.issym():
        return f"a symbolic link to {_q(mem.linkname, 60)}"
    if mem.islnk():
        return f"a hard link to {_q(mem.linkname, 60)}"
    if mem.ischr() or mem.isblk():
        return "a device"
    if mem.isfifo():
        return "a fifo"
    if mem.issparse():
        return "a sparse file"
    return f"of tar type {mem.type!r}"


def _member_parts(mem: tarfile.TarInfo, where: str) -> tuple[str, ...]:
    """The member's normalised path parts; refuses links, special files and escaping names."""
    name = mem.name
    if not (mem.isfile() or mem.isdir()) or mem.issparse():
        raise PddnetError(f"{where}: member {_q(name)} is a link or special file "
                          f"({_member_kind(mem)}); a bundle archive holds regular files and "
                          "folders only -- refusing it before extracting anything")
    if name.startswith("/") or ".." in name.split("/") or (len(name) > 1 and name[1] == ":"):
        raise PddnetError(f"{where}: member {_q(name)} would be written outside the bundle "
                          "folder; refusing the archive before extracting anything")
    parts = PurePosixPath(name).parts
    if mem.isfile() and not parts:
        raise PddnetError(f"{where}: member {_q(name)} is a file without a name; refusing the "
                          "archive")
    if mem.size < 0:
        raise PddnetError(f"{where}: member {_q(name)} has a negative size in its header; the "
                          "archive is damaged -- refusing it")
    return parts


def check_archive(tar: tarfile.TarFile, src: Path, *,
                  max_bytes: int = DEFAULT_MAX_BUNDLE_BYTES
                  ) -> tuple[tuple[str, ...], list[tarfile.TarInfo]]:
    """Check every member of the open archive ``tar`` without extracting anything.

    One pass over the headers (``tar.next()``): each member must be a regular file or folder
    with a name inside the bundle folder, appear once, and all files together stay within
    ``max_bytes``; ``manifest.json`` (at the top or in the single top-level folder, at most
    :data:`MAX_MANIFEST_BYTES`) is read into memory and checked (:func:`parse_manifest`); then
    every other member must be listed in it (a folder: lie on the way to a listed file) with
    exactly its ``bytes``, and every listed file must be present. Returns the bundle folder's
    path parts inside the archive and the members to extract. Raises :class:`PddnetError`
    naming the first member that is wrong."""
    where = str(src)
    seen: dict[str, bool] = {}          # normalised name -> is a folder
    checked: list[tarfile.TarInfo] = []
    pending: list[tuple[tarfile.TarInfo, tuple[str, ...]]] = []
    files_in: set[str] = set()
    manifest: dict[str, Any] | None = None
    manifest_error: PddnetError | None = None
    expected: tuple[dict[str, Any], set[str]] | None = None
    prefix: tuple[str, ...] = ()
    total = count = 0
    while True:
        mem = tar.next()
        if mem is None:
            break
        count += 1
        if count > MAX_ARCHIVE_MEMBERS:
            raise PddnetError(f"{where}: the archive has more than {MAX_ARCHIVE_MEMBERS} "
                              "members; a bundle holds a few dozen files -- refusing it")
        parts = _member_parts(mem, where)
        key = "/".join(parts)
        if key in seen and not (mem.isdir() and seen[key]):
            raise PddnetError(f"{where}: member {_q(mem.name)} appears twice in the archive "
                              "(a later copy would replace the first); refusing it")
        seen[key] = mem.isdir()
        if mem.isfile():
            total += mem.size
            if mem.size > max_bytes:
                raise PddnetError(
                    f"{where}: member {_q(mem.name)} claims {mem.size} bytes, more than the "
                    f"size budget of {max_bytes} bytes for an unpacked bundle (open_bundle "
                    "max_bytes); refusing the archive before extracting anything")
            if total > max_bytes:
                raise PddnetError(
                    f"{where}: with member {_q(mem.name)} ({mem.size} bytes) the archive "
                    f"would unpack to {total} bytes, more than the size budget of {max_bytes} "
                    "bytes (open_bundle max_bytes); refusing it before extracting anything")
        if manifest is None and manifest_error is None and mem.isfile() and \
                parts[-1] == MANIFEST and len(parts) <= 2:
            if mem.size > MAX_MANIFEST_BYTES:
                raise PddnetError(f"{where}: member {_q(mem.name)} is {mem.size} bytes, more "
                                  f"than the {MAX_MANIFEST_BYTES} bytes a {MANIFEST} may have; "
                                  "refusing the archive")
            fh = tar.extractfile(mem)
            data = fh.read(MAX_MANIFEST_BYTES + 1) if fh is not None else b""
            prefix = parts[:-1]
            checked.append(mem)
            try:
                manifest = parse_manifest(data, where=where)
            except PddnetError as exc:   # raised after the remaining members' own checks
                manifest_error = exc
                continue
            files = manifest["files"]
            dirs = {"/".join(PurePosixPath(rel).parts[:i]) for rel in files
                    for i in range(1, len(PurePosixPath(rel).parts))}
            expected = (files, dirs)
            continue
        if expected is not None:
            _check_member(mem, parts, prefix, expected, where)
            checked.append(mem)
            if mem.isfile():
                files_in.add("/".join(parts[len(prefix):]))
        else:
            pending.append((mem, parts))
    if manifest_error is not None:
        raise manifest_error
    if expected is None:
        raise PddnetError(f"{where}: the archive holds no {MANIFEST} (at its top or in its "
                          "single top-level folder); it is not a pddnet bundle")
    for mem, parts in pending:
        _check_member(mem, parts, prefix, expected, where)
        checked.append(mem)
        if mem.isfile():
            files_in.add("/".join(parts[len(prefix):]))
    for rel in expected[0]:
        if rel not in files_in:
            raise PddnetError(f"{where}: {rel} is listed in the manifest but missing; the "
                              "bundle is incomplete (an interrupted copy?) -- copy it again")
    checked.sort(key=lambda mem: mem.offset)   # archive order: one more pass to extract
    return prefix, checked


def _check_member(mem: tarfile.TarInfo, parts: tuple[str, ...], prefix: tuple[str, ...],
                  expected: tuple[dict[str, Any], set[str]], where: str) -> None:
    """One member against the manifest (``expected``: its files and the folders above them)."""
    files, dirs = expected
    name = _q(mem.name)
    if parts[:len(prefix)] != prefix:
        if mem.isdir() and parts == prefix[:len(parts)]:
            return  # a folder above the bundle folder (``.``)
        raise PddnetError(f"{where}: member {name} lies outside the bundle folder "
                          f"{'/'.join(prefix)}/ that holds {MANIFEST}; refusing the archive "
                          "before extracting anything")
    rel = "/".join(parts[len(prefix):])
    if mem.isdir():
        if rel == "" or rel in dirs:
            return
        what = ("a folder, but the manifest lists a file of that name" if rel in files else
                f"a folder that holds no file {MANIFEST} lists")
        raise PddnetError(f"{where}: member {name} is {what}; refusing the archive before "
                          "extracting anything (a bundle holds exactly the files its manifest "
                          "lists)")
    if rel not in files:
        what = ("a file where the manifest has a folder" if rel == "" or rel in dirs else
                f"not listed in {MANIFEST}")
        raise PddnetError(f"{where}: member {name} is {what}; refusing the archive before "
                          "extracting anything (a bundle holds exactly the files its manifest "
                          "lists)")
    want = files[rel]["bytes"]
    if mem.size != want:
        raise PddnetError(f"{where}: member {name} is {mem.size} bytes but {MANIFEST} says "
                          f"{want}; it was modified or belongs to another bundle -- refusing "
                          "the archive before extracting anything")


def _unpack(tar: tarfile.TarFile, members: list[tarfile.TarInfo], dest: Path,
            src: Path) -> None:
    """Extract the checked ``members`` into ``dest`` (``data`` filter as a second guard)."""
    try:
        tar.extractall(dest, members=members, filter="data")
    except tarfile.FilterError as exc:
        raise PddnetError(f"{src}: refusing a member while unpacking ({exc})") from None
    except OSError as exc:
        raise PddnetError(f"{src}: cannot unpack into {dest} ({type(exc).__name__}: {exc}); "
                          "is the temporary folder (TMPDIR) full or read-only?") from None


def zlib_error() -> type:
    return zlib.error


def read_manifest(root: Path, *, where: str | None = None) -> dict[str, Any]:
    """``root/manifest.json``, parsed and schema-checked (:func:`parse_manifest`)."""
    where = where or str(root)
    mpath = root / MANIFEST
    if mpath.is_symlink():
        raise PddnetError(f"{where}: {MANIFEST} is a symbolic link; refusing the bundle")
    if not mpath.is_file():
        raise PddnetError(f"{where}: no {MANIFEST}; this is not a bundle written by `pddnet "
                          "package` (give the bundle folder, its .tar.gz, or a .onnx model)")
    size = mpath.stat().st_size
    if size > MAX_MANIFEST_BYTES:
        raise PddnetError(f"{where}: {MANIFEST} is {size} bytes, more than the "
                          f"{MAX_MANIFEST_BYTES} bytes a manifest may have; refusing the bundle")
    with open(mpath, "rb") as fh:
        data = fh.read(MAX_MANIFEST_BYTES + 1)
    return parse_manifest(data, where=where)


def parse_manifest(data: bytes, *, where: str) -> dict[str, Any]:
    """The bytes of a ``manifest.json`` as a schema-checked dict: strict JSON (UTF-8; no
    ``NaN``/``Infinity``, no number that overflows), at most :data:`MAX_MANIFEST_BYTES`, then
    :func:`check_manifest`."""
    if len(data) > MAX_MANIFEST_BYTES:
        raise PddnetError(f"{where}: {MANIFEST} is more than {MAX_MANIFEST_BYTES} bytes; "
                          "refusing the bundle")
    try:
        manifest = json.loads(data.decode("utf-8"), parse_constant=_no_constant,
                              parse_float=_finite_float)
    except (ValueError, UnicodeDecodeError) as exc:
        text = " ".join(str(exc).split())[:200]
        raise PddnetError(f"{where}: {MANIFEST} is not valid JSON ({text}); it is truncated or "
                          "edited -- re-create the bundle with `pddnet package`") from None
    except RecursionError:
        raise PddnetError(f"{where}: {MANIFEST} nests deeper than JSON can be read (more than "
                          f"{MAX_MANIFEST_DEPTH} levels); the manifest is damaged -- refusing "
                          "the bundle") from None
    return check_manifest(manifest, where=where)


def _no_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:30]} is out of range")
    return value


def check_manifest(manifest: Any, *, where: str) -> dict[str, Any]:
    """The schema of ``manifest.json`` (``pddnet.bundle/1``, ``docs/bundle.md``), checked
    before any field is used; returns ``manifest``.

    - the whole document: at most :data:`MAX_MANIFEST_DEPTH` levels deep, only JSON values,
      every integer within 64 bits, every float finite;
    - ``schema``: ``"pddnet.bundle/1"``; ``versions``, ``preprocessing``: objects when present;
    - ``files``: a non-empty object ``{relative path: {sha256: 64 hex digits, bytes: integer
      >= 0}}``, every path relative, inside the bundle, without control characters, and not
      ``manifest.json`` itself;
    - ``models``: a non-empty list of objects, each with a unique ``id`` (letters, digits,
      ``._+-``), ``kind`` ``onnx`` or ``tensorrt``, ``precision`` fp32/fp16/int8,
      ``validation`` ``null`` or an object (its ``candidates`` a list of objects, their
      ``latency`` an object); ONNX: ``file`` a path, ``stage2`` ``null`` or a path, ``sha256``
      ``null`` or a string; TensorRT: ``engines`` a non-empty object ``{part: path}``, ``model``
      the id of an ONNX entry, ``env`` ``null`` or an object of plain values.

    Any violation is one :class:`PddnetError` naming the field and what it should be.
    """
    if not isinstance(manifest, dict) or manifest.get("schema") != SCHEMA:
        got = manifest.get("schema") if isinstance(manifest, dict) else type(manifest).__name__
        shown = _q(got) if isinstance(got, str) else show(got)
        raise PddnetError(f"{where}: {MANIFEST} has schema {shown}; this pddnet reads {SCHEMA!r}")
    _check_values(manifest, where)

    def bad(field: str, value: Any, expected: str) -> PddnetError:
        return PddnetError(f"{where}: {MANIFEST} field {field} is {show(value)}; it should be "
                           f"{expected} -- the manifest is damaged (re-create the bundle with "
                           "`pddnet package`)")

    for key in ("versions", "preprocessing"):
        if key in manifest and not isinstance(manifest[key], dict):
            raise bad(key, manifest[key], "an object")
    files = manifest.get("files")
    if files is None or files == {}:
        raise PddnetError(f"{where}: {MANIFEST} lists no files; the manifest is damaged")
    if not isinstance(files, dict):
        raise bad("files", files, "an object {relative path: {sha256, bytes}}")
    for rel, entry in files.items():
        check_relative(rel, where=where)
        if rel == MANIFEST:
            raise PddnetError(f"{where}: the manifest lists itself; it is damaged")
        if not isinstance(entry, dict):
            raise bad(f"files[{_q(rel)}]", entry, "an object {sha256, bytes}")
        if not isinstance(entry.get("sha256"), str) or not _SHA256.fullmatch(entry["sha256"]):
            raise bad(f"files[{_q(rel)}].sha256", entry.get("sha256"),
                      "a SHA-256 (64 lowercase hex digits)")
        if not is_int(entry.get("bytes")) or entry["bytes"] < 0:
            raise bad(f"files[{_q(rel)}].bytes", entry.get("bytes"),
                      "the file's size (an integer >= 0)")
    models = manifest.get("models")
    if models is None or models == []:
        raise PddnetError(f"{where}: {MANIFEST} lists no models; the manifest is damaged")
    if not isinstance(models, list):
        raise bad("models", models, "a list of model entries")
    ids: dict[str, str] = {}
    for i, m in enumerate(models):
        f = f"models[{i}]"
        if not isinstance(m, dict):
            raise bad(f, m, "an object {id, kind, precision, ...}")
        mid = m.get("id")
        if not isinstance(mid, str) or not _MODEL_ID.fullmatch(mid):
            raise bad(f"{f}.id", mid, "a model id (letters, digits, '.', '_', '+', '-')")
        if mid in ids:
            raise bad(f"{f}.id", mid, "unique (another entry has this id)")
        kind = m.get("kind")
        if kind not in MODEL_KINDS:
            raise PddnetError(f"{where}: {MANIFEST}: model {mid} has unknown kind {show(kind)}; "
                              f"expected one of {list(MODEL_KINDS)} -- the manifest is damaged")
        ids[mid] = kind
        if m.get("precision") not in PRECISIONS:
            raise bad(f"{f}.precision", m.get("precision"), f"one of {list(PRECISIONS)}")
        val = m.get("validation")
        if val is not None:
            if not isinstance(val, dict):
                raise bad(f"{f}.validation", val, "null or an object")
            cands = val.get("candidates")
            if cands is not None and not isinstance(cands, list):
                raise bad(f"{f}.validation.candidates", cands, "a list of objects")
            for j, c in enumerate(cands or []):
                if not isinstance(c, dict):
                    raise bad(f"{f}.validation.candidates[{j}]", c, "an object")
                if c.get("latency") is not None and not isinstance(c["latency"], dict):
                    raise bad(f"{f}.validation.candidates[{j}].latency", c["latency"],
                              "null or an object")
        if kind == "onnx":
            check_relative(m.get("file"), where=where)
            if m.get("stage2") is not None:
                check_relative(m["stage2"], where=where)
            if m.get("sha256") is not None and not isinstance(m["sha256"], str):
                raise bad(f"{f}.sha256", m["sha256"], "null or a SHA-256 string")
        else:
            engines = m.get("engines")
            if engines is None or engines == {}:
                raise PddnetError(f"{where}: {MANIFEST}: model {mid} lists no engines; the "
                                  "manifest is damaged")
            if not isinstance(engines, dict):
                raise bad(f"{f}.engines", engines, "an object {part: engine path}")
            for part, rel in engines.items():
                if not _MODEL_ID.fullmatch(part):
                    raise bad(f"{f}.engines key", part, "a part name such as 'features'")
                check_relative(rel, where=where)
            if not isinstance(m.get("model"), str):
                raise bad(f"{f}.model", m.get("model"), "the id of an ONNX model entry")
            env = m.get("env")
            if env is not None and not (isinstance(env, dict) and all(
                    isinstance(v, (str, int, float, bool)) or v is None for v in env.values())):
                raise bad(f"{f}.env", env, "null or an object of plain values")
            if env and any(isinstance(v, str) and (len(v) > 200 or not v.isprintable())
                           for v in env.values()):
                raise bad(f"{f}.env", env, "printable values")
    for i, m in enumerate(models):
        if m["kind"] == "tensorrt" and ids.get(m["model"]) != "onnx":
            raise bad(f"models[{i}].model", m["model"],
                      f"the id of an ONNX model entry (one of "
                      f"{[k for k, v in ids.items() if v == 'onnx']})")
        for r in _model_refs(m):
            check_relative(r, where=where)
            if r not in files:
                raise PddnetError(f"{where}: model {m['id']} names {r!r}, which the manifest "
                                  "does not list with a checksum; refusing the bundle")
    return manifest


def _model_refs(m: dict[str, Any]) -> list[str]:
    """The files a (schema-checked) model entry names: its graph and stage-two graph, or its
    engines and their metadata records."""
    if m["kind"] == "onnx":
        return [m["file"]] + ([m["stage2"]] if m.get("stage2") else [])
    engines = m["engines"]
    return list(engines.values()) + [_meta_rel(v) for v in engines.values()]


def _check_values(manifest: dict[str, Any], where: str) -> None:
    """Depth and values of the whole document, without recursion."""
    stack: list[tuple[Any, int, str]] = [(manifest, 0, "")]
    while stack:
        value, depth, at = stack.pop()
        if depth > MAX_MANIFEST_DEPTH:
            raise PddnetError(f"{where}: {MANIFEST} nests deeper than {MAX_MANIFEST_DEPTH} "
                              f"levels (at {at[:80]}); the manifest is damaged -- refusing the "
                              "bundle")
        if isinstance(value, dict):
            for k, v in value.items():
                if not isinstance(k, str):
                    raise PddnetError(f"{where}: {MANIFEST} has a key {show(k)} at "
                                      f"{at[:80] or 'the top'}; JSON keys are strings")
                part = (f".{k}" if at else k) if _PLAIN_KEY.fullmatch(k) else f"[{_q(k, 40)}]"
                stack.append((v, depth + 1, at + part))
        elif isinstance(value, list):
            stack.extend((v, depth + 1, f"{at}[{i}]") for i, v in enumerate(value))
        elif value is None or isinstance(value, (str, bool)):
            continue
        elif isinstance(value, int):
            if abs(value) >= 2 ** 63:
                raise PddnetError(f"{where}: {MANIFEST} field {at[:80]} is {show(value)}; "
                                  "numbers in a manifest fit in 64 bits -- the manifest is "
                                  "damaged")
        elif isinstance(value, float):
            if not math.isfinite(value):
                raise PddnetError(f"{where}: {MANIFEST} field {at[:80]} is {value}; numbers "
                                  "in a manifest are finite -- the manifest is damaged")
        else:
            raise PddnetError(f"{where}: {MANIFEST} field {at[:80]} is {show(value)}, not a "
                              "JSON value")


def verify_folder(root: Path, *, where: str | None = None) -> dict[str, Any]:
    """Every check of :func:`open_bundle` on a folder; returns the manifest."""
    where = where or str(root)
    manifest = read_manifest(root, where=where)   # schema-checked: types, paths, numbers
    files: dict[str, Any] = manifest["files"]
    for rel, entry in files.items():
        relp = PurePosixPath(rel)
        path = _inside(root, relp, where=where)
        if not path.exists():
            raise PddnetError(f"{where}: {rel} is listed in the manifest but missing; the bundle "
                              "is incomplete (an interrupted copy?) -- copy it again")
        if not path.is_file():
            raise PddnetError(f"{where}: {rel} is not a regular file; refusing the bundle")
        size = path.stat().st_size
        if size != entry["bytes"]:
            what = "truncated" if size < entry["bytes"] else "longer than it should be (modified)"
            raise PddnetError(f"{where}: {rel} is {size} bytes but the manifest says "
                              f"{entry['bytes']}: the file is {what} -- refusing the bundle "
                              "(copy it again from the original)")
        digest = sha256_file(path)
        if digest != entry["sha256"]:
            raise PddnetError(f"{where}: {rel} does not match its SHA-256 in the manifest (file "
                              f"{digest[:12]}..., manifest {entry['sha256'][:12]}...); it was "
                              "modified or corrupted -- refusing the bundle")
    listed = set(files) | {MANIFEST}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        base = Path(dirpath)
        for name in filenames + [d for d in dirnames if (base / d).is_symlink()]:
            rel = (base / name).relative_to(root).as_posix()
            if rel not in listed:
                shown = rel if rel.isprintable() and len(rel) <= 200 else _q(rel)
                raise PddnetError(f"{where}: {shown} is in the bundle but not in its manifest; "
                                  "refusing the bundle "
                                  "(a bundle holds exactly the files its manifest lists)")
    for m in manifest["models"]:   # every file they name is listed (check_manifest)
        if m["kind"] == "onnx":
            _check_onnx_entry(root, m, files, where)
    return manifest


def _check_onnx_entry(root: Path, m: dict[str, Any], files: dict[str, Any], where: str) -> None:
    """A model entry's own SHA-256 must be its file's (the one its validation evidence was
    measured on), and its external data must stay inside its folder. Runs after every file's
    checksum has passed; reads the graph's structure only (no external data)."""
    import onnx

    from pddnet.graph.model import check_external_data

    rel = m["file"]
    if m.get("sha256") is not None and m["sha256"] != files[rel]["sha256"]:
        raise PddnetError(f"{where}: model {m['id']} was validated as SHA-256 "
                          f"{str(m['sha256'])[:12]}... but its file {rel} is "
                          f"{files[rel]['sha256'][:12]}...; the manifest is inconsistent (a "
                          "model was replaced after packaging) -- refusing the bundle")
    for r in [rel] + ([m["stage2"]] if m.get("stage2") else []):
        path = root / r
        try:
            proto = onnx.load(str(path), load_external_data=False)
        except Exception as exc:
            raise PddnetError(f"{where}: {r} is not a readable ONNX model ({type(exc).__name__}: "
                              f"{exc}); refusing the bundle") from exc
        check_external_data(proto, path)


@contextlib.contextmanager
def opened(path: str | os.PathLike):
    """``with opened(path) as bundle:`` -- :func:`open_bundle` that cleans up afterwards."""
    b = open_bundle(path)
    try:
        yield b
    finally:
        b.close()


__all__ = ["Bundle", "Selection", "Option", "open_bundle", "opened", "is_bundle",
           "verify_folder", "read_manifest", "parse_manifest", "check_manifest", "check_archive",
           "check_relative", "trt_environment", "SCHEMA", "MANIFEST", "PREPROCESSING",
           "DEFAULT_MAX_BUNDLE_BYTES", "MAX_MANIFEST_BYTES"]
