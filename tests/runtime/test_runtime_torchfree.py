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
