"""The TensorRT backend's bookkeeping, run against a fake TensorRT and a fake CUDA runtime.

The fakes implement only what the backend calls, with the documented signatures
(``Runtime.deserialize_cuda_engine``, ``ICudaEngine.num_io_tensors/get_tensor_*``,
``IExecutionContext.set_tensor_address/execute_async_v3``; cudaMalloc-style buffers as
addresses into a dict of numpy arrays). The fake engine computes ``out = 2 * x + y`` so every
copy (host -> device -> engine -> device -> host) is checked end to end. Also: IOPlan alone
(dtypes, dynamic shapes refused, byte sizes), the checks the base class applies to feeds,
refusal of an engine without metadata or from another GPU, ``build="never"`` with an empty
cache, CUDA-graph replay, unload freeing every buffer, the registry names and the clear error
without tensorrt. The ``trt``-marked test at the end builds and runs a real engine and skips
here.

Not tested here: any real CUDA or TensorRT call (no GPU); the cuda_rt wrappers themselves.
"""

from __future__ import annotations

import json
import sys
import types

import numpy as np
import pytest

from pddnet.backends import BACKENDS, create_backend
from pddnet.backends.trt.cache import EngineCache, EngineKey, Environment
from pddnet.backends.trt.io import IOPlan, TensorDesc, numpy_dtype
from pddnet.errors import PddnetError

ENV = Environment("Fake GPU", "9.0", 4, "10.9.0.34")


# ------------------------------------------------------------------------------------------
# IOPlan alone
# ------------------------------------------------------------------------------------------

def test_ioplan_sizes_specs_and_staging():
    plan = IOPlan([TensorDesc("x", True, (1, 2, 3), np.dtype(np.float32)),
                   TensorDesc("h", True, (4,), np.dtype(np.float16)),
                   TensorDesc("y", False, (2, 3), np.dtype(np.float32))])
    assert plan.total_bytes == 24 + 8 + 24
    assert [(s.name, s.shape) for s in plan.specs()] == [("x", (1, 2, 3)), ("h", (4,))]
    host = {"x": np.zeros((1, 2, 3), np.float32), "h": np.zeros(4, np.float16),
            "y": np.ones((2, 3), np.float32)}
    plan.stage_inputs({"x": np.full((1, 2, 3), 2, np.float32), "h": np.ones(4, np.float16)}, host)
    assert host["x"].sum() == 12
    out = plan.collect_outputs(host)
    host["y"][...] = 5
    assert out["y"].sum() == 6  # a copy, not a view of the reused buffer
    with pytest.raises(PddnetError, match="engine takes"):
        plan.stage_inputs({"x": np.zeros((1, 2, 3), np.float64), "h": host["h"]}, host)


def test_ioplan_refusals():
    with pytest.raises(PddnetError, match="dynamic shape"):
        IOPlan([TensorDesc("x", True, (-1, 3), np.dtype(np.float32)),
                TensorDesc("y", False, (3,), np.dtype(np.float32))])
    with pytest.raises(PddnetError, match="duplicate"):
        IOPlan([TensorDesc("x", True, (3,), np.dtype(np.float32)),
                TensorDesc("x", False, (3,), np.dtype(np.float32))])
    with pytest.raises(PddnetError, match="0 outputs"):
        IOPlan([TensorDesc("x", True, (3,), np.dtype(np.float32))])
    assert numpy_dtype(types.SimpleNamespace(name="HALF")) == np.float16
    with pytest.raises(PddnetError, match="BF16"):
        numpy_dtype("DataType.BF16")


# ------------------------------------------------------------------------------------------
# fakes
# ------------------------------------------------------------------------------------------

