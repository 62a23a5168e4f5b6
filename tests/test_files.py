"""The ground floor for files (pddnet._files): the transactional output folder, its lock and its
recovery, the atomic file, JSON and checksums.

Each case builds real folders in tmp_path with fresh random content and asserts what is on disk
afterwards: the previous result intact after an exception, Ctrl-C or an interrupted swap; the
new one complete after success; nothing left beside the target; the lock refusing a second
writer with the holder's PID; files the caller keeps carried over; the two-rename fallback
(file systems without ``renameat2``) and its roll-back.

Not tested here: real signals and ``kill -9`` against the CLI (tests/cli/test_fault_injection.py).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from pddnet import _files
from pddnet._files import (
    atomic_directory,
    atomic_write,
    folder_lock,
    jsonable,
    read_json,
    recover_stale,
    sha256_bytes,
    sha256_file,
    write_json,
)
from pddnet.errors import PddnetError

SRC = Path(__file__).resolve().parents[1] / "src"


def _tree(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes()
            for p in sorted(path.rglob("*")) if p.is_file()} if path.exists() else {}


def _result(folder: Path, rng) -> dict[str, bytes]:
    """Write a random result (two files and a subfolder) into ``folder``."""
    files = {"a.bin": rng.bytes(1000), "sub/b.bin": rng.bytes(300), "c.json": b'{"x": 1}'}
    for rel, data in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    return files


def _beside(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}."))


def test_new_folder_appears_complete(tmp_path):
    rng = np.random.default_rng()
    out = tmp_path / "deep" / "out"
    with atomic_directory(out) as stage:
        assert stage.parent == out.parent and stage.name.startswith(".out.")
        want = _result(stage, rng)
        assert not out.exists()  # nothing visible before the block ends
    assert _tree(out) == want and _beside(out) == []


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
def test_failure_keeps_the_old_result(tmp_path, exc):
    rng = np.random.default_rng()
    out = tmp_path / "out"
    with atomic_directory(out) as stage:
        old = _result(stage, rng)
    with pytest.raises(type(exc)):
        with atomic_directory(out, overwrite=True) as stage:
            _result(stage, rng)
            raise exc
    assert _tree(out) == old and _beside(out) == []


def test_failure_in_a_new_nested_folder_leaves_nothing(tmp_path):
    out = tmp_path / "a" / "b" / "out"
    with pytest.raises(RuntimeError):
        with atomic_directory(out) as stage:
            (stage / "x").write_text("partial")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []  # the parents it created are gone too


def test_existing_result_refused_without_overwrite_and_replaced_with_it(tmp_path):
    rng = np.random.default_rng()
    out = tmp_path / "out"
    with atomic_directory(out) as stage:
        old = _result(stage, rng)
    with pytest.raises(PddnetError, match="already holds .*--overwrite"):
        with atomic_directory(out) as stage:
            pytest.fail("the block must not run")
    assert _tree(out) == old
    with atomic_directory(out, overwrite=True) as stage:
        (stage / "only.txt").write_text("new")
    assert _tree(out) == {"only.txt": b"new"}  # replaced as a whole


def test_keep_carries_the_callers_files_and_replaces_the_rest(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "mine").mkdir()
    (out / "mine" / "x.txt").write_text("also mine")
    (out / "result.bin").write_bytes(b"old result")
    ours = {"result.bin", "extra.bin"}
    with pytest.raises(PddnetError, match="result.bin"):  # our file exists: refused
        with atomic_directory(out, keep=lambda n: n not in ours):
            pass
    inode = (out / "notes.txt").stat().st_ino
    with atomic_directory(out, overwrite=True, keep=lambda n: n not in ours) as stage:
        (stage / "result.bin").write_bytes(b"new result")
    assert _tree(out) == {"notes.txt": b"mine", "mine/x.txt": b"also mine",
                          "result.bin": b"new result"}
    assert (out / "notes.txt").stat().st_ino == inode  # the same file (a hard link), not a copy


def test_the_lock_refuses_a_second_writer_with_the_holders_pid(tmp_path):
    out = tmp_path / "out"
    with folder_lock(out) as lock:
        assert lock.read_text().strip() == str(os.getpid())
        with pytest.raises(PddnetError, match=f"another pddnet process \\(PID {os.getpid()}\\)"):
            with atomic_directory(out):
                pass
        # from another process too
        script = textwrap.dedent(f"""
            import sys; sys.path.insert(0, {str(SRC)!r})
            from pddnet._files import folder_lock
            from pddnet.errors import PddnetError
            try:
                with folder_lock({str(out)!r}):
                    print("GOT IT")
            except PddnetError as exc:
                print(exc)
        """)
        r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
        assert f"PID {os.getpid()}" in r.stdout and "GOT IT" not in r.stdout, r.stdout + r.stderr
    assert not lock.exists()  # removed by its holder


def test_a_killed_writers_leftovers_are_cleaned_and_reported(tmp_path):
    rng = np.random.default_rng()
    out = tmp_path / "out"
    with atomic_directory(out) as stage:
        old = _result(stage, rng)
    # what kill -9 leaves: a stale lock file (unlocked), a staging folder, an old folder
    (tmp_path / ".out.lock").write_text("99999\n")
    (tmp_path / ".out.dead.partial").mkdir()
    (tmp_path / ".out.dead.partial" / "half.bin").write_bytes(rng.bytes(10))
    (tmp_path / ".out.gone.old").mkdir()
    notes = []
    with atomic_directory(out, overwrite=True, report=notes.append) as stage:
        new = _result(stage, rng)
    assert _tree(out) == new != old
    assert _beside(out) == []
    assert len(notes) == 2 and all("interrupted pddnet run" in n for n in notes)


def test_two_rename_fallback_and_its_roll_back(tmp_path, monkeypatch):
    """Where renameat2 is missing, the swap is two renames; a crash between them leaves the
    target missing and the old version aside, and the next writer restores it first."""
    rng = np.random.default_rng()
    monkeypatch.setattr(_files, "_exchange", lambda a, b: False)
    out = tmp_path / "out"
    with atomic_directory(out) as stage:
        old = _result(stage, rng)
    with atomic_directory(out, overwrite=True) as stage:
        new = _result(stage, rng)
    assert _tree(out) == new and _beside(out) == []
    # a crash between the renames: the first rename done, the process gone
    real_rename = os.rename
    calls = []

    def rename_then_die(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise SystemExit("killed between the renames")
        real_rename(src, dst)

    monkeypatch.setattr(_files.os, "rename", rename_then_die)
    with pytest.raises(SystemExit):
        with atomic_directory(out, overwrite=True) as stage:
            _result(stage, rng)
    monkeypatch.setattr(_files.os, "rename", real_rename)
    assert not out.exists() and any(n.endswith(".old") for n in _beside(out))
    notes = recover_stale(out)
    assert _tree(out) == new and _beside(out) == []
    assert any(n.startswith("restored") for n in notes)
    del old


def test_renameat2_exchange_is_used_where_the_kernel_has_it(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "x").write_text("A")
    (b / "x").write_text("B")
    if not _files._exchange(a, b):
        pytest.skip("this kernel or file system has no renameat2(RENAME_EXCHANGE)")
    assert (a / "x").read_text() == "B" and (b / "x").read_text() == "A"


def test_an_output_path_that_is_a_file_is_refused(tmp_path):
    f = tmp_path / "out"
    f.write_text("a file")
    with pytest.raises(PddnetError, match="not a folder"):
        with atomic_directory(f):
            pass
    assert f.read_text() == "a file"


def test_atomic_write_replaces_only_when_complete(tmp_path):
    rng = np.random.default_rng()
    path = tmp_path / "f.bin"
    old = rng.bytes(500)
    path.write_bytes(old)
    with pytest.raises(RuntimeError):
        with atomic_write(path) as tmp:
            tmp.write_bytes(rng.bytes(700))
            raise RuntimeError("boom")
    assert path.read_bytes() == old and [p.name for p in tmp_path.iterdir()] == ["f.bin"]
    with pytest.raises(PddnetError, match="already exists"):
        with atomic_write(path, overwrite=False):
            pass
    new = rng.bytes(900)
    with atomic_write(path) as tmp:
        tmp.write_bytes(new)
    assert path.read_bytes() == new


def test_json_and_checksums(tmp_path):
    rng = np.random.default_rng()
    data = rng.bytes(3 * (1 << 20) + 17)  # more than one read chunk
    p = tmp_path / "d.bin"
    p.write_bytes(data)
    assert sha256_file(p) == hashlib.sha256(data).hexdigest() == sha256_bytes(data)
    obj = {"a": np.float32(1.5), "b": np.arange(3), 4: [math.nan, math.inf, np.bool_(True)],
           "c": (np.int64(7), "s")}
    assert jsonable(obj) == {"a": 1.5, "b": [0, 1, 2], "4": [None, None, True], "c": [7, "s"]}
    write_json(tmp_path / "x.json", obj)
    assert json.loads((tmp_path / "x.json").read_text()) == jsonable(obj)
    assert read_json(tmp_path / "x.json") == jsonable(obj)
    (tmp_path / "bad.json").write_text("{not json")
    assert read_json(tmp_path / "bad.json") is None and read_json(tmp_path / "none") is None


def test_check_writable_refuses_a_folder_it_cannot_write(tmp_path):
    from pddnet._files import check_writable

    check_writable(tmp_path / "new" / "deeper" / "out")  # the nearest existing folder counts
    assert list(tmp_path.iterdir()) == []  # the probe creates no folder and leaves no file
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() == 0:  # root ignores permission bits: a read-only bind mount instead
        ok = subprocess.run(["mount", "--bind", str(ro), str(ro)], capture_output=True)
        if ok.returncode != 0:
            pytest.skip(f"cannot make a read-only folder as root here ({ok.stderr.strip()})")
        subprocess.run(["mount", "-o", "remount,bind,ro", str(ro)], capture_output=True)
    else:
        ro.chmod(0o555)
    try:
        with pytest.raises(PddnetError, match="not writable"):
            check_writable(ro / "out")
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", str(ro)], capture_output=True)
        else:
            ro.chmod(0o755)
