"""The reliability list of the deployment issue: every refusal gives a clear one-line error
(exit status 2 from the CLI; 1 from `verify`, whose check failed) and leaves no partial file;
Ctrl-C while writing leaves nothing.

Refusals: a tampered or truncated file in a bundle; a manifest path outside the bundle (and
the other ways a bundle can smuggle a file: unlisted files, symbolic links, archive members
outside the folder, a broken archive or manifest); a model whose external data escapes its
folder; a checkpoint that needs unpickling of arbitrary objects; an engine built for another
GPU or TensorRT version; inputs with NaN/Inf, wrong rank, absurd or wrong spacing, empty
volumes, label maps with unexpected values; output paths that exist (register, package,
validate, demo, Triton repository); SIGINT while writing (package, register, report).

Not tested here: real TensorRT (the identity check runs with an injected GPU environment).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from helpers.deploy_helpers import (
    SHAPE,
    build_bundle,
    candidate,
    environment,
    precision_model,
    write_report,
)
from helpers.fake_models import ct_like, grid_affine, save_volume

AFF = grid_affine(4.0)
SRC = Path(__file__).resolve().parents[2] / "src"
TESTS = Path(__file__).resolve().parents[1]
MODEL_REL = "models/fp32/model.fp32.onnx"


def _cli(*args):
    from pddnet.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


def _files(path: Path) -> list[str]:
    return sorted(p.relative_to(path).as_posix() for p in path.rglob("*")) if path.exists() else []


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("refuse")
    res, models = build_bundle(d)
    rng = np.random.default_rng(9)
    lab = rng.integers(0, 4, SHAPE).astype(np.uint8)
    scans = {"fixed": save_volume(d / "f.nii.gz", ct_like(rng, SHAPE), AFF),
             "moving": save_volume(d / "m.nii.gz", ct_like(rng, SHAPE), AFF),
             "lab": save_volume(d / "lab.nii.gz", lab, AFF)}
    return {"dir": d, "bundle": res.bundle, "model": models["fp32"], "scans": scans}


@pytest.fixture
def bundle(base, tmp_path):
    """A fresh copy of the good bundle to damage."""
    dst = tmp_path / "bundle"
    shutil.copytree(base["bundle"], dst)
    return dst


def _register_refused(bundle_path, scans, out, needle, *extra):
    r = _cli("register", "--model", bundle_path, "--fixed", scans["fixed"], "--moving",
             scans["moving"], "--out", out, *extra)
    assert r.exit_code == 2, r.output
    assert r.output.startswith("error: ") and needle in r.output, r.output
    assert "Traceback" not in r.output
    assert _files(out) == []
    return r.output.strip()


def _manifest(bundle):
    return json.loads((bundle / "manifest.json").read_text())


def _write_manifest(bundle, m):
    (bundle / "manifest.json").write_text(json.dumps(m))


# --------------------------------------------------------------------------------------------
# bundles
# --------------------------------------------------------------------------------------------
def _tamper(b):
    p = b / MODEL_REL
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x01
    p.write_bytes(bytes(data))


def _truncate(b):
    p = b / MODEL_REL
    p.write_bytes(p.read_bytes()[:-100])


def _outside(b):
    m = _manifest(b)
    m["files"]["../outside.onnx"] = m["files"][MODEL_REL]
    _write_manifest(b, m)


def _absolute(b):
    m = _manifest(b)
    m["files"]["/etc/passwd"] = {"sha256": "0" * 64, "bytes": 1}
    _write_manifest(b, m)


def _model_outside(b):
    m = _manifest(b)
    m["models"][0]["file"] = "models/../../elsewhere/model.onnx"
    _write_manifest(b, m)


def _unlisted(b):
    (b / "models" / "fp32" / "extra.onnx").write_bytes(b"x")


def _symlink(b):
    outside = b.parent / "outside.onnx"
    shutil.copy(b / MODEL_REL, outside)
    (b / MODEL_REL).unlink()
    os.symlink(outside, b / MODEL_REL)


def _missing(b):
    (b / MODEL_REL).unlink()


def _bad_json(b):
    p = b / "manifest.json"
    p.write_text(p.read_text()[:-40])


def _no_manifest(b):
    (b / "manifest.json").unlink()


BUNDLE_DAMAGE = [
    (_tamper, "does not match its SHA-256 in the manifest"),
    (_truncate, "the file is truncated"),
    (_outside, "'../outside.onnx', which leaves the bundle folder"),
    (_absolute, "'/etc/passwd', an absolute path outside the bundle"),
    (_model_outside, "which leaves the bundle folder"),
    (_unlisted, "models/fp32/extra.onnx is in the bundle but not in its manifest"),
    (_symlink, "symbolic link"),
    (_missing, "is listed in the manifest but missing"),
    (_bad_json, "manifest.json is not valid JSON"),
    (_no_manifest, "no manifest.json"),
]


@pytest.mark.parametrize("damage, needle", BUNDLE_DAMAGE, ids=[d.__name__ for d, _ in BUNDLE_DAMAGE])
def test_damaged_bundles_are_refused_before_loading(base, bundle, tmp_path, damage, needle):
    damage(bundle)
    msg = _register_refused(bundle, base["scans"], tmp_path / "out", needle)
    print(msg)
    r = _cli("verify", bundle)
    assert r.exit_code == 1 and needle in r.output  # a check failed: the bundle is damaged
    # and from Python, before any model is parsed
    from pddnet.errors import PddnetError
    from pddnet.runtime.session import Registrar

    with pytest.raises(PddnetError, match="refusing|missing|not valid JSON|no manifest"):
        Registrar(bundle)


def _tar(path: Path, members: list[tuple[str, bytes | None, str | None]]) -> Path:
    """A .tar.gz with (name, data, link target) members."""
    import io

    with tarfile.open(path, "w:gz") as tf:
        for name, data, link in members:
            info = tarfile.TarInfo(name)
            if link is not None:
                info.type = tarfile.SYMTYPE
                info.linkname = link
                tf.addfile(info)
            else:
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return path


@pytest.mark.parametrize("kind, needle", [
    ("dotdot", "would be written outside the bundle folder"),
    ("absolute", "would be written outside the bundle folder"),
    ("symlink", "is a link or special file"),
    ("truncated", "not a readable bundle archive"),
    ("no_manifest", "holds no manifest.json"),
])
def test_bad_archives_are_refused(base, tmp_path, kind, needle):
    path = tmp_path / "b.tar.gz"
    if kind == "dotdot":
        _tar(path, [("b/manifest.json", b"{}", None), ("b/../../evil.txt", b"x", None)])
    elif kind == "absolute":
        _tar(path, [("/tmp/pddnet-evil.txt", b"x", None)])
    elif kind == "symlink":
        _tar(path, [("b/manifest.json", b"{}", None), ("b/model.onnx", None, "/etc/passwd")])
    elif kind == "truncated":
        from pddnet.deploy.package import write_tar

        write_tar(base["bundle"], path, "b")
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        _tar(path, [("b/readme.txt", b"x", None)])
    tmp_before = set(Path(os.environ.get("TMPDIR", "/tmp")).glob("pddnet-bundle-*"))
    _register_refused(path, base["scans"], tmp_path / "out", needle)
    assert not (tmp_path / "evil.txt").exists() and not Path("/tmp/pddnet-evil.txt").exists()
    # the private unpacking folder is removed again
    assert set(Path(os.environ.get("TMPDIR", "/tmp")).glob("pddnet-bundle-*")) <= tmp_before


# --------------------------------------------------------------------------------------------
# external data, checkpoints, engines
# --------------------------------------------------------------------------------------------
def _escaping_model(folder: Path) -> Path:
    """A model whose initializer lives in external data at ../../../secret.bin."""
    from onnx.external_data_helper import convert_model_to_external_data

    folder.mkdir(parents=True, exist_ok=True)
    m = onnx.load(str(precision_model(folder / "tmp.onnx")))
    convert_model_to_external_data(m, all_tensors_to_one_file=True, location="w.bin",
                                   size_threshold=0)
    onnx.save(m, str(folder / "good.onnx"))  # writes w.bin beside it
    for t in m.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "../../../secret.bin"
    path = folder / "escaping.onnx"
    path.write_bytes(m.SerializeToString())
    return path


def test_external_data_escaping_its_folder(base, tmp_path):
    model = _escaping_model(tmp_path / "a" / "b" / "c")
    needle = "which is outside the model's folder"
    # as a model
    r = _cli("register", "--model", model, "--fixed", base["scans"]["fixed"], "--moving",
             base["scans"]["moving"], "--out", tmp_path / "out")
    assert r.exit_code == 2 and needle in r.output and _files(tmp_path / "out") == []
    # packaging it
    report = write_report(tmp_path / "rep", [])
    r = _cli("package", "--onnx", model, "--report", report, "--out", tmp_path / "bundle")
    assert r.exit_code == 2 and needle in r.output and not (tmp_path / "bundle").exists()
    # smuggled into a bundle, the file checksum updated: the model entry's own SHA-256 (the
    # one its validation was measured on) no longer matches -- refused by register and verify
    b = tmp_path / "b2"
    shutil.copytree(base["bundle"], b)
    shutil.copy(model, b / MODEL_REL)
    m = _manifest(b)
    from pddnet._files import sha256_file

    digest = sha256_file(b / MODEL_REL)
    m["files"][MODEL_REL] = {"sha256": digest, "bytes": (b / MODEL_REL).stat().st_size}
    _write_manifest(b, m)
    _register_refused(b, base["scans"], tmp_path / "out2", "the manifest is inconsistent")
    r = _cli("verify", b)
    assert r.exit_code == 1 and "the manifest is inconsistent" in r.output, r.output
    # ... and with the model entry's SHA-256 updated too: the external data is checked
    for entry in m["models"]:
        if entry.get("file") == MODEL_REL:
            entry["sha256"] = digest
    _write_manifest(b, m)
    _register_refused(b, base["scans"], tmp_path / "out3", needle)
    r = _cli("verify", b)
    assert r.exit_code == 1 and needle in r.output, r.output


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pddnet-pwned",))


def test_checkpoint_needing_unpickling(base, tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    from pddnet.data.synth import write_dataset

    write_dataset(tmp_path / "data", subjects=4, seed=0, preset="small", progress=False)
    monkeypatch.chdir(tmp_path)
    evil = tmp_path / "evil.pt"
    torch.save({"format": "pddnet-checkpoint", "version": 1, "config": {}, "state_dict": {},
                "payload": _Evil()}, evil)
    needle = "needs unpickling of arbitrary Python objects"
    for args, out in ((["export", evil, "--out", tmp_path / "x.onnx"], tmp_path / "x.onnx"),
                      (["validate", "--checkpoint", evil, "--onnx", base["model"], "--data",
                        tmp_path / "data", "--out", tmp_path / "rep", "--in-process"],
                       tmp_path / "rep"),
                      (["demo", "--checkpoint", evil, "--out", tmp_path / "demo"], tmp_path / "demo")):
        r = _cli(*args)
        assert r.exit_code == 2 and needle in r.output, r.output
        assert not out.exists()
    assert not (tmp_path / "pddnet-pwned").exists()


def test_engine_for_another_gpu_or_tensorrt(tmp_path, monkeypatch):
    from pddnet.errors import PddnetError
    from pddnet.runtime import bundle as bmod

    built = environment()
    res, _ = build_bundle(tmp_path, engines_env=built)
    rng = np.random.default_rng(1)
    scans = {"fixed": save_volume(tmp_path / "f.nii.gz", ct_like(rng, SHAPE), AFF),
             "moving": save_volume(tmp_path / "m.nii.gz", ct_like(rng, SHAPE), AFF)}
    for here, needle in (
            (environment(gpu="NVIDIA A100-SXM4-80GB", cc="8.0", sms=108),
             "built for gpu name 'NVIDIA H100 80GB HBM3', this machine has "
             "'NVIDIA A100-SXM4-80GB'"),
            (environment(trt="10.3.0.30"),
             "built for trt version '10.9.0.34', this machine has '10.3.0.30'")):
        with bmod.open_bundle(res.bundle) as b, pytest.raises(PddnetError, match="foreign"):
            b.select("tensorrt", env=here)
        monkeypatch.setattr(bmod, "trt_environment", lambda device=0, e=here: (e, None))
        msg = _register_refused(res.bundle, scans, tmp_path / "out", needle, "--backend",
                                "tensorrt")
        assert "refusing to run tensorrt" in msg and "engines run only on the GPU model" in msg
        # automatic choice: falls back to ONNX Runtime and says why
        r = _cli("verify", res.bundle)
        assert r.exit_code == 0 and "selected: onnxruntime" in r.output and "foreign" in r.output


# --------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """A bundle whose model knows labels 0..5, and bad inputs."""
    import nibabel as nib

    d = tmp_path_factory.mktemp("inputs")
    m = precision_model(d / "src" / "model.fp32.onnx", num_labels=5)
    rep = write_report(d / "rep", [candidate("onnxruntime-fp32", m, "fp32")])
    from pddnet.deploy.package import package

    bundle = package(m, report_dir=rep, out=d / "bundle", echo=lambda s: None).bundle
    rng = np.random.default_rng(4)
    f = {"fixed": save_volume(d / "f.nii.gz", ct_like(rng, SHAPE), AFF),
         "moving": save_volume(d / "m.nii.gz", ct_like(rng, SHAPE), AFF)}
    nan = ct_like(rng, SHAPE)
    nan[3, 4, 5] = np.nan
    f["nan"] = save_volume(d / "nan.nii.gz", nan, AFF)
    inf = ct_like(rng, SHAPE)
    inf[0, 0, 0] = -np.inf
    f["inf"] = save_volume(d / "inf.nii.gz", inf, AFF)
    f["4d"] = save_volume(d / "4d.nii.gz", ct_like(rng, SHAPE + (3,)), AFF)
    nib.save(nib.Nifti1Image(ct_like(rng, SHAPE)[:, :, 0], AFF), str(d / "2d.nii.gz"))
    f["2d"] = d / "2d.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((0, 21, 30), np.float32), AFF), str(d / "empty.nii.gz"))
    f["empty"] = d / "empty.nii.gz"
    f["absurd"] = save_volume(d / "absurd.nii.gz", ct_like(rng, SHAPE), np.diag([50.0, 4, 4, 1]))
    zero = nib.Nifti1Image(ct_like(rng, SHAPE), None)  # a zero column has no qform
    zero.set_sform(np.diag([0.0, 4, 4, 1]), code=1)
    nib.save(zero, str(d / "zero.nii.gz"))
    f["zero_sp"] = d / "zero.nii.gz"
    f["wrong_sp"] = save_volume(d / "1mm.nii.gz", ct_like(rng, SHAPE), grid_affine(1.0))
    lab = rng.integers(0, 4, SHAPE).astype(np.float32)
    f["lab"] = save_volume(d / "lab.nii.gz", lab.astype(np.uint8), AFF)
    nine = lab.copy()
    nine[1, 1, 1] = 9
    f["lab9"] = save_volume(d / "lab9.nii.gz", nine.astype(np.uint8), AFF)
    frac = lab.copy()
    frac[2, 2, 2] = 0.5
    f["lab_frac"] = save_volume(d / "labfrac.nii.gz", frac, AFF)
    neg = lab.copy().astype(np.int16)
    neg[2, 2, 2] = -3
    f["lab_neg"] = save_volume(d / "labneg.nii.gz", neg, AFF)
    big = lab.copy().astype(np.int16)
    big[2, 2, 2] = 300
    f["lab_300"] = save_volume(d / "lab300.nii.gz", big, AFF)
    return {"bundle": bundle, "files": {k: str(v) for k, v in f.items()}}


INPUTS = [
    ({"--moving": "nan"}, "NaN/Inf voxel(s)"),
    ({"--fixed": "inf"}, "NaN/Inf voxel(s)"),
    ({"--fixed": "4d"}, "expected a 3D volume"),
    ({"--moving": "2d"}, "expected a 3D volume"),
    ({"--moving": "empty"}, "the volume is empty"),
    ({"--moving": "absurd"}, "implausible voxel spacing"),
    ({"--fixed": "zero_sp"}, "implausible voxel spacing"),
    ({"--fixed": "wrong_sp", "--moving": "wrong_sp"}, "--spacing-tolerance"),
    ({"--moving-labels": "lab9"}, "the model knows labels 0..5"),
    ({"--fixed-labels": "lab_frac"}, "non-integer values"),
    ({"--moving-labels": "lab_neg"}, "negative values"),
    ({"--moving-labels": "lab_300"}, "exceeds 255"),
]


@pytest.mark.parametrize("change, needle", INPUTS, ids=[n for _, n in INPUTS])
def test_bad_inputs_through_a_bundle(labelled, tmp_path, change, needle):
    files = labelled["files"]
    opts = {"--fixed": "fixed", "--moving": "moving", **change}
    args = ["register", "--model", labelled["bundle"], "--out", tmp_path / "out"]
    for k, v in opts.items():
        args += [k, files[v]]
    r = _cli(*args)
    assert r.exit_code == 2, r.output
    last = r.output.strip().splitlines()[-1]  # after the bundle's verification lines
    assert last.startswith("error: ") and needle in last, r.output
    assert "Traceback" not in r.output and _files(tmp_path / "out") == []


def test_empty_in_memory_volume(labelled):
    from pddnet.data.io import Volume
    from pddnet.errors import PddnetError
    from pddnet.runtime.session import Registrar

    with Registrar(labelled["bundle"], threads=1) as reg:
        with pytest.raises(PddnetError, match="moving scan: .*the volume is empty"):
            reg.register(labelled["files"]["fixed"], Volume(np.zeros((0, 4, 4), np.float32), AFF))


# --------------------------------------------------------------------------------------------
# existing outputs
# --------------------------------------------------------------------------------------------
def test_existing_outputs_are_refused_unless_overwrite(base, tmp_path):
    report = write_report(tmp_path / "rep", [candidate("onnxruntime-fp32", base["model"], "fp32")])
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    tar = tmp_path / "b.tar.gz"
    tar.write_bytes(b"old")
    pk = ["package", "--onnx", base["model"], "--report", report]
    for args, needle in (
            (pk + ["--out", taken], "already exists"),
            (pk + ["--out", tmp_path / "b.tar.gz"], "already exists"),
            (pk + ["--out", tmp_path / "new", "--triton", taken], "already exists"),
            (["demo", "--out", taken], "is not empty"),
            (["validate", "--checkpoint", base["model"], "--onnx", base["model"], "--data", tmp_path,
              "--out", tmp_path / "rep"], "report.json already exists")):
        r = _cli(*args)
        assert r.exit_code == 2 and needle in r.output and "--overwrite" in r.output, r.output
        assert (taken / "keep.txt").read_text() == "mine" and _files(taken) == ["keep.txt"]
        assert tar.read_bytes() == b"old" and not (tmp_path / "new").exists()
    out = tmp_path / "reg"
    ok = _cli("register", "--model", base["bundle"], "--fixed", base["scans"]["fixed"],
              "--moving", base["scans"]["moving"], "--out", out)
    assert ok.exit_code == 0, ok.output
    before = {p: p.stat().st_mtime_ns for p in out.iterdir()}
    r = _cli("register", "--model", base["bundle"], "--fixed", base["scans"]["fixed"],
             "--moving", base["scans"]["moving"], "--out", out)
    assert r.exit_code == 2 and "already holds" in r.output
    assert {p: p.stat().st_mtime_ns for p in out.iterdir()} == before
    # --overwrite replaces a bundle only once the new one is complete
    r = _cli(*pk, "--out", taken, "--overwrite")
    assert r.exit_code == 0, r.output
    assert "keep.txt" not in _files(taken) and "manifest.json" in _files(taken)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# --------------------------------------------------------------------------------------------
# Ctrl-C while writing
# --------------------------------------------------------------------------------------------
SLOW = textwrap.dedent(r"""
    import sys, time, pathlib
    sys.path[:0] = [sys.argv[1], sys.argv[2]]
    marker = pathlib.Path(sys.argv[3])
    target, path = sys.argv[4].split(":")   # module:attribute.path
    import importlib
    mod = importlib.import_module(target)
    *owners, attr = path.split(".")
    for o in owners:
        mod = getattr(mod, o)
    real = getattr(mod, attr)
    calls = {"n": 0}
    def slow(*a, **k):
        out = real(*a, **k)
        calls["n"] += 1
        if calls["n"] == int(sys.argv[5]):
            marker.write_text("writing")
            time.sleep(60)
        return out
    setattr(mod, attr, slow)
    from pddnet.cli import main
    main(sys.argv[6:])