class FakeCuda:
    """Device memory as numpy byte arrays keyed by address; streams run eagerly."""

    def __init__(self):
        self.mem: dict[int, np.ndarray] = {}
        self.next = 0x1000
        self.freed: list[int] = []
        self.graph_launches = 0

    def alloc(self, n):
        ptr = self.next
        self.next += max(1, n) + 256
        self.mem[ptr] = np.zeros(max(1, n), np.uint8)
        return ptr

    def install(self, monkeypatch):
        from pddnet.backends.trt import cuda as cuda_rt

        cuda = self
        rt = types.SimpleNamespace(cudaSetDevice=lambda d: (0,))

        class Stream:
            def __init__(self):
                self.handle = 7

            @property
            def ptr(self):
                return 7

            def synchronize(self):
                pass

            def close(self):
                cuda.freed.append("stream")

        class DeviceBuffer:
            def __init__(self, n):
                self.nbytes = n
                self.ptr = cuda.alloc(n)

            def free(self):
                cuda.freed.append(self.ptr)

        class HostBuffer:
            def __init__(self, shape, dtype):
                self.array = np.zeros(shape, dtype)
                self.nbytes = self.array.nbytes
                self.ptr = id(self.array)

            def free(self):
                cuda.freed.append("host")

        class EventTimer:
            def __init__(self, stream):
                pass

            def record_start(self):
                pass

            def record_stop(self):
                pass

            def elapsed_ms(self):
                return 0.25

            def close(self):
                cuda.freed.append("timer")

        class GraphCapture:
            def __init__(self, stream, fn):
                self.fn = fn

            def launch(self):
                cuda.graph_launches += 1
                self.fn()

            def close(self):
                cuda.freed.append("graph")

        def htod(dst, src, stream):
            cuda.mem[dst.ptr][:src.nbytes] = src.array.reshape(-1).view(np.uint8)

        def dtoh(dst, src, stream):
            dst.array.reshape(-1).view(np.uint8)[:] = cuda.mem[src.ptr][:dst.nbytes]

        for name, obj in dict(Stream=Stream, DeviceBuffer=DeviceBuffer, HostBuffer=HostBuffer,
                              EventTimer=EventTimer, GraphCapture=GraphCapture,
                              copy_htod_async=htod, copy_dtoh_async=dtoh,
                              runtime_module=lambda: rt, call=lambda r: None,
                              device_properties=lambda d=0: {
                                  "gpu_name": ENV.gpu_name, "sm_count": ENV.sm_count,
                                  "compute_capability": ENV.compute_capability}).items():
            monkeypatch.setattr(cuda_rt, name, obj)


