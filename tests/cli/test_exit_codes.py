"""The CLI's exit-status contract (pddnet.cli.errors) and the refusals that come before any work.

0 success; 1 a check failed; 2 bad input, usage or environment (a missing extra names its pip
install); 3 an internal error, one line, the traceback only with --debug; 128+N a signal. Each
case runs the real command (in a subprocess where the environment matters: torch blocked, a
patched bug, a signal) and asserts the status, the one line and what is on disk afterwards.

Not tested here: the signals at many moments and the disk faults (test_fault_injection.py).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from helpers.deploy_helpers import SHAPE, build_bundle, candidate, write_report
from helpers.fake_models import ct_like, grid_affine, save_volume

SRC = Path(__file__).resolve().parents[2] / "src"
AFF = grid_affine(4.0)


def _py(code: str, *args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(SRC)}, **kw)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("exit")
    rng = np.random.default_rng()
    res, models = build_bundle(d)
    return {"dir": d, "bundle": res.bundle, "model": models["fp32"],
            "fixed": save_volume(d / "f.nii.gz", ct_like(rng, SHAPE), AFF),
            "moving": save_volume(d / "m.nii.gz", ct_like(rng, SHAPE), AFF)}


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pddnet.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(SRC)})


def _one_line(r: subprocess.CompletedProcess) -> str:
    """The failure's one line on stderr (notes printed before it, also on stderr, aside)."""
    assert "Traceback" not in r.stderr + r.stdout, r.stderr
    lines = [ln for ln in r.stderr.strip().splitlines() if not ln.startswith("note: ")]
    assert len(lines) == 1, r.stderr
    return lines[0]


NO_TORCH = """
    import sys
    sys.modules["torch"] = None
    from pddnet.cli import main
    main(sys.argv[1:], prog_name="pddnet")
"""


def test_commands_that_need_torch_say_how_to_install_it(base, tmp_path):
    ckpt = tmp_path / "c.pt"
    ckpt.write_bytes(b"not read: torch is missing first")
    data = tmp_path / "data"
    data.mkdir()
    for args in (["export", ckpt, "--out", tmp_path / "m.onnx"],
                 ["evaluate", "--checkpoint", ckpt, "--data", data],
                 ["train", "--data", data, "--out", tmp_path / "t.pt", "--iterations", "1"],
                 ["bench", "--preset", "small", "--repeats", "1"],
                 ["demo", "--out", tmp_path / "demo", "--checkpoint", ckpt],
                 ["sensitivity", "--checkpoint", ckpt, "--data", data, "--out", tmp_path / "s"]):
        r = _py(NO_TORCH, *args)
        assert r.returncode == 2, (args[0], r.returncode, r.stderr)
        line = _one_line(r)
        assert "'torch'" in line and "pip install 'pddnet[train]'" in line, (args[0], line)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt", "data"]  # nothing written


def test_an_internal_error_is_one_line_and_debug_shows_the_traceback(base, tmp_path):
    bug = """
        import sys
        import pddnet.runtime.batch as batch
        def broken(*a, **k):
            raise TypeError("an unexpected bug")
        batch.register_files = broken
        from pddnet.cli import main
        main(sys.argv[1:], prog_name="pddnet")
    """
    args = ["register", "--model", base["bundle"], "--fixed", base["fixed"], "--moving",
            base["moving"], "--out", tmp_path / "out"]
    r = _py(bug, *args)
    assert r.returncode == 3, r.stderr
    line = _one_line(r)
    assert line.startswith("internal error: TypeError: an unexpected bug") and "--debug" in line
    r = _py(bug, "--debug", *args)
    assert r.returncode == 1 and "Traceback" in r.stderr and "an unexpected bug" in r.stderr


def test_usage_and_check_failures(base, tmp_path):
    r = _cli("register", "--model", base["bundle"])  # usage: click's own status 2
    assert r.returncode == 2 and "Missing option" in r.stderr
    damaged = tmp_path / "bundle"
    import shutil

    shutil.copytree(base["bundle"], damaged)
    target = next(p for p in damaged.rglob("*.onnx"))
    target.write_bytes(target.read_bytes()[:-10])
    r = _cli("verify", damaged)
    assert r.returncode == 1 and _one_line(r).startswith("failed: ") and "truncated" in r.stderr
    r = _cli("verify", tmp_path / "missing")
    assert r.returncode == 2 and "does not exist" in _one_line(r)
    r = _cli("verify", base["bundle"])
    assert r.returncode == 0, r.stderr


