"""How every ``pddnet`` command ends: the exit-status contract, one line per failure.

==========  ===============================================================================
status      meaning
==========  ===============================================================================
0           success
1           a check ran and failed (a validation gate, ``verify`` of a damaged bundle,
            ``data info`` with problems)
2           bad input, usage or environment: the message says what and what to do (a
            missing extra names its ``pip install``; a full or read-only disk names the file)
3           an internal error (a bug): one line; ``pddnet --debug ...`` shows the traceback
128 + N     interrupted by signal N: 130 Ctrl-C (SIGINT), 143 SIGTERM, 129 SIGHUP; every
            output is left as it was before the command (the writers are transactional)
==========  ===============================================================================

No traceback reaches a user unless ``--debug`` (or ``PDDNET_DEBUG=1``) asks for it. One
module, so the command modules share it without importing :mod:`pddnet.cli` (which ``python
-m pddnet.cli`` runs as ``__main__``).
"""

from __future__ import annotations

import _thread
import errno
import functools
import os
import signal
import sys
import threading
import time

import click

from pddnet._optional import install_hint
from pddnet.errors import CheckFailed, PddnetError

#: packages whose absence is an environment problem (status 2), not a bug
OPTIONAL_PACKAGES = ("torch", "tensorrt", "triton", "tritonclient", "cuda", "matplotlib")


class Interrupted(KeyboardInterrupt):
    """SIGINT, SIGTERM or SIGHUP, raised where the program is, so every writer cleans up as
    for Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


#: the signals received by this process (a signal inside a C extension's import can surface as
#: an ImportError or another exception; it still ends the command as an interruption)
_RECEIVED: list[int] = []


def _raise_interrupted(signum, frame):
    _RECEIVED.append(signum)
    raise Interrupted(signum)


def _redeliver_swallowed(unraisable, previous_hook=sys.__unraisablehook__) -> None:
    """An interruption raised inside a ``__del__``, a weakref callback or the garbage collector
    cannot propagate: Python prints it as "Exception ignored" and goes on, so the signal would be
    lost and the command would run to its end. Send the signal to the main thread again instead,
    silently, from a helper thread once this hook has returned: the handler then raises in the
    interrupted code, where the exception propagates (sent from here, it would run at the
    hook's next call and be ignored again)."""
    if isinstance(unraisable.exc_value, Interrupted):
        try:
            _thread.start_new_thread(_send_to_main_thread, (unraisable.exc_value.signum,))
        except RuntimeError:  # the interpreter is shutting down: the command has ended anyway
            pass
        return
    previous_hook(unraisable)


def _send_to_main_thread(signum: int) -> None:
    time.sleep(0.002)  # let the hook return first: it holds the GIL until it does
    signal.pthread_kill(threading.main_thread().ident, signum)


def install_signal_handlers() -> None:
    """SIGINT (Ctrl-C), SIGTERM (timeouts, systemd, ``docker stop``) and SIGHUP (a closed
    terminal) end a command alike, as an exception every writer cleans up after. Only possible
    in the main thread; elsewhere nothing changes."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        try:
            signal.signal(sig, _raise_interrupted)
        except ValueError:  # not the main thread (e.g. a test runner's worker)
            return
    if getattr(sys.unraisablehook, "func", None) is not _redeliver_swallowed:
        sys.unraisablehook = functools.partial(_redeliver_swallowed,
                                               previous_hook=sys.unraisablehook)


def debug_enabled() -> bool:
    return os.environ.get("PDDNET_DEBUG", "") not in ("", "0")


def _os_error(exc: OSError) -> str:
    where = f" {exc.filename}" if exc.filename else ""
    if exc.errno == errno.ENOSPC:
        return (f"the disk is full while writing{where}; nothing was replaced -- free space or "
                "choose another output location")
    if exc.errno == errno.EROFS:
        return f"cannot write{where}: the file system is read-only; choose a writable location"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return f"permission denied for{where}; choose a location you can write to"
    return f"{exc.strerror or exc}{(' (' + where.strip() + ')') if where else ''}"


def friendly(fn):
    """Run a command under the exit-status contract of this module."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if debug_enabled():
            return fn(*args, **kwargs)
        try:
            return fn(*args, **kwargs)
        except CheckFailed as exc:
            click.echo(f"failed: {_one_line(exc)}", err=True)
            sys.exit(1)
        except PddnetError as exc:
            click.echo(f"error: {_one_line(exc)}", err=True)
            sys.exit(2)
        except KeyboardInterrupt as exc:
            _interrupted(exc.signum if isinstance(exc, Interrupted) else signal.SIGINT)
        except ImportError as exc:
            if _RECEIVED:  # a signal during a C extension's import
                _interrupted(_RECEIVED[-1])
            root = (exc.name or "").split(".")[0]
            if root not in OPTIONAL_PACKAGES:
                raise _internal(exc) from exc
            click.echo(f"error: this command needs the '{root}' package, which is not installed "
                       f"here; install it with: {install_hint(root)}", err=True)
            sys.exit(2)
        except MemoryError:
            click.echo("error: not enough memory for this input; use a smaller input or a "
                       "machine with more memory", err=True)
            sys.exit(2)
        except OSError as exc:
            click.echo(f"error: {_os_error(exc)}", err=True)
            sys.exit(2)
        except click.exceptions.Exit:
            raise
        except click.ClickException:
            raise
        except Exception as exc:  # noqa: BLE001 - the contract: one line, never a traceback
            if _RECEIVED:
                _interrupted(_RECEIVED[-1])
            raise _internal(exc) from exc

    return wrapper


def _interrupted(signum: int) -> None:
    by = "" if signum == signal.SIGINT else f" by {signal.Signals(signum).name}"
    click.echo(f"interrupted{by}: no partial outputs were left", err=True)
    sys.exit(128 + int(signum))


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def _internal(exc: BaseException) -> SystemExit:
    click.echo(f"internal error: {type(exc).__name__}: {_one_line(exc)}; this is a bug in "
               "pddnet -- rerun with `pddnet --debug ...` and report the traceback", err=True)
    return SystemExit(3)
