"""The backend base class: one interface for every inference engine (Polygraphy-style runner).

A backend runs one ONNX (sub-)model. :class:`Backend` owns everything that is the same for all
engines -- loading on :meth:`~Backend.activate` (or ``with backend:``), checking the feeds
against the model's declared inputs, timing every call -- and a subclass overrides four small
hooks:

``_load_impl()``
    build the engine / session; called once by :meth:`~Backend.activate`.
``_input_specs_impl() -> list[TensorSpec]``
    the declared inputs, read from the loaded engine.
``_run_impl(feeds) -> dict[str, np.ndarray]``
    one inference; ``feeds`` are already checked and C-contiguous.
``_describe_impl() -> dict``
    what to record in a summary (providers, threads, versions, ...).

and optionally ``_unload_impl()``. A TensorRT backend plugs in the same way (build or
deserialise the engine in ``_load_impl``, bind host/device buffers in ``_run_impl``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from pddnet.errors import PddnetError


@dataclass(frozen=True)
class TensorSpec:
    """A declared input: name, numpy dtype and shape (``None`` or a string marks a free axis)."""

    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...]

    def describe(self) -> str:
        dims = ", ".join("?" if not isinstance(d, int) else str(d) for d in self.shape)
        return f"{self.name}: {np.dtype(self.dtype).name} ({dims})"


class Backend:
    """Base class of the runtime backends. Subclasses set :attr:`name` and override the hooks.

    ``model`` is whatever the subclass loads (serialised ONNX bytes, an ``onnx.ModelProto``,
    a path, an engine); ``label`` names this backend in messages (e.g. ``"features"``).
    Nothing is loaded until :meth:`activate`. After each :meth:`run`,
    :attr:`last_run_ms` holds its wall time in milliseconds; :attr:`load_ms` the load time.
    """

    name = "base"

    def __init__(self, model: Any, *, label: str = "model"):
        self._model = model
        self.label = label
        self.is_active = False
        self.load_ms: float | None = None
        self.last_run_ms: float | None = None
        self.run_count = 0
        self._specs: list[TensorSpec] | None = None

    # -- hooks ----------------------------------------------------------------------------
    def _load_impl(self) -> None:
        raise NotImplementedError

    def _unload_impl(self) -> None:
        pass

    def _input_specs_impl(self) -> list[TensorSpec]:
        raise NotImplementedError

    def _run_impl(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def _describe_impl(self) -> dict[str, Any]:
        return {}

    # -- lifecycle ------------------------------------------------------------------------
    def activate(self) -> "Backend":
        """Load the model (once); returns ``self``."""
        if not self.is_active:
            t0 = time.perf_counter()
            self._load_impl()
            self._specs = list(self._input_specs_impl())
            self.load_ms = (time.perf_counter() - t0) * 1e3
            self.is_active = True
        return self

    def deactivate(self) -> None:
        """Free the engine/session; :meth:`activate` may load it again."""
        if self.is_active:
            self._unload_impl()
            self.is_active = False
            self._specs = None

    def __enter__(self) -> "Backend":
        return self.activate()

    def __exit__(self, *exc: object) -> None:
        self.deactivate()

    # -- introspection --------------------------------------------------------------------
    @property
    def input_specs(self) -> list[TensorSpec]:
        self._require_active("input_specs")
        assert self._specs is not None
        return list(self._specs)

    def describe(self) -> dict[str, Any]:
        """``{"backend": name, "label": ..., **_describe_impl()}`` for summaries."""
        out: dict[str, Any] = {"backend": self.name, "label": self.label}
        if self.is_active:
            out.update(self._describe_impl())
        return out

    # -- inference ------------------------------------------------------------------------
    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Check ``feeds`` against :attr:`input_specs`, run once, return ``{output name: array}``.

        Raises :class:`PddnetError` naming the expected and the received input for a missing or
        unexpected name, a non-array, a wrong dtype (no silent casts), a wrong rank or a wrong
        size along a fixed axis.
        """
        self._require_active("run")
        checked = self.check_feeds(feeds)
        t0 = time.perf_counter()
        out = self._run_impl(checked)
        self.last_run_ms = (time.perf_counter() - t0) * 1e3
        self.run_count += 1
        return out

    def check_feeds(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Validate ``feeds`` (see :meth:`run`); returns them as C-contiguous arrays."""
        specs = self.input_specs
        where = f"{self.name} backend ({self.label})"
        if not isinstance(feeds, Mapping):
            raise PddnetError(f"{where}: feeds must be a dict of name -> numpy array, received "
                              f"{type(feeds).__name__}")
        expected = [s.name for s in specs]
        missing = [n for n in expected if n not in feeds]
        extra = [n for n in feeds if n not in expected]
        if missing or extra:
            raise PddnetError(
                f"{where}: input names: expected {expected}, received {list(feeds)}"
                + (f"; missing {missing}" if missing else "")
                + (f"; unexpected {extra}" if extra else ""))
        out: dict[str, np.ndarray] = {}
        for spec in specs:
            arr = feeds[spec.name]
            if not isinstance(arr, np.ndarray):
                raise PddnetError(f"{where}: input '{spec.name}': expected a numpy array "
                                  f"({spec.describe()}), received {type(arr).__name__}")
            if arr.dtype != spec.dtype:
                raise PddnetError(
                    f"{where}: input '{spec.name}' dtype: expected {np.dtype(spec.dtype).name}, "
                    f"received {arr.dtype.name}; convert with .astype(np.{np.dtype(spec.dtype).name})")
            if not _shape_matches(arr.shape, spec.shape):
                raise PddnetError(
                    f"{where}: input '{spec.name}' shape: expected {_fmt_shape(spec.shape)}, "
                    f"received {tuple(arr.shape)}")
            out[spec.name] = np.ascontiguousarray(arr)
        return out

    def _require_active(self, what: str) -> None:
        if not self.is_active:
            raise PddnetError(f"{self.name} backend ({self.label}): {what} needs a loaded model; "
                              "call activate() or use the backend in a `with` block")


def _shape_matches(shape: Sequence[int], declared: Sequence[int | str | None]) -> bool:
    if len(shape) != len(declared):
        return False
    return all(not isinstance(d, int) or d < 0 or d == n for n, d in zip(shape, declared))


def _fmt_shape(shape: Sequence[int | str | None]) -> str:
    return "(" + ", ".join(str(d) if isinstance(d, int) and d >= 0 else "?" for d in shape) + ")"
