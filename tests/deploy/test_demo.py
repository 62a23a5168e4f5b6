"""`pddnet demo` end to end on a tiny preset: every step runs, the report and a verified bundle
come out, the summary names them, and one pair is registered from the bundle's archive.

Model: the `tiny` preset randomly initialised (sharp softmax), trained-at shape 48x40x64 at 8 mm,
so the small synthetic data (4 subjects, 2 test pairs) is resampled; one validation pair, one
timed run, in-process timing.

Not tested here: the shipped `small` weights and the 5-minute budget (`make demo` on 2 cores;
timings in docs/benchmarks.md), TensorRT candidates (no GPU).
"""

import importlib.util
import json

import pytest

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    from pddnet.model.checkpoint import save_checkpoint
    from pddnet.model.network import PDDNet
    from pddnet.spec.config import preset

    net = PDDNet(preset("tiny"), seed=0).eval()
    with torch.no_grad():
        net.alpha[5] = 3000.0
    return save_checkpoint(tmp_path_factory.mktemp("demo") / "tiny.pt", net,
                           image_shape=(48, 40, 64), metadata={"spacing_mm": [8.0, 8.0, 8.0]})


def test_demo_steps_on_a_tiny_preset(tiny_ckpt, tmp_path, capsys):
    from pddnet.deploy.demo import STEPS, DemoOptions, run_demo
    from pddnet.runtime.bundle import open_bundle

    out = tmp_path / "demo"
    state = run_demo(DemoOptions(out=out, subjects=4, checkpoint=tiny_ckpt, threads=1,
                                 max_pairs=1, warmup=0, repeats=1, isolate=False,
                                 calib_pairs=1, figure_pairs=1, progress=False))
    text = capsys.readouterr().out
    for n, (title, _) in enumerate(STEPS, 1):
        assert f"[{n}/{len(STEPS)}] {title}" in text
    assert len(state.timings) == len(STEPS)
    for name in ("report.json", "report.md", "report.html"):
        assert (out / "validation" / name).is_file()
    with open_bundle(out / "bundle") as b:
        assert "fp32" in [m["id"] for m in b.models]
        assert b.manifest["name"] == "pddnet-demo"
    with open_bundle(out / "bundle.tar.gz") as b:
        assert b.select().backend == "onnxruntime"
    assert (out / "triton" / "pddnet_fp32" / "config.pbtxt").is_file()
    summary = json.loads((out / "register" / "summary.json").read_text())
    assert summary["backend"]["bundle"]["source"].endswith("bundle.tar.gz")
    assert summary["metrics"]["dice_mean"] is not None
    assert "report:  " + str(out / "validation" / "report.html") in text
    assert "bundle:  " + str(out / "bundle") in text
    assert "onnxruntime-fp32" in text and "bundled" in text and "demo finished in" in text
    report = json.loads((out / "validation" / "report.json").read_text())
    if importlib.util.find_spec("pddnet.calibration.api") is None:
        assert "FP16/INT8 graphs are not available yet" in text
    else:  # the calibration step made both graphs, and both were validated
        assert (out / "model" / "model.fp16.onnx").is_file()
        assert (out / "model" / "model.int8.onnx").is_file()
        assert {"onnxruntime-fp16", "onnxruntime-int8"} <= set(report["candidates"])
        with open_bundle(out / "bundle") as b:
            bundled = {m["precision"] for m in b.models}
        for prec in ("fp16", "int8"):  # in the bundle exactly when all its candidates passed
            mine = [c for c in report["candidates"].values() if c["precision"] == prec]
            assert (prec in bundled) == all(c["passed"] for c in mine)


def test_demo_refuses_a_non_empty_folder(tmp_path):
    from pddnet.deploy.demo import DemoOptions, run_demo
    from pddnet.errors import PddnetError

    (tmp_path / "x.txt").write_text("keep")
    with pytest.raises(PddnetError, match="is not empty; pass --overwrite"):
        run_demo(DemoOptions(out=tmp_path))
    assert [p.name for p in tmp_path.iterdir()] == ["x.txt"]
