"""The runtime never imports torch or matplotlib: a subprocess where `import torch` and
`import matplotlib` fail registers a pair end to end (Python API and the `pddnet register`
command) and checks that neither torch nor the PyTorch side of pddnet (`pddnet.model`) was
imported (matplotlib is the `[report]` extra: only the validation report draws figures).

Not tested here: an environment where torch is not installed at all (CI's edge-install job);
blocking it through sys.modules is equivalent for import purposes.
"""

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

from helpers.fake_models import ct_like, grid_affine, make_model, save_model, save_volume

SCRIPT = textwrap.dedent(r"""
    import sys
    sys.modules["torch"] = None          # any `import torch` now raises ImportError
    sys.modules["matplotlib"] = None     # the [report] extra: not installed on an edge box
    import pddnet.runtime
    from pddnet.runtime.session import Registrar
    from pddnet.cli import main

    model, fixed, moving, out = sys.argv[1:5]
    with Registrar(model, threads=1) as reg:
        reg.set_fixed(fixed)
        res = reg.register_moving(moving)
        res.save(out + "/api")
    try:
        main(["register", "--model", model, "--fixed", fixed, "--moving", moving, moving,
              "--out", out + "/cli"], standalone_mode=False)
    except SystemExit as exc:
        assert not exc.code, exc.code
    try:
        import torch  # noqa: F401
        raise AssertionError("torch import was not blocked")
    except ImportError:
        pass
    assert sys.modules["torch"] is None
    leaked = sorted(m for m in sys.modules
                    if m.startswith(("torch.", "matplotlib.", "pddnet.model."))
                    or m == "pddnet.model")
    assert not leaked, leaked
    print("TORCH-FREE OK", abs(res.disp).max())
""")


def test_runtime_runs_without_torch(tmp_path):
    rng = np.random.default_rng(61)
    shape, aff = (24, 21, 30), grid_affine(4.0)
    model = save_model(make_model(shape, translation=(1.0, 2.0, 0.0), gain=0.1), tmp_path / "m.onnx")
    fixed = save_volume(tmp_path / "f.nii.gz", ct_like(rng, shape), aff)
    moving = save_volume(tmp_path / "m.nii.gz", ct_like(rng, shape), aff)
    src = Path(__file__).resolve().parents[2] / "src"
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(model), str(fixed), str(moving), str(tmp_path)],
        capture_output=True, text=True, timeout=120, env={"PYTHONPATH": str(src), "PATH": ""})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "TORCH-FREE OK" in proc.stdout
    assert (tmp_path / "api" / "summary.json").exists()
    assert (tmp_path / "cli" / "m" / "summary.json").exists()
    assert (tmp_path / "cli" / "m_2" / "summary.json").exists()


DATA_SCRIPT = textwrap.dedent(r"""
    import sys
    sys.modules["torch"] = None          # any `import torch` now raises ImportError
    from pddnet.cli import main

    model, data, out = sys.argv[1:4]
    try:
        main(["register", "--model", model, "--data", data, "--out", out, "--threads", "1"],
             standalone_mode=False)
    except SystemExit as exc:
        assert not exc.code, exc.code
    leaked = sorted(m for m in sys.modules
                    if m.startswith("torch.") or m == "pddnet.model" or m.startswith("pddnet.model."))
    assert not leaked, leaked
    print("TORCH-FREE DATA OK")
""")


def test_dataset_submission_without_torch(tmp_path):
    """`pddnet register --data` (a Learn2Reg split into a submission folder, metrics included)
    runs with torch unavailable."""
    import json

    rng = np.random.default_rng(62)
    shape, aff = (24, 21, 30), grid_affine(4.0)
    model = save_model(make_model(shape, translation=(1.0, 2.0, 0.0), gain=0.1), tmp_path / "m.onnx")
    data = tmp_path / "data"
    for kind in ("images", "labels"):
        (data / f"{kind}Ts").mkdir(parents=True)
    for i in (1, 2):
        save_volume(data / "imagesTs" / f"T_{i:04d}_0000.nii.gz", ct_like(rng, shape), aff)
        save_volume(data / "labelsTs" / f"T_{i:04d}_0000.nii.gz",
                    rng.integers(0, 3, shape).astype(np.uint8), aff)
    img = [f"./imagesTs/T_{i:04d}_0000.nii.gz" for i in (1, 2)]
    (data / "T_dataset.json").write_text(json.dumps({
        "training": [], "registration_test": [{"fixed": img[0], "moving": img[1]},
                                              {"fixed": img[1], "moving": img[0]}]}))
    src = Path(__file__).resolve().parents[2] / "src"
    proc = subprocess.run(
        [sys.executable, "-c", DATA_SCRIPT, str(model), str(data), str(tmp_path / "sub")],
        capture_output=True, text=True, timeout=120, env={"PYTHONPATH": str(src), "PATH": ""})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "TORCH-FREE DATA OK" in proc.stdout
    assert sorted(p.name for p in (tmp_path / "sub").glob("disp_*")) == [
        "disp_0001_0000_0002_0000.nii.gz", "disp_0002_0000_0001_0000.nii.gz"]
    log = [json.loads(line) for line in (tmp_path / "sub" / "log.jsonl").read_text().splitlines()]
    assert all(rec["metrics"]["dice_mean"] is not None for rec in log)