""")


def _interrupt(tmp_path, patch: str, nth: int, args: list) -> subprocess.CompletedProcess:
    marker = tmp_path / "marker"
    proc = subprocess.Popen([sys.executable, "-c", SLOW, str(SRC), str(TESTS), str(marker),
                             patch, str(nth), *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    t0 = time.time()
    while not marker.exists():
        assert proc.poll() is None, proc.communicate()[0]
        assert time.time() - t0 < 120, "the slowed write never started"
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, (proc.returncode, out)
    return out


def test_sigint_while_packaging_leaves_nothing(base, tmp_path):
    report = write_report(tmp_path / "rep", [candidate("onnxruntime-fp32", base["model"], "fp32")])
    work = tmp_path / "work"
    work.mkdir()
    # interrupted during the second file copy of the bundle, and during the archive
    for patch, nth, extra in (("shutil:copyfile", 2, []),        # a file of the bundle
                              ("tarfile:TarFile.addfile", 2, ["--tar"]),   # the archive
                              ("shutil:copyfile", 3, ["--tar"])):  # the Triton repository
        out = _interrupt(tmp_path, patch, nth,
                         ["package", "--onnx", base["model"], "--report", report,
                          "--out", work / "bundle", "--triton", work / "triton", *extra])
        assert "interrupted: no partial outputs were left" in out, out
        assert _files(work) == [], _files(work)
        (tmp_path / "marker").unlink()


def test_sigint_while_saving_a_registration_leaves_nothing(base, tmp_path):
    out_dir = tmp_path / "out"
    out = _interrupt(tmp_path, "nibabel:save", 2,
                     ["register", "--model", base["bundle"], "--fixed", base["scans"]["fixed"],
                      "--moving", base["scans"]["moving"], "--out", out_dir])
    assert "interrupted: no partial outputs were left" in out, out
    assert not out_dir.exists()  # not even the empty folder


def test_sigint_while_writing_a_report_leaves_nothing(tmp_path):
    rep = write_report(tmp_path / "src", [candidate("onnxruntime-fp32", None, "fp32")])
    script = textwrap.dedent(r"""
        import json, sys, time, pathlib
        from pddnet.validation import render
        real = render.atomic_write
        import contextlib
        @contextlib.contextmanager
        def slow(path, **k):
            with real(path, **k) as tmp:
                yield tmp
                if str(path).endswith("report.md"):
                    pathlib.Path(sys.argv[3]).write_text("writing")
                    time.sleep(60)
        render.atomic_write = slow
        render.write_report_files(json.loads(pathlib.Path(sys.argv[1]).read_text()), sys.argv[2])
    """)
    marker, out = tmp_path / "marker", tmp_path / "report"
    proc = subprocess.Popen([sys.executable, "-c", script, str(rep / "report.json"), str(out),
                             str(marker)], env={**os.environ, "PYTHONPATH": str(SRC)},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    t0 = time.time()
    while not marker.exists():
        assert proc.poll() is None, proc.communicate()[0]
        assert time.time() - t0 < 120
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    text, _ = proc.communicate(timeout=60)
    assert "KeyboardInterrupt" in text and not out.exists(), (text, _files(out))
