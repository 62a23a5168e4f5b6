"""A stand-in for the ``tensorrt`` package with its ``tensorrt.plugin`` API, for tests that
compile the Triton kernels ahead of time and register the plugins on a machine without TensorRT.

It enforces the documented rules of ``tensorrt.plugin``: ``register`` takes tensors, then
attributes of the supported types (no defaults, annotations that are classes), and returns a
``TensorDesc`` or a tuple of them; ``impl`` ends in ``(outputs, stream)``; ``aot_impl`` in
``(outputs, tactic)`` with a 4-tuple return annotation (launch parameters, extra arguments);
plus the SymInt and launch-parameter objects the AOT implementations build.
"""

from __future__ import annotations

from pathlib import Path

FAKE_TENSORRT = 'float32, float16, int32 = "FLOAT", "HALF", "INT32"\n'

FAKE_TENSORRT_PLUGIN = r'''
import inspect, typing
import numpy as np

class TensorDesc:
    def __init__(self, shape_expr=None, dtype=None):
        self.shape_expr, self.dtype = shape_expr, dtype
    def like(self):
        return TensorDesc(self.shape_expr, self.dtype)

class Tensor:
    pass

class SymInt32:
    def __init__(self, value):
        self.value = value.value if isinstance(value, SymInt32) else int(value)

class ShapeExpr(SymInt32):
    is_fake = False
    is_constant = True
    def constant_value(self):
        return self.value
    def __mul__(self, other):
        return ShapeExpr(self.value * (other.value if isinstance(other, SymInt32) else other))

class SymExprs(list):
    pass

class SymIntExprs(SymExprs):
    @classmethod
    def from_tuple(cls, items):
        return cls(items)

class KernelLaunchParams:
    _F = ("grid_x", "grid_y", "grid_z", "block_x", "block_y", "block_z", "shared_mem")
    def __init__(self):
        for f in self._F:
            object.__setattr__(self, f, SymInt32(0 if f == "shared_mem" else 1))
    def __setattr__(self, name, value):
        if name not in self._F:
            raise AttributeError(name)
        object.__setattr__(self, name, SymInt32(value))

def from_shape_expr(shape, dtype):
    return TensorDesc(tuple(s if isinstance(s, ShapeExpr) else ShapeExpr(s) for s in shape), dtype)

REG = {}
NP_DTYPES = (np.int32, np.float32)

def _attr_ok(ann):
    if ann in (int, float, str, bool, bytes):
        return True
    if typing.get_origin(ann) is np.ndarray:
        dt = typing.get_args(typing.get_args(ann)[1])[0]
        return dt in NP_DTYPES
    return False

def register(pid):
    def deco(fn):
        assert pid not in REG
        tensors, attrs = [], []
        for p in inspect.signature(fn).parameters.values():
            assert p.default is inspect.Parameter.empty and not isinstance(p.annotation, str)
            if inspect.isclass(p.annotation) and issubclass(p.annotation, TensorDesc):
                assert not attrs
                tensors.append(p.name)
            else:
                assert _attr_ok(p.annotation), (pid, p.name, p.annotation)
                attrs.append(p.name)
        ret = inspect.signature(fn).return_annotation
        if typing.get_origin(ret) is tuple:
            args = typing.get_args(ret)
            assert args and all(issubclass(a, TensorDesc) for a in args), ret
            n_out = len(args)
        else:
            assert inspect.isclass(ret) and issubclass(ret, TensorDesc)
            n_out = 1
        REG[pid] = dict(register=fn, tensors=tensors, attrs=attrs, n_out=n_out)
        return fn
    return deco

def _check(pid, fn, tail):
    d = REG[pid]
    names = list(inspect.signature(fn).parameters)
    n = len(d["tensors"])
    assert names[:n] == d["tensors"] and names[-2:] == tail, names
    assert [a for a in d["attrs"] if a in names[n:-2]] == names[n:-2], names
    return d

def impl(pid):
    def deco(fn):
        _check(pid, fn, ["outputs", "stream"])["impl"] = fn
        return fn
    return deco

def aot_impl(pid):
    def deco(fn):
        d = _check(pid, fn, ["outputs", "tactic"])
        ret = inspect.signature(fn).return_annotation
        assert typing.get_origin(ret) is tuple and len(typing.get_args(ret)) == 4
        assert issubclass(typing.get_args(ret)[2], KernelLaunchParams)
        assert issubclass(typing.get_args(ret)[3], SymExprs)
        d["aot"] = fn
        return fn
    return deco
'''


def write_fake_tensorrt(folder: Path) -> Path:
    """Write the fake ``tensorrt`` package under ``folder`` (put ``folder`` on PYTHONPATH)."""
    pkg = Path(folder) / "tensorrt"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(FAKE_TENSORRT)
    (pkg / "plugin.py").write_text(FAKE_TENSORRT_PLUGIN)
    return Path(folder)