def fake_tensorrt(cuda: FakeCuda) -> types.ModuleType:
    """An engine is JSON: {"io": [[name, is_input, shape, dtype name]]}; out = 2 x + y."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = ENV.trt_version
    trt.TensorIOMode = types.SimpleNamespace(INPUT="in", OUTPUT="out")

    class Logger:
        WARNING = 2

        def __init__(self, level=None):
            pass

    class Context:
        def __init__(self, engine):
            self.engine = engine
            self.addr = {}
            self.calls = 0

        def set_tensor_address(self, name, ptr):
            self.addr[name] = ptr
            return True

        def execute_async_v3(self, stream):
            self.calls += 1
            e = self.engine
            arr = {}
            for name, is_in, shape, dt in e.io:
                dtype = numpy_dtype(dt)
                n = int(np.prod(shape)) * dtype.itemsize
                arr[name] = cuda.mem[self.addr[name]][:n].view(dtype).reshape(shape)
            arr["out"][...] = 2 * arr["x"] + arr["y"]
            return True

    class Engine:
        def __init__(self, spec):
            self.io = spec["io"]
            self.num_io_tensors = len(self.io)

        def get_tensor_name(self, i):
            return self.io[i][0]

        def get_tensor_mode(self, name):
            return next("in" if t[1] else "out" for t in self.io if t[0] == name)

        def get_tensor_shape(self, name):
            return next(t[2] for t in self.io if t[0] == name)

        def get_tensor_dtype(self, name):
            return types.SimpleNamespace(name=next(t[3] for t in self.io if t[0] == name))

        def create_execution_context(self):
            self.context = Context(self)
            return self.context

    class Runtime:
        last = None

        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data):
            Runtime.last = Engine(json.loads(bytes(data)))
            return Runtime.last

    trt.Logger, trt.Runtime = Logger, Runtime
    return trt


ENGINE = json.dumps({"io": [["x", True, [2, 3], "FLOAT"], ["y", True, [2, 3], "FLOAT"],
                            ["out", False, [2, 3], "FLOAT"]]}).encode()


@pytest.fixture
def fakes(monkeypatch):
    cuda = FakeCuda()
    cuda.install(monkeypatch)
    trt = fake_tensorrt(cuda)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    return cuda, trt


def _stored_engine(tmp_path, env=ENV):
    key = EngineKey("e" * 64, "fp32", "native", env)
    return EngineCache(tmp_path).store(key, "head", ENGINE)[0]


def test_engine_file_runs_end_to_end(fakes, tmp_path):
    cuda, trt = fakes
    path = _stored_engine(tmp_path)
    rng = np.random.default_rng(0)
    x, y = (rng.normal(size=(2, 3)).astype(np.float32) for _ in range(2))
    with create_backend("trt", path, label="head", warmup=2, providers=["cpu"], threads=2) as b:
        assert [s.name for s in b.input_specs] == ["x", "y"]
        assert trt.Runtime.last.context.calls == 2  # warm-up on zeros
        out = b.run({"x": x, "y": y})
        np.testing.assert_array_equal(out["out"], 2 * x + y)
        out2 = b.run({"x": y, "y": x})
        np.testing.assert_array_equal(out["out"], 2 * x + y)  # earlier result not overwritten
        np.testing.assert_array_equal(out2["out"], 2 * y + x)
        assert b.last_gpu_ms == 0.25 and b.output_names == ["out"]
        d = b.describe()
        assert d["backend"] == "tensorrt" and d["precision"] == "fp32" and d["gpu"] == ENV.gpu_name
        assert d["ignored_options"] == ["threads"]
        with pytest.raises(PddnetError, match="dtype"):
            b.run({"x": x.astype(np.float64), "y": y})
        with pytest.raises(PddnetError, match="missing"):
            b.run({"x": x})
    # unload freed 3 device + 3 host buffers, the timer and the stream
    assert sum(isinstance(f, int) for f in cuda.freed) == 3
    assert cuda.freed.count("host") == 3 and "timer" in cuda.freed and "stream" in cuda.freed


def test_cuda_graph_replay(fakes, tmp_path):
    cuda, trt = fakes
    path = _stored_engine(tmp_path)
    with create_backend("tensorrt", path, label="head", cuda_graph=True, warmup=0) as b:
        launches = cuda.graph_launches
        x = np.ones((2, 3), np.float32)
        np.testing.assert_array_equal(b.run({"x": x, "y": x})["out"], 3 * x)
        assert cuda.graph_launches == launches + 1
    assert "graph" in cuda.freed


def test_foreign_or_unlabelled_engine_refused(fakes, tmp_path):
    other = Environment("Other GPU", "8.6", 84, ENV.trt_version)
    path = _stored_engine(tmp_path, env=other)
    with pytest.raises(PddnetError, match="refusing to run.*foreign.*Other GPU"):
        create_backend("trt", path, label="head").activate()
    lone = tmp_path / "lone.plan"
    lone.write_bytes(ENGINE)
    with pytest.raises(PddnetError, match="no metadata file"):
        create_backend("trt", lone).activate()


def test_build_never_with_empty_cache_refuses(fakes, tmp_path):
    from helpers.trt_models import tiny_model

    b = create_backend("trt", tiny_model(), label="head", engine_cache=tmp_path / "c",
                       build="never", plugins="native")
    with pytest.raises(PddnetError, match="(?s)no usable engine.*build='never'.*pddnet build"):
        b.activate()


def test_bad_options():
    with pytest.raises(PddnetError, match="build must be"):
        create_backend("trt", b"", build="sometimes")
    with pytest.raises(PddnetError, match="warmup"):
        create_backend("trt", b"", warmup=-1)


def test_registry_and_missing_tensorrt(monkeypatch):
    assert BACKENDS["trt"] == BACKENDS["tensorrt"]
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    b = create_backend("trt", b"\x00", label="features")
    with pytest.raises(PddnetError, match=r"pip install 'pddnet\[gpu\]'.*TensorRT >= 10.9"):
        b.activate()


# ------------------------------------------------------------------------------------------
# on a GPU with TensorRT (skipped elsewhere by tests/conftest.py)
# ------------------------------------------------------------------------------------------

@pytest.mark.trt
@pytest.mark.parametrize("plugins", ["native", "auto"])
def test_real_engine_matches_onnxruntime(tmp_path, plugins):
    torch = pytest.importorskip("torch")
    from pddnet.export.onnx_export import export_model
    from pddnet.model.network import PDDNet
    from pddnet.spec import contract as C
    from pddnet.spec.config import preset

    net = PDDNet(preset("tiny"), seed=3).eval()
    with torch.no_grad():
        model = export_model(net, (24, 24, 24))
    rng = np.random.default_rng(4)
    feeds = {k: rng.normal(size=(1, 1, 24, 24, 24)).astype(np.float32)
             for k in (C.INPUT_FIXED, C.INPUT_MOVING)}
    with create_backend("onnxruntime", model) as ref:
        want = ref.run(feeds)
    with create_backend("trt", model, engine_cache=tmp_path, plugins=plugins) as b:
        got = b.run(feeds)
        assert b.built
    np.testing.assert_allclose(got[C.OUTPUT_DISP], want[C.OUTPUT_DISP], atol=0.05)
    with create_backend("trt", model, engine_cache=tmp_path, plugins=plugins) as b:
        assert not b.built  # found in the cache
