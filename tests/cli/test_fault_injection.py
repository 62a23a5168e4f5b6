"""Fault injection: outputs are never lost or mixed, whatever stops a writer.

``pddnet register --overwrite`` and ``pddnet package --tar --overwrite`` run as real processes
over an existing result and are stopped by ``kill -9``, SIGTERM or SIGINT at spread-out moments
(model load, registration, writing, the swap); after each, the output holds exactly the old
result or exactly the new one (file names and SHA-256; ``summary.json``, which records times,
is checked by its content), the exit status says what happened (130, 143 or -9), and the next
run cleans whatever a ``kill -9`` left beside the output. Also: a full disk (a 2 MB tmpfs,
where this machine lets the tests mount one; skipped with the reason otherwise), a read-only
output folder, and two writers of one output at once.

Not tested here: power loss (the fsyncs are called, not observed), NFS and other file systems
without ``renameat2`` (the two-rename fallback is tested directly in tests/test_files.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from helpers.deploy_helpers import SHAPE, build_bundle, candidate, precision_model, write_report
from helpers.fake_models import ct_like, grid_affine, save_volume

SRC = Path(__file__).resolve().parents[2] / "src"
AFF = grid_affine(4.0)
#: fractions of a complete run (from taking the output's lock) at which a writer is stopped
#: (0: at once; None: not stopped, it completes)
MOMENTS = (0.0, 0.15, 0.3, 0.45, 0.6, 0.7, 0.8, 0.9, 1.05, None)
SIGNALS = (signal.SIGKILL, signal.SIGTERM, signal.SIGINT)


def _run(args: list, *, env=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pddnet.cli", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONPATH": str(SRC), **(env or {})})


def _lock_of(target: Path) -> Path:
    return target.parent / f".{target.name}.lock"


def _wait_for_lock(p: subprocess.Popen, target: Path) -> bool:
    """Wait until the writer holds the output's lock (it has started writing this output);
    False if it ended first."""
    lock = _lock_of(target)
    t0 = time.time()
    while not _holds_pid(lock):
        if p.poll() is not None:
            return False
        assert time.time() - t0 < 120, "the writer never started"
        time.sleep(0.002)
    return True


def _holds_pid(lock: Path) -> bool:
    try:
        return bool(lock.read_text().strip())  # the PID is written once the lock is held
    except OSError:
        return False


def _complete(args: list, target: Path) -> float:
    """Run to the end; returns the seconds from taking the output's lock to the exit."""
    p = _run(args)
    _wait_for_lock(p, target)
    t0 = time.perf_counter()
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 0, out
    return time.perf_counter() - t0


def _digest(path: Path) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under ``path`` (or of the file itself);
    ``summary.json`` by its content without times."""
    if not path.exists():
        return {}
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    out = {}
    for p in files:
        rel = p.name if path.is_file() else p.relative_to(path).as_posix()
        if p.name == "summary.json":
            s = json.loads(p.read_text())
            out[rel] = json.dumps({"outputs": s["outputs"], "metrics": s["metrics"],
                                   "inputs": s["inputs"]}, sort_keys=True)
        else:
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _leftovers(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}."))


def _stop_at(args: list, target: Path, delay: float | None, sig: int) -> tuple[int, str]:
    """Stop the writer ``delay`` seconds after it took the output's lock (None: never)."""
    p = _run(args)
    if delay is not None and _wait_for_lock(p, target):
        try:
            p.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            p.send_signal(sig)
    out, _ = p.communicate(timeout=120)
    return p.returncode, out


def _inject(tmp_path, make, digests, old: dict, new: dict, duration: float,
            check=None) -> list[tuple[int, str]]:
    """Stop writers at every (moment, signal), each in its own copy of the old result.

    ``make(work) -> (args, target)`` prepares one copy; ``digests(work)`` describes the outputs
    (``"target"`` and any others), each of which must then be exactly old or new;
    ``check(work, got)`` adds the caller's checks. Returns ``(exit status, "old"|"new")``."""
    cases = [(m, s) for m in MOMENTS for s in SIGNALS]

    def one(case):
        moment, sig = case
        work = tmp_path / f"{sig.name}_{'never' if moment is None else moment}"
        args, tgt = make(work)
        rc, out = _stop_at(args, tgt, None if moment is None else moment * duration, sig)
        where = (sig.name, moment, rc)
        assert "Traceback" not in out, out
        # -N: the signal came while the interpreter was shutting down (its handlers reset),
        # after the command had finished: the new result must then be complete
        assert rc in (0, -9, 130, 143, -int(sig)), (rc, out)
        if rc == 130:
            assert "interrupted: no partial outputs were left" in out, out
        if rc == 143:
            assert "interrupted by SIGTERM" in out, out
        got = digests(work)
        for name in got:
            assert got[name] in (old[name], new[name]), (name, *where)
        if rc == 0 or (rc == -int(sig) and sig != signal.SIGKILL):
            assert got["target"] == new["target"], (where, out)
        if sig != signal.SIGKILL:
            assert not _leftovers(tgt), _leftovers(tgt)
        if check is not None:
            check(work, got, where)
        return rc, "new" if got["target"] == new["target"] else "old"

    with ThreadPoolExecutor(max_workers=3) as pool:
        return list(pool.map(one, cases))


