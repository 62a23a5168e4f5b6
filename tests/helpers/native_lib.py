"""The C kernel library as a user without a C compiler has it: not built."""

from __future__ import annotations

from pddnet.backends import native


def pretend_library_absent(monkeypatch) -> None:
    """``PDDNET_NATIVE`` unset and the loader's cache saying "not built", the state
    :mod:`pddnet.backends.native` reports when no library file exists."""
    monkeypatch.delenv(native.ENV, raising=False)
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_lib_error", "the C kernel library is not built (test)")
