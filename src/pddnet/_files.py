"""The ground floor for files: atomic writes of files and folders, SHA-256 checksums, JSON.

Every writer in pddnet goes through :func:`atomic_write` or :func:`atomic_directory`: data
lands in a temporary file (or folder) beside the destination and is renamed into place only when
complete, so an error or Ctrl-C never leaves a partial output. Standard library only.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import math
import os
import secrets
import shutil
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable, Iterator

from pddnet.errors import PddnetError


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it to ``path`` when the block succeeds.

    The temporary file keeps the final suffixes (so writers that infer the format from the name,
    such as nibabel, still work). On any exception, including KeyboardInterrupt, it is removed.
    """
    final = Path(path)
    if final.exists() and not overwrite:
        raise PddnetError(f"{final} already exists; remove it or pass --overwrite")
    final.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(final.suffixes)
    # the name is known before the file exists, so an interrupt at any instant can remove it
    tmp = final.parent / f".{final.name}.{secrets.token_hex(4)}.partial{suffix}"
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        yield tmp
        # created 0600; give the result the permissions a plain open() would
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        _fsync_file(tmp)
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, *, overwrite: bool = False,
                     report: Callable[[str], None] | None = None,
                     keep: Callable[[str], bool] | None = None) -> Iterator[Path]:
    """Yield an empty staging folder beside ``path``; it becomes ``path`` when the block succeeds.

    The one transactional output of pddnet (files inside are written plainly; the folder is
    the unit): a registration's outputs, a bundle, a Triton repository, a report.

    - **Lock.** An advisory lock (``flock`` on ``.<name>.lock`` beside ``path``) is held from
      before the staging folder exists until the swap is done: a second writer of the same
      ``path`` is refused at once, with the holder's PID. The kernel drops the lock when its
      process dies, so a killed writer never blocks the next one.
    - **Stale staging.** Staging (``.<name>.*.partial``) and swap (``.<name>.*.old``) folders
      left by a killed writer are removed (and reported) by the next writer; a swap interrupted
      after the old folder was moved aside and before the new one moved in is rolled back, so
      ``path`` holds the previous result again.
    - **Swap.** Every file is fsynced, then the staging folder is exchanged with ``path`` in one
      ``renameat2(RENAME_EXCHANGE)`` where the kernel has it (Linux), else renamed in two steps
      (old aside, new in; the rollback above covers the gap). ``path`` thus holds the old
      complete result or the new complete one at every instant, whatever interrupts the block:
      an exception, Ctrl-C, SIGTERM (the CLI turns it into an exception), ``kill -9``, a full
      disk (ENOSPC), a read-only file system.
    - **What is replaced.** By default the folder is the result: an existing non-empty
      ``path`` is refused unless ``overwrite``, and then replaced as a whole. Where users keep
      other files in the folder (``--out`` of ``pddnet register``), ``keep(name)`` says which
      top-level entries are theirs: those are hard-linked into the staging folder first (the
      same files, no copy), so the swap keeps them, and only the other entries count as an
      existing result.
    """
    final = Path(path)
    report = report or _stderr
    if final.exists() and not final.is_dir():
        raise PddnetError(f"{final} exists and is not a folder; choose another output path")
    created = [p for p in final.parents if not p.exists()]  # removed again on failure
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PddnetError(f"cannot create {final.parent} ({exc.strerror}); choose a writable "
                          "location for the output") from exc
    try:
        with folder_lock(final):
            yield from _transaction(final, overwrite, report, keep)
    except BaseException:
        for d in created:  # innermost first; rmdir refuses a folder something else wrote into
            with contextlib.suppress(OSError):
                d.rmdir()
        raise


def _transaction(final: Path, overwrite: bool, report: Callable[[str], None],
                 keep: Callable[[str], bool] | None) -> Iterator[Path]:
    """The body of :func:`atomic_directory`, run with the lock held."""
    for note in recover_stale(final):
        report(note)
    _check_replaceable(final, overwrite, keep)
    # the name is known before the folder exists, so an interrupt at any instant can remove it
    stage = final.parent / f".{final.name}.{secrets.token_hex(4)}.partial"
    try:
        try:
            os.mkdir(stage, 0o700)
        except OSError as exc:
            raise PddnetError(f"cannot create an output folder beside {final} ({exc.strerror}); "
                              "choose a writable location for the output") from exc
        if keep is not None and final.is_dir():
            for entry in sorted(final.iterdir()):
                if keep(entry.name):
                    _link_tree(entry, stage / entry.name)
        yield stage
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(stage, 0o777 & ~umask)
        _fsync_tree(stage)
        if final.exists():
            old = _swap(stage, final)
            _fsync_dir(final.parent)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(stage, final)
            _fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def check_writable(path: str | os.PathLike) -> None:
    """Refuse, before any long work, an output ``path`` whose folder cannot be written: a
    probe file is created and removed beside it (creating no folder)."""
    final = Path(path)
    parent = next((p for p in (final.parent, *final.parent.parents) if p.exists()), Path("."))
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".probe", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise PddnetError(f"cannot write the output {final}: {parent} is not writable "
                          f"({exc.strerror}); choose a writable location") from exc


