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
A ``.tar.gz`` is unpacked into a private temporary folder first (regular files and folders
only; absolute names, ``..``, links and devices are refused) and verified there.

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
import os
import shutil
import tarfile
import tempfile
import weakref
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Callable

from pddnet._files import read_json, sha256_file
from pddnet.errors import PddnetError

SCHEMA = "pddnet.bundle/1"
MANIFEST = "manifest.json"
PREPROCESSING = "preprocessing.json"
TAR_SUFFIXES = (".tar.gz", ".tgz", ".tar")
PRECISION_ORDER_GPU = ("int8", "fp16", "fp32")     # TensorRT: lowest validated precision first
PRECISION_ORDER_CUDA = ("fp16", "fp32", "int8")    # ONNX Runtime CUDA EP
BACKEND_ALIASES = {"auto": "auto", "onnxruntime": "onnxruntime", "ort": "onnxruntime",
                   "tensorrt": "tensorrt", "trt": "tensorrt"}


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
        raise PddnetError(f"{where}: the manifest lists a path {rel!r} that is not a non-empty "
                          "string; the manifest is damaged -- re-create the bundle with "
                          "`pddnet package`")
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
                 f"{m.get('versions', {}).get('pddnet')}); {len(m.get('files', {}))} files "
                 "verified (SHA-256)"]
        pre = m.get("preprocessing", {})
        lines.append(f"  input: {pre.get('image_shape')} voxels @ {pre.get('spacing_mm')} mm, "
                     f"{pre.get('orientation')}, intensity {pre.get('intensity')}")
        for mod in self.models:
            v = mod.get("validation") or {}
            if not v:
                val = "not validated"
            else:
                best = _best_candidate(v)
                val = ("validation PASSED" if v.get("passed") else "validation FAILED")
                if best:
                    val += (f" ({best['name']}: dDice {_fmt(best.get('delta_dice_points_max_abs'), '.3f')} "
                            f"pt, max|du| {_fmt(best.get('disp_diff_max_vox'), '.2e')} vox, p50 "
                            f"{_fmt((best.get('latency') or {}).get('p50_ms'), '.0f')} ms)")
            what = mod.get("file") if mod.get("kind") == "onnx" else \
                ", ".join(sorted((mod.get("engines") or {}).values()))
            extra = ""
            if mod.get("kind") == "tensorrt":
                env = mod.get("env") or {}
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
        built = m.get("env") or {}
        built_desc = (f"built for {built.get('gpu_name')} (compute "
                      f"{built.get('compute_capability')}, {built.get('sm_count')} SMs), "
                      f"TensorRT {built.get('trt_version')}")
        if env is None:
            return False, f"TensorRT is not usable here ({problem}); engines {built_desc}"
        for part, rel in sorted((m.get("engines") or {}).items()):
            record = ec.read_record(self.path(_meta_rel(rel)))
            key_fields = (record or {}).get("key", {})
            try:
                key = ec.EngineKey(key_fields.get("model_sha256", ""),
                                   key_fields.get("precision", m.get("precision", "fp32")),
                                   key_fields.get("plugins", ""), env,
                                   key_fields.get("hardware_compat", "none"))
            except PddnetError as exc:
                return False, f"engine {rel}: {exc}"
            verdict = ec.compare(record, key, engine_path=self.path(rel), check_hash=False)
            if not verdict.usable:
                return False, (f"engine {rel} ({part}) is {verdict.message()} -- engines run "
                               f"only on the GPU model and TensorRT version they were built for "
                               f"(this machine: {env.describe()})")
        return True, f"TensorRT engines {built_desc}, match this machine"

    def select(self, backend: str = "auto", precision: str | None = None, *,
               providers: list[str] | str | None = None, env: Any = "probe") -> Selection:
        """Pick what to run (module docstring), or check the ``backend``/``precision`` asked
        for. Raises :class:`PddnetError` when nothing asked for can run here."""
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
    v = m.get("validation") or {}
    for c in v.get("candidates", []):
        if c.get("backend") == "onnxruntime" and c.get("passed") and \
                c.get("device", "cpu") == "cpu" and not c.get("emulated") and \
                c.get("mode", "ff") == "ff":
            p50 = (c.get("latency") or {}).get("p50_ms")
            if isinstance(p50, (int, float)):
                return float(p50)
    return None


def _best_candidate(v: dict[str, Any]) -> dict[str, Any] | None:
    cands = v.get("candidates") or []
    return cands[0] if cands else None


def _fmt(v: Any, spec: str) -> str:
    return "-" if not isinstance(v, (int, float)) else format(v, spec)


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
def open_bundle(path: str | os.PathLike, *, echo: Callable[[str], None] | None = None) -> Bundle:
    """Verify the bundle at ``path`` (folder or ``.tar.gz``) and return it (module docstring).

    Nothing in the bundle is parsed as a model before every check has passed."""
    src = Path(path)
    if not src.exists():
        raise PddnetError(f"{src}: no such bundle (a folder or .tar.gz written by `pddnet "
                          "package`)")
    if src.is_dir():
        manifest = verify_folder(src)
        return Bundle(src, manifest, src)
    if not src.name.lower().endswith(TAR_SUFFIXES):
        raise PddnetError(f"{src} is neither a bundle folder nor a .tar.gz bundle")
    tmp = Path(tempfile.mkdtemp(prefix="pddnet-bundle-"))
    try:
        root = _unpack(src, tmp)
        manifest = verify_folder(root, where=str(src))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if echo:
        echo(f"bundle {src}: unpacked into {root} and verified")
    return Bundle(root, manifest, src, tmpdir=tmp)


