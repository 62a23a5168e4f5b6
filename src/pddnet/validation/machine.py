"""Where a measurement ran and how much memory it took: machine info, peak RSS, child processes.

Peak memory is the process's resident-set high-water mark (``VmHWM`` in ``/proc/self/status``,
the value ``getrusage(RUSAGE_SELF).ru_maxrss`` reports). On Linux it can be reset
(``/proc/self/clear_refs``, value ``5``), so a measurement resets it after the imports and
input preparation and reads it after the model's load and runs: :class:`PeakRss` records the
baseline (RSS at the reset) and the peak; ``peak - baseline`` is what loading and running the
model added. Where the reset is unavailable (not Linux, no write access to ``/proc``) the peak
is the process's lifetime ``ru_maxrss`` and ``reset`` says so.

:func:`run_isolated` runs a function in a fresh ``spawn`` child process, so that each backend's
peak memory (and its thread pools) cannot pollute another's: PyTorch and ONNX Runtime each
keep allocator caches and worker threads for the life of the process.
"""

from __future__ import annotations

import multiprocessing
import os
import platform
import resource
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

_STATUS = "/proc/self/status"


def _status_kb(key: str) -> int | None:
    try:
        with open(_STATUS) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def current_rss_mb() -> float | None:
    """Resident set size now (MB, 10^6 bytes); ``None`` where ``/proc`` is unavailable."""
    kb = _status_kb("VmRSS")
    return None if kb is None else kb * 1024 / 1e6


def peak_rss_mb() -> float:
    """Resident-set high-water mark (MB): ``VmHWM``, else ``ru_maxrss``."""
    kb = _status_kb("VmHWM")
    if kb is None:
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        if sys.platform == "darwin":  # bytes there
            kb //= 1024
    return kb * 1024 / 1e6


def reset_peak_rss() -> bool:
    """Reset the high-water mark to the current RSS (Linux ``clear_refs``); True on success."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


@dataclass
class PeakRss:
    """``with PeakRss() as m: ...`` -> ``m.baseline_mb``, ``m.peak_mb``, ``m.as_dict()``."""

    baseline_mb: float | None = None
    peak_mb: float | None = None
    reset: bool = False

    def __enter__(self) -> "PeakRss":
        self.reset = reset_peak_rss()
        self.baseline_mb = current_rss_mb()
        return self

    def __exit__(self, *exc: object) -> None:
        # Linux folds per-thread RSS counters into VmHWM lazily (in batches of pages), so the
        # high-water mark can read a little below an RSS sampled earlier: never report less
        # than the baseline or the RSS now.
        self.peak_mb = max(v for v in (peak_rss_mb(), self.baseline_mb, current_rss_mb())
                           if v is not None)

    def as_dict(self, *, isolated: bool) -> dict[str, Any]:
        added = (None if self.peak_mb is None or self.baseline_mb is None
                 else self.peak_mb - self.baseline_mb)
        return {
            "peak_rss_mb": self.peak_mb, "baseline_rss_mb": self.baseline_mb,
            "added_rss_mb": added, "isolated": isolated,
            "method": ("VmHWM reset (clear_refs) before the model load, read after the timed "
                       "runs" if self.reset else "ru_maxrss over the process's life"),
        }


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def physical_cores() -> int | None:
    """Distinct (physical id, core id) pairs in /proc/cpuinfo; ``None`` when unknown."""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return None
    cores, phys = set(), "0"
    for line in text.splitlines():
        if line.startswith("physical id"):
            phys = line.split(":")[1].strip()
        elif line.startswith("core id"):
            cores.add((phys, line.split(":")[1].strip()))
    return len(cores) or None


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_info(threads: int | None = None) -> dict[str, Any]:
    """CPU model, logical/physical cores, usable cores, memory, load, library versions."""
    import numpy as np

    info: dict[str, Any] = {
        "cpu_model": cpu_model(),
        "logical_cores": os.cpu_count(),
        "physical_cores": physical_cores(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "threads": threads,
        "memory_gb": None,
        "load_average": load_average(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "onnxruntime": _version("onnxruntime"),
        "torch": _version("torch"),
    }
    kb = None
    try:
        with open("/proc/meminfo") as f:
            kb = int(f.readline().split()[1])
    except (OSError, ValueError, IndexError):
        pass
    if kb:
        info["memory_gb"] = round(kb * 1024 / 1e9, 1)
    from pddnet import __version__

    info["pddnet"] = __version__
    return info


def _version(module: str) -> str | None:
    """A package's version without importing it (``importlib.metadata``)."""
    from importlib import metadata

    try:
        return metadata.version(module)
    except metadata.PackageNotFoundError:
        return None


def run_isolated(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` in a fresh ``spawn`` child process; returns its (picklable)
    result and re-raises its exception. ``fn`` must be importable (a module-level function)."""
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        return pool.submit(fn, *args, **kwargs).result()