def _stderr(message: str) -> None:
    print(f"note: {message}", file=sys.stderr)


@contextlib.contextmanager
def folder_lock(path: str | os.PathLike) -> Iterator[Path]:
    """Hold the advisory write lock of the output ``path`` (see :func:`atomic_directory`).

    The lock is ``flock`` on ``.<name>.lock`` beside ``path``, holding the holder's PID. The
    file is removed on release while still locked; a writer that locked a file removed under
    it (the path no longer names the inode it holds) starts again, so two writers can never
    hold different files. A killed holder's file is left unlocked and reused."""
    import fcntl

    final = Path(path)
    lock = final.parent / f".{final.name}.lock"
    fd = -1
    held = False
    try:
        while not held:
            try:
                fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise PddnetError(f"cannot create the lock file {lock} ({exc.strerror}); choose "
                                  "a writable location for the output") from exc
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                raise PddnetError(f"{final} is being written by another pddnet process (PID "
                                  f"{holder}); wait for it to finish or choose another output") \
                    from None
            try:
                held = os.stat(lock).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                held = False
            if not held:  # locked a file its holder had just removed: take the lock again
                os.close(fd)
                fd = -1
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield lock
    finally:
        if held:  # only the holder may remove the file (another writer may hold it otherwise)
            with contextlib.suppress(OSError):
                os.unlink(lock)
        if fd >= 0:
            os.close(fd)  # releases the lock


def recover_stale(path: str | os.PathLike) -> list[str]:
    """Clean what a killed writer of ``path`` left beside it; returns what was done.

    Call with the lock held. A swap cut between its two renames (``path`` missing, its old
    version at ``.<name>.*.old``) is rolled back first; then every staging and old folder goes.
    """
    final = Path(path)
    notes = []
    stale = sorted(final.parent.glob(f".{glob.escape(final.name)}.*.partial")) + \
        sorted(final.parent.glob(f".{glob.escape(final.name)}.*.old"))
    olds = [p for p in stale if p.name.endswith(".old") and (p / final.name).is_dir()]
    if not final.exists() and olds:
        os.rename(olds[-1] / final.name, final)
        notes.append(f"restored {final} from an interrupted replacement (the new result was not "
                     "complete)")
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
        notes.append(f"removed {p.name}, left beside {final} by an interrupted pddnet run")
    return notes


def _check_replaceable(final: Path, overwrite: bool, keep: Callable[[str], bool] | None) -> None:
    if not final.exists():
        return
    taken = sorted(p.name for p in final.iterdir() if keep is None or not keep(p.name))
    if taken and not overwrite:
        more = f" and {len(taken) - 5} more" if len(taken) > 5 else ""
        raise PddnetError(f"{final} already holds {', '.join(taken[:5])}{more}; choose another "
                          "folder, remove them, or pass --overwrite (overwrite=True)")


def _link_tree(src: Path, dst: Path) -> None:
    """``dst`` holds the same files as ``src`` (hard links; symbolic links copied as links)."""
    if src.is_symlink():
        os.symlink(os.readlink(src), dst)
    elif src.is_dir():
        dst.mkdir()
        for child in src.iterdir():
            _link_tree(child, dst / child.name)
    else:
        try:
            os.link(src, dst)
        except OSError:  # a file system without hard links
            shutil.copy2(src, dst)


def _swap(stage: Path, final: Path) -> Path:
    """Put ``stage`` at ``final``; returns where the old ``final`` now is (to delete)."""
    if _exchange(stage, final):
        return stage
    old = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".old", dir=final.parent))
    os.rename(final, old / final.name)
    os.rename(stage, final)
    return old


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically exchange two paths (Linux ``renameat2``); False where unsupported."""
    import ctypes
    import errno

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EPERM, errno.ENOTSUP):
        return False  # this file system or kernel cannot exchange: two renames instead
    raise OSError(err, os.strerror(err), str(b))


def _fsync_file(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            _fsync_file(os.path.join(dirpath, name))
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot fsync a folder; the files themselves are synced
    finally:
        os.close(fd)


def sha256_bytes(data: bytes) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks (models and engines can be large)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def jsonable(obj: Any) -> Any:
    """Deep-copy ``obj`` into strict-JSON-safe types: NaN/inf -> ``None``, numpy scalars and
    arrays (anything with ``tolist``) -> Python numbers and lists, dict keys -> ``str``. Use when
    writing a report; metric functions themselves keep NaN/inf so that means and checks stay
    honest."""
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if hasattr(obj, "tolist") and not isinstance(obj, (str, bytes)):
        return jsonable(obj.tolist())
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, bool):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    return obj


def write_json(path: str | os.PathLike, obj: Any, *, overwrite: bool = True) -> Path:
    """Write ``jsonable(obj)`` as strict, indented JSON to ``path``, atomically."""
    with atomic_write(path, overwrite=overwrite) as tmp:
        tmp.write_text(json.dumps(jsonable(obj), indent=2, allow_nan=False) + "\n")
    return Path(path)


def read_json(path: str | os.PathLike) -> Any:
    """The JSON in ``path``, or ``None`` when it is missing or not JSON (callers that must
    refuse such a file check for ``None`` and say why)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