def _unpack(src: Path, dest: Path) -> Path:
    """Extract regular files and folders only; refuse anything else before writing."""
    try:
        with tarfile.open(src, "r:*") as tar:
            members = tar.getmembers()
            for mem in members:
                name = mem.name
                if not (mem.isfile() or mem.isdir()):
                    raise PddnetError(f"{src}: member {name!r} is a link or special file; a "
                                      "bundle archive holds regular files only -- refusing it")
                if name.startswith("/") or any(p == ".." for p in PurePosixPath(name).parts):
                    raise PddnetError(f"{src}: member {name!r} would be written outside the "
                                      "bundle folder; refusing the archive")
            tar.extractall(dest, members=members, filter="data")
    except PddnetError:
        raise
    except (tarfile.TarError, EOFError, OSError, zlib_error()) as exc:
        raise PddnetError(f"{src}: not a readable bundle archive ({type(exc).__name__}: {exc}); "
                          "it is truncated or not a .tar.gz written by `pddnet package --tar`") \
            from exc
    if (dest / MANIFEST).is_file():
        return dest
    tops = [p for p in dest.iterdir()]
    if len(tops) == 1 and tops[0].is_dir() and (tops[0] / MANIFEST).is_file():
        return tops[0]
    raise PddnetError(f"{src}: the archive holds no {MANIFEST} (at its top or in its single "
                      "top-level folder); it is not a pddnet bundle")


def zlib_error() -> type:
    import zlib

    return zlib.error


def read_manifest(root: Path, *, where: str | None = None) -> dict[str, Any]:
    where = where or str(root)
    mpath = root / MANIFEST
    if mpath.is_symlink():
        raise PddnetError(f"{where}: {MANIFEST} is a symbolic link; refusing the bundle")
    if not mpath.is_file():
        raise PddnetError(f"{where}: no {MANIFEST}; this is not a bundle written by `pddnet "
                          "package` (give the bundle folder, its .tar.gz, or a .onnx model)")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"),
                              parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        raise PddnetError(f"{where}: {MANIFEST} is not valid JSON ({exc}); it is truncated or "
                          "edited -- re-create the bundle with `pddnet package`") from exc
    if not isinstance(manifest, dict) or manifest.get("schema") != SCHEMA:
        got = manifest.get("schema") if isinstance(manifest, dict) else type(manifest).__name__
        raise PddnetError(f"{where}: {MANIFEST} has schema {got!r}; this pddnet reads {SCHEMA!r}")
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise PddnetError(f"{where}: {MANIFEST} lists no files; the manifest is damaged")
    if not isinstance(manifest.get("models"), list) or not manifest["models"]:
        raise PddnetError(f"{where}: {MANIFEST} lists no models; the manifest is damaged")
    return manifest


def _no_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


def verify_folder(root: Path, *, where: str | None = None) -> dict[str, Any]:
    """Every check of :func:`open_bundle` on a folder; returns the manifest."""
    where = where or str(root)
    manifest = read_manifest(root, where=where)
    files: dict[str, Any] = manifest["files"]
    for rel, entry in files.items():
        relp = check_relative(rel, where=where)
        if rel == MANIFEST:
            raise PddnetError(f"{where}: the manifest lists itself; it is damaged")
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str) or \
                not isinstance(entry.get("bytes"), int):
            raise PddnetError(f"{where}: the manifest entry of {rel} lacks sha256/bytes; it is "
                              "damaged")
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
                raise PddnetError(f"{where}: {rel} is in the bundle but not in its manifest; "
                                  "refusing the bundle (a bundle holds exactly the files its "
                                  "manifest lists)")
    for m in manifest["models"]:
        if not isinstance(m, dict) or not isinstance(m.get("id"), str):
            raise PddnetError(f"{where}: a model entry of the manifest is damaged: {m!r}")
        refs = []
        if m.get("kind") == "onnx":
            refs = [m.get("file")] + ([m["stage2"]] if m.get("stage2") else [])
        elif m.get("kind") == "tensorrt":
            engines = m.get("engines")
            if not isinstance(engines, dict) or not engines:
                raise PddnetError(f"{where}: model {m['id']} lists no engines")
            refs = [v for v in engines.values()] + [_meta_rel(v) for v in engines.values()]
        else:
            raise PddnetError(f"{where}: model {m['id']} has unknown kind {m.get('kind')!r}")
        for r in refs:
            check_relative(r, where=where)
            if r not in files:
                raise PddnetError(f"{where}: model {m['id']} names {r!r}, which the manifest "
                                  "does not list with a checksum; refusing the bundle")
        if m.get("kind") == "onnx":
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
           "verify_folder", "read_manifest", "check_relative", "trt_environment", "SCHEMA",
           "MANIFEST", "PREPROCESSING"]
