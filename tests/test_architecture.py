"""The package layout: imports run downward only (docs/architecture.md), and the torch-free
packages import with torch unavailable.

Two checks, as Polygraphy does for its backends:
- statically, every ``import pddnet.X`` in every module (at module level or inside a
  function, since a lazy import is still a dependency) goes to a package of a lower layer or
  to the module's own package; and only the PyTorch side (plus the few commands that export
  from a checkpoint) imports ``pddnet.model`` or ``pddnet.export``;
- dynamically, in a subprocess where ``import torch`` fails, every submodule of the torch-free
  packages imports, and the pddnet packages that got loaded are all from the same or a lower
  layer than the one imported.

Not tested here: what the modules do (their own test modules); an environment where torch is
absent from disk (blocking it in sys.modules is equivalent for imports).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PKG = SRC / "pddnet"

#: bottom to top; a package may import its own modules and those of lower layers only
LAYERS: list[set[str]] = [
    {"errors"},
    {"pddnet", "_optional", "_files", "_progress"},
    {"spec"},
    {"graph", "metrics"},
    {"data", "weights"},
    {"model"},
    {"export", "backends"},
    {"runtime"},
    {"validation"},
    {"calibration"},
    {"deploy"},
    {"cli"},
    {"__main__"},  # python -m pddnet
]
RANK = {pkg: i for i, layer in enumerate(LAYERS) for pkg in layer}

#: the only modules outside pddnet.model / pddnet.export that may import them (lazily, inside
#: the functions that train, export or run the reference)
TORCH_SIDE_OK = ("pddnet.backends.torch", "pddnet.validation.", "pddnet.calibration.api",
                 "pddnet.calibration.search", "pddnet.deploy.demo", "pddnet.cli.")

#: packages that must import and run with torch unavailable
TORCH_FREE = ("spec", "graph", "metrics", "data", "weights", "backends", "runtime")


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "pddnet"


def _pddnet_imports(path: Path) -> list[tuple[int, str]]:
    """``(line, imported module)`` for every pddnet import in the file, lazy ones included."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.startswith("pddnet")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
                and node.module.startswith("pddnet"):
            if node.module == "pddnet":  # from pddnet import metrics / __version__ / _files
                out += [(node.lineno, f"pddnet.{a.name}") if (PKG / a.name).exists()
                        or (PKG / f"{a.name}.py").exists() else (node.lineno, "pddnet")
                        for a in node.names]
            else:
                out.append((node.lineno, node.module))
    return out


def _modules() -> list[Path]:
    return sorted(p for p in PKG.rglob("*.py") if "__pycache__" not in p.parts)


def _edges() -> list[tuple[str, int, str]]:
    return [(_module_name(p), line, target) for p in _modules()
            for line, target in _pddnet_imports(p)]


def test_every_package_has_a_layer():
    found = {_package(_module_name(p)) for p in _modules()}
    assert found <= set(RANK), f"packages without a layer in LAYERS: {sorted(found - set(RANK))}"


def test_no_relative_imports():
    """Relative imports would escape the static check below; the project uses none."""
    bad = [f"{_module_name(p)}:{n.lineno}" for p in _modules()
           for n in ast.walk(ast.parse(p.read_text())) if isinstance(n, ast.ImportFrom) and n.level]
    assert not bad, bad


def _upward(edges) -> list[str]:
    out = []
    for module, line, target in edges:
        a, b = _package(module), _package(target)
        if a != b and RANK[b] >= RANK[a]:
            out.append(f"{module}:{line} imports {target} ({a} is layer {RANK[a]}, "
                       f"{b} is layer {RANK[b]})")
    return out


def test_imports_run_downward_only():
    upward = _upward(_edges())
    assert not upward, "imports that do not run downward:\n" + "\n".join(upward)


def test_only_the_torch_side_imports_model_and_export():
    bad = []
    for module, line, target in _edges():
        if _package(target) in ("model", "export") and _package(module) not in ("model", "export") \
                and not module.startswith(TORCH_SIDE_OK):
            bad.append(f"{module}:{line} imports {target}")
    assert not bad, "modules outside the PyTorch side importing it:\n" + "\n".join(bad)


def test_the_checks_catch_an_upward_import(tmp_path):
    """The static check is not vacuous: an upward import in a module is reported."""
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from pddnet.runtime.session import Registrar\n"
                     "from pddnet import metrics\nimport pddnet.cli\n")
    got = sorted(_pddnet_imports(probe))
    assert got == [(2, "pddnet.runtime.session"), (3, "pddnet.metrics"), (4, "pddnet.cli")]
    found = _upward([("pddnet.data.probe", line, t) for line, t in got])
    assert [f.split(" imports ")[1].split()[0] for f in found] == ["pddnet.runtime.session",
                                                                   "pddnet.cli"]
    # the same import between two packages of one layer is refused too (export | backends)
    assert _upward([("pddnet.export.x", 1, "pddnet.backends.base")])


TORCH_FREE_SCRIPT = textwrap.dedent(r"""
    import importlib, json, pkgutil, sys
    for name in ("torch", "tensorrt", "triton"):
        sys.modules[name] = None          # `import torch` (etc.) now raises ImportError
    import pddnet
    result = {}
    for pkg_name in sys.argv[1:]:
        pkg = importlib.import_module(f"pddnet.{pkg_name}")
        names = [pkg.__name__]
        if hasattr(pkg, "__path__"):
            names += [m.name for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + ".")]
        for name in names:
            if name == "pddnet.backends.torch":
                continue                  # the PyTorch reference backend: imports torch
            before = set(sys.modules)
            importlib.import_module(name)
            loaded = sorted(m for m in set(sys.modules) - before if m.startswith("pddnet"))
            result[name] = loaded
    print(json.dumps(result))
""")


@pytest.fixture(scope="module")
def torch_free_imports() -> dict[str, list[str]]:
    proc = subprocess.run([sys.executable, "-c", TORCH_FREE_SCRIPT, *TORCH_FREE],
                          capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(SRC), "PATH": ""})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_torch_free_packages_import_without_torch(torch_free_imports):
    imported = set(torch_free_imports)
    for pkg in TORCH_FREE:
        assert f"pddnet.{pkg}" in imported
    assert "pddnet.runtime.session" in imported and "pddnet.backends.onnxrt" in imported
    assert "pddnet.backends.trt.runner" in imported  # tensorrt is imported lazily


def test_importing_a_module_loads_nothing_above_it(torch_free_imports):
    bad = []
    for module, loaded in torch_free_imports.items():
        rank = RANK[_package(module)]
        bad += [f"importing {module} loaded {m}" for m in loaded
                if RANK[_package(m)] > rank]
        bad += [f"importing {module} loaded {m}" for m in loaded
                if _package(m) in ("model", "export")]
    assert not bad, "\n".join(bad)