@pytest.fixture(scope="module")
def scans(tmp_path_factory):
    d = tmp_path_factory.mktemp("fault")
    rng = np.random.default_rng()
    res, models = build_bundle(d)
    return {"dir": d, "bundle": res.bundle, "model": models["fp32"],
            "fixed": save_volume(d / "f.nii.gz", ct_like(rng, SHAPE), AFF),
            # same file name: the outputs of both land in the same subfolders
            "m_old": save_volume(_mkdir(d / "old") / "m.nii.gz", ct_like(rng, SHAPE), AFF),
            "m_new": save_volume(_mkdir(d / "new") / "m.nii.gz", ct_like(rng, SHAPE), AFF)}


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _copy(src: Path, dst: Path) -> None:
    import shutil

    dst.parent.mkdir(parents=True, exist_ok=True)
    if src.is_dir():
        shutil.copytree(src, dst)
    elif src.exists():
        shutil.copy2(src, dst)


def test_register_overwrite_is_old_or_new_after_any_stop(scans, tmp_path):
    def args(out, moving):
        return ["register", "--model", scans["bundle"], "--fixed", scans["fixed"], "--moving",
                moving, scans["fixed"], "--out", out, "--overwrite", "--threads", "1"]

    ref_old, ref_new = tmp_path / "ref_old", tmp_path / "ref_new"
    _complete(args(ref_old, scans["m_old"]), ref_old)
    duration = _complete(args(ref_new, scans["m_new"]), ref_new)
    old, new = {"target": _digest(ref_old)}, {"target": _digest(ref_new)}
    assert old["target"] != new["target"] and len(new["target"]) >= 8

    def make(work):
        out = work / "out"
        _copy(ref_old, out)
        return args(out, scans["m_new"]), out

    outcomes = _inject(tmp_path, make, lambda work: {"target": _digest(work / "out")}, old, new,
                       duration)
    assert len(outcomes) >= 30
    assert {kind for _, kind in outcomes} == {"old", "new"}, outcomes  # both sides of the swap
    # what a kill -9 left is cleaned by the next run of the same output
    for work in tmp_path.glob("SIGKILL_*"):
        out = work / "out"
        _complete(args(out, scans["m_new"]), out)
        assert _digest(out) == new["target"] and _leftovers(out) == []


def test_package_tar_overwrite_is_old_or_new_after_any_stop(scans, tmp_path):
    d = scans["dir"]
    m_old = precision_model(d / "pk_old.onnx", seed=1)
    m_new = precision_model(d / "pk_new.onnx", seed=2)
    rep_old = write_report(d / "rep_old", [candidate("onnxruntime-fp32", m_old, "fp32")])
    rep_new = write_report(d / "rep_new", [candidate("onnxruntime-fp32", m_new, "fp32")])

    def args(work, model, report):
        return ["package", "--onnx", model, "--report", report, "--out", work / "bundle",
                "--tar", "--overwrite"]

    ref_old, ref_new = tmp_path / "ref_old", tmp_path / "ref_new"
    _complete(args(ref_old, m_old, rep_old), ref_old / "bundle")
    duration = _complete(args(ref_new, m_new, rep_new), ref_new / "bundle")

    def digests(work):
        return {"target": _model_files(work / "bundle"),
                "tar": _model_files_in_tar(work / "bundle.tar.gz")}

    old, new = digests(ref_old), digests(ref_new)
    assert old != new

    def make(work):
        _copy(ref_old / "bundle", work / "bundle")
        _copy(ref_old / "bundle.tar.gz", work / "bundle.tar.gz")
        return args(work, m_new, rep_new), work / "bundle"

    def verified(work, got, where):  # whatever is there is a bundle that verifies
        for p in (work / "bundle", work / "bundle.tar.gz"):
            if p.exists():
                v = subprocess.run([sys.executable, "-m", "pddnet.cli", "verify", str(p)],
                                   capture_output=True, text=True,
                                   env={**os.environ, "PYTHONPATH": str(SRC)})
                assert v.returncode == 0, (where, p.name, v.stdout + v.stderr)

    codes = [rc for rc, _ in _inject(tmp_path, make, digests, old, new, duration, verified)]
    assert len(codes) >= 30 and 0 in codes and {130, 143, -9} <= set(codes), codes


def _model_files(bundle: Path) -> dict[str, str]:
    """The bundle's manifest file index (names and SHA-256 of the model and evidence files;
    the manifest itself records the packaging time)."""
    if not bundle.exists():
        return {}
    m = json.loads((bundle / "manifest.json").read_text())
    return {k: v["sha256"] for k, v in m["files"].items() if k.startswith("models/")}


