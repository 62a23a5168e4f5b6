"""The Triton model repository: every generated config.pbtxt parses with Triton's own
ModelConfig protobuf schema (tritonclient's model_config_pb2) and says what the model is --
platform, inputs/outputs with the graph's dims and types, instance groups, ONNX Runtime
parameters and TensorRT accelerator, the pre-processing contract, warm-up -- and the
repository layout is Triton's (<name>/config.pbtxt, <name>/1/model.onnx|model.plan).

Not tested here: a running tritonserver (none on this machine; docs/bundle.md shows how to
start one and call it), engines that deserialise (fake engine bytes with real metadata).
"""

import json

import numpy as np
import pytest

from helpers.deploy_helpers import (
    candidate,
    environment,
    fake_engines,
    precision_model,
    write_report,
)

pb = pytest.importorskip("tritonclient.grpc.model_config_pb2")


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    from pddnet.deploy.package import package
    from pddnet.deploy.triton import TritonOptions

    d = tmp_path_factory.mktemp("triton")
    fp32 = precision_model(d / "model.onnx")
    fp16 = precision_model(d / "model.fp16.onnx", "fp16", seed=1)
    env = environment()
    fake_engines(fp16, d / "engines", env)
    fake_engines(fp32, d / "engines", env, labels=("features", "head"))  # no whole engine
    report = write_report(d / "rep", [
        candidate("onnxruntime-fp32", fp32, "fp32"), candidate("onnxruntime-fp16", fp16, "fp16"),
        candidate("tensorrt-fp16", fp16, "fp16", backend="tensorrt"),
        candidate("tensorrt-fp32", fp32, "fp32", backend="tensorrt")])
    res = package(fp32, fp16=fp16, report_dir=report, engines=[d / "engines"],
                  triton=d / "repo", triton_options=TritonOptions(instances=2, threads=2),
                  echo=lambda s: None)
    res_trt = package(fp32, report_dir=report, triton=d / "repo_ort_trt",
                      triton_options=TritonOptions(ort_tensorrt=True), echo=lambda s: None)
    return {"dir": d / "repo", "ort_trt": d / "repo_ort_trt", "notes": res.notes,
            "fp32": fp32, "res_trt": res_trt}


def _parse(path):
    from pddnet.deploy.triton import parse_config

    return parse_config(path.read_text())


def test_layout(repo):
    names = sorted(p.name for p in repo["dir"].iterdir())
    assert names == ["pddnet_fp16", "pddnet_fp32", "pddnet_trt_fp16"]
    assert (repo["dir"] / "pddnet_fp32" / "1" / "model.onnx").read_bytes() == \
        repo["fp32"].read_bytes()
    assert (repo["dir"] / "pddnet_trt_fp16" / "1" / "model.plan").is_file()
    assert not any(p.is_file() for p in repo["dir"].iterdir())  # nothing at the root
    # the fp32 engines have no whole-model engine: left out with a note
    assert any("no whole-model engine" in n for n in repo["notes"])


def test_onnx_config_parses_and_matches_the_graph(repo):
    import onnx

    cfg = _parse(repo["dir"] / "pddnet_fp32" / "config.pbtxt")
    assert cfg.name == "pddnet_fp32" and cfg.platform == "onnxruntime_onnx"
    assert cfg.max_batch_size == 0 and cfg.default_model_filename == "model.onnx"
    g = onnx.load(str(repo["fp32"])).graph
    want_in = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in g.input
               if i.name in ("fixed", "moving")}
    assert {i.name: list(i.dims) for i in cfg.input} == want_in
    assert {o.name: list(o.dims) for o in cfg.output} == {
        o.name: [d.dim_value for d in o.type.tensor_type.shape.dim] for o in g.output}
    assert all(t.data_type == pb.DataType.Value("TYPE_FP32") for t in [*cfg.input, *cfg.output])
    (group,) = cfg.instance_group
    assert group.kind == pb.ModelInstanceGroup.Kind.Value("KIND_CPU") and group.count == 2
    params = {k: v.string_value for k, v in cfg.parameters.items()}
    assert params["enable_mem_arena"] == "0" and params["intra_op_thread_count"] == "2"
    contract = json.loads(params["pddnet.preprocessing"])
    assert contract["image_shape"] == [24, 21, 30] and contract["intensity"]["scale"] == 500.0
    (warm,) = cfg.model_warmup
    assert warm.batch_size == 1 and set(warm.inputs) == {"fixed", "moving"}
    assert all(w.zero_data for w in warm.inputs.values())
    assert not cfg.optimization.execution_accelerators.gpu_execution_accelerator