def test_every_moving_scan_is_checked_before_the_first_registration(base, tmp_path):
    rng = np.random.default_rng()
    bad = ct_like(rng, SHAPE)
    bad[3, 4, 5] = np.nan
    bad_path = save_volume(tmp_path / "bad.nii.gz", bad, AFF)
    out = tmp_path / "out"
    t0 = time.perf_counter()
    r = _cli("register", "--model", base["bundle"], "--fixed", base["fixed"], "--moving",
             base["moving"], bad_path, "--out", out)
    assert r.returncode == 2, r.stderr
    line = _one_line(r)
    assert "moving scan 2 of 2" in line and "NaN/Inf" in line, line
    assert "->" not in r.stdout  # no moving scan was registered
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["bad.nii.gz"]
    assert time.perf_counter() - t0 < 120


def test_moving_file_names_cannot_place_outputs_outside_out(base, tmp_path):
    odd = tmp_path / "in"
    odd.mkdir()
    data = (base["moving"]).read_bytes()
    for name in ("...nii.gz", ".hidden.nii.gz"):
        (odd / name).write_bytes(data)
    out = tmp_path / "a" / "out"
    r = _cli("register", "--model", base["bundle"], "--fixed", base["fixed"], "--moving",
             odd / "...nii.gz", odd / ".hidden.nii.gz", "--out", out)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["hidden", "moving"]
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["out"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "in"]


def test_package_refuses_outputs_inside_each_other(base, tmp_path):
    report = write_report(tmp_path / "rep", [candidate("onnxruntime-fp32", base["model"], "fp32")])
    b = tmp_path / "B"
    for triton in (b / "triton", tmp_path):
        r = _cli("package", "--onnx", base["model"], "--report", report, "--out", b,
                 "--triton", triton)
        assert r.returncode == 2, r.stderr
        assert "inside" in _one_line(r)
        assert not b.exists()


def test_sighup_ends_a_command_like_ctrl_c(base, tmp_path):
    slow = """
        import sys, time, nibabel
        real = nibabel.save
        def save(*a, **k):
            print("SAVING", flush=True); time.sleep(30); return real(*a, **k)
        nibabel.save = save
        from pddnet.cli import main
        main(sys.argv[1:], prog_name="pddnet")
    """
    out = tmp_path / "out"
    p = subprocess.Popen([sys.executable, "-c", textwrap.dedent(slow), "register", "--model",
                          str(base["bundle"]), "--fixed", str(base["fixed"]), "--moving",
                          str(base["moving"]), "--out", str(out)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONPATH": str(SRC)})
    for line in p.stdout:  # the command's own lines come first
        if line.strip() == "SAVING":
            break
    p.send_signal(signal.SIGHUP)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 129, err
    assert err.strip().splitlines()[-1] == "interrupted by SIGHUP: no partial outputs were left"
    assert all(ln.startswith("note: ") for ln in err.strip().splitlines()[:-1]), err
    assert not out.exists() and sorted(x.name for x in tmp_path.iterdir()) == []


def test_a_signal_inside_a_destructor_still_ends_the_command(tmp_path):
    """A signal whose handler runs inside ``__del__`` (nibabel's OrderedSet, for one) raises
    where Python can only print "Exception ignored" and go on; the command must still end as
    interrupted (status 143, the one line, no traceback) instead of running to its end."""
    script = """
        import os, signal, sys, time
        from pddnet.cli.errors import friendly, install_signal_handlers

        class KilledWhileCollected:
            def __del__(self):
                os.kill(os.getpid(), signal.SIGTERM)
                for _ in range(100000):  # the handler runs here, inside the destructor
                    pass

        @friendly
        def command():
            obj = KilledWhileCollected()
            del obj
            for _ in range(1000):
                time.sleep(0.001)
            print("RAN TO ITS END", flush=True)

        install_signal_handlers()
        command()
    """
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True,
                       text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(SRC)})
    assert r.returncode == 143, (r.stdout, r.stderr)
    assert "RAN TO ITS END" not in r.stdout
    assert "Traceback" not in r.stderr and "Exception ignored" not in r.stderr, r.stderr
    assert r.stderr.strip() == "interrupted by SIGTERM: no partial outputs were left"