def _model_files_in_tar(tar: Path) -> dict[str, str]:
    import tarfile

    if not tar.exists():
        return {}
    with tarfile.open(tar) as tf:
        member = next(m for m in tf.getmembers() if m.name.endswith("/manifest.json"))
        m = json.loads(tf.extractfile(member).read())
    return {k: v["sha256"] for k, v in m["files"].items() if k.startswith("models/")}


def test_two_writers_of_one_output(scans, tmp_path):
    """The second writer is refused at once with the first one's PID; the first completes."""
    out = tmp_path / "out"
    go = tmp_path / "go"  # the first writer saves nothing until the second one has been refused
    slow = ("import os, sys, time, nibabel; real = nibabel.save\n"
            "def save(*a, **k):\n"
            "    t0 = time.time()\n"
            f"    while not os.path.exists({str(go)!r}) and time.time() - t0 < 120:\n"
            "        time.sleep(0.05)\n"
            "    return real(*a, **k)\n"
            "nibabel.save = save\nfrom pddnet.cli import main\nmain(sys.argv[1:])\n")
    first = subprocess.Popen(
        [sys.executable, "-c", slow, "register", "--model", str(scans["bundle"]), "--fixed",
         str(scans["fixed"]), "--moving", str(scans["m_new"]), "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONPATH": str(SRC)})
    lock = out.parent / f".{out.name}.lock"
    t0 = time.time()
    while not lock.exists() or not lock.read_text().strip():
        assert first.poll() is None, first.communicate()[0]
        assert time.time() - t0 < 60
        time.sleep(0.02)
    second = _run(["register", "--model", scans["bundle"], "--fixed", scans["fixed"],
                   "--moving", scans["m_old"], "--out", out, "--overwrite"])
    out2, _ = second.communicate(timeout=120)
    assert second.returncode == 2, out2
    assert f"being written by another pddnet process (PID {first.pid})" in out2, out2
    assert first.poll() is None            # the first writer was still at work all along
    go.touch()
    out1, _ = first.communicate(timeout=120)
    assert first.returncode == 0, out1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["inputs"]["moving"]["path"] == str(scans["m_new"])
    assert not lock.exists() and _leftovers(out) == []


def _mount_tmpfs(path: Path, size: str) -> str | None:
    path.mkdir(parents=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                       capture_output=True, text=True)
    return None if r.returncode == 0 else (r.stderr.strip() or "mount failed")


def test_full_disk_keeps_the_old_result(scans, tmp_path):
    disk = tmp_path / "disk"
    why = _mount_tmpfs(disk, "600k")
    if why:
        pytest.skip(f"cannot mount a small tmpfs here ({why}); needs root and mount rights")
    try:
        out = disk / "out"
        # an old result that fits, then a new one that does not (labels add a file)
        p = _run(["register", "--model", scans["bundle"], "--fixed", scans["fixed"],
                  "--moving", scans["m_old"], "--out", out])
        first, _ = p.communicate(timeout=120)
        if p.returncode != 0:
            pytest.skip(f"the small disk cannot hold even one result here: {first}")
        before = _digest(out)
        filler = disk / "filler"
        free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
        filler.write_bytes(b"\0" * max(0, free - 20_000))  # leave less than a result needs
        p = _run(["register", "--model", scans["bundle"], "--fixed", scans["fixed"],
                  "--moving", scans["m_new"], "--out", out, "--overwrite"])
        msg, _ = p.communicate(timeout=120)
        assert p.returncode == 2, msg
        assert "the disk is full" in msg and "Traceback" not in msg, msg
        assert _digest(out) == before and _leftovers(out) == []
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


def test_read_only_output_folder_is_refused_before_computing(scans, tmp_path):
    if os.geteuid() == 0:
        # root ignores permission bits; a read-only bind mount would need mount rights
        ro = tmp_path / "ro"
        ro.mkdir()
        r = subprocess.run(["mount", "--bind", "-o", "ro", str(ro), str(ro)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot make a read-only folder as root here ({r.stderr.strip()})")
        subprocess.run(["mount", "-o", "remount,bind,ro", str(ro)], capture_output=True)
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
    try:
        t0 = time.perf_counter()
        p = _run(["register", "--model", scans["bundle"], "--fixed", scans["fixed"],
                  "--moving", scans["m_new"], "--out", ro / "out"])
        msg, _ = p.communicate(timeout=120)
        assert p.returncode == 2, msg
        assert ("read-only" in msg or "permission denied" in msg or "writable" in msg), msg
        assert "Traceback" not in msg and "registered" not in msg
        assert time.perf_counter() - t0 < 60
        assert list(ro.iterdir()) == []
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", str(ro)], capture_output=True)