def test_ort_tensorrt_accelerator(repo):
    cfg = _parse(repo["ort_trt"] / "pddnet_fp32" / "config.pbtxt")
    (group,) = cfg.instance_group
    assert group.kind == pb.ModelInstanceGroup.Kind.Value("KIND_GPU")
    (acc,) = cfg.optimization.execution_accelerators.gpu_execution_accelerator
    assert acc.name == "tensorrt"
    assert dict(acc.parameters) == {"precision_mode": "FP32",
                                    "max_workspace_size_bytes": str(1 << 30),
                                    "trt_engine_cache_enable": "1"}


def test_plan_config(repo):
    cfg = _parse(repo["dir"] / "pddnet_trt_fp16" / "config.pbtxt")
    assert cfg.platform == "tensorrt_plan" and cfg.default_model_filename == "model.plan"
    assert [i.name for i in cfg.input] == ["fixed", "moving"]
    assert list(cfg.input[0].dims) == [1, 1, 24, 21, 30]
    assert "disp" in [o.name for o in cfg.output]
    assert cfg.instance_group[0].kind == pb.ModelInstanceGroup.Kind.Value("KIND_GPU")
    eng = json.loads(cfg.parameters["pddnet.engine"].string_value)
    assert eng["gpu"]["gpu_name"] == environment().gpu_name


def test_jit_plugin_engines_are_left_out(tmp_path):
    from pddnet.deploy.package import package

    m = precision_model(tmp_path / "m.onnx")
    fake_engines(m, tmp_path / "e", environment(), jit_ops=("MeanFieldStep",))
    report = write_report(tmp_path / "rep", [candidate("onnxruntime-fp32", m, "fp32"),
                                             candidate("tensorrt-fp32", m, "fp32",
                                                       backend="tensorrt")])
    res = package(m, report_dir=report, engines=[tmp_path / "e"], triton=tmp_path / "repo",
                  echo=lambda s: None)
    assert sorted(p.name for p in (tmp_path / "repo").iterdir()) == ["pddnet_fp32"]
    assert any("JIT (Python) plugins" in n for n in res.notes)


def test_bad_configs_do_not_parse_and_escaping():
    from pddnet.deploy.triton import model_config, parse_config, pbtxt_string
    from pddnet.errors import PddnetError

    with pytest.raises(PddnetError, match="does not parse"):
        parse_config('name: "x"\nplatform: "onnxruntime_onnx"\nmax_batch_size: "zero"\n')
    weird = 'a "quoted" \\ value\nnext line'
    text = model_config("m", "onnxruntime_onnx", [("fixed", "TYPE_FP32", [1, 1, 6, 6, 6])],
                        [("disp", "TYPE_FP32", [6, 6, 6, 3])], kind="KIND_CPU", count=1,
                        parameters={"k": weird}, filename="model.onnx")
    assert parse_config(text).parameters["k"].string_value == weird
    assert pbtxt_string('"') == '"\\""'


def test_client_inputs():
    from pddnet.deploy.triton import client_inputs
    from pddnet.errors import PddnetError

    a = np.zeros((1, 1, 6, 6, 6), np.float32)
    ins = client_inputs(a, a + 1)
    assert [i.name() for i in ins] == ["fixed", "moving"]
    assert ins[0].shape() == [1, 1, 6, 6, 6] and ins[0].datatype() == "FP32"
    with pytest.raises(PddnetError, match=r"expected a \(1, 1, I, J, K\)"):
        client_inputs(a[0], a)


def test_the_served_file_loads_and_matches_its_config(repo):
    """What Triton's ONNX Runtime backend would do first: open 1/model.onnx and check the
    config's inputs/outputs against the session's (names, dims, types), then run it."""
    import onnxruntime as ort

    for name in ("pddnet_fp32", "pddnet_fp16"):
        d = repo["dir"] / name
        cfg = _parse(d / "config.pbtxt")
        sess = ort.InferenceSession(str(d / "1" / cfg.default_model_filename),
                                    providers=["CPUExecutionProvider"])
        assert {i.name: i.shape for i in sess.get_inputs()} == {
            i.name: list(i.dims) for i in cfg.input}
        assert {o.name: o.shape for o in sess.get_outputs()} == {
            o.name: list(o.dims) for o in cfg.output}
        assert all(i.type == "tensor(float)" for i in sess.get_inputs())
        feeds = {i.name: np.zeros(list(i.dims), np.float32) for i in cfg.input}
        outs = sess.run(None, feeds)
        assert [o.shape for o in outs] == [tuple(o.dims) for o in cfg.output]
