"""The bundle the wheel carries (``pddnet.weights.shipped_bundle``): present, verified, built from
the shipped checkpoint, and what ``pddnet register`` runs when no ``--model`` is given -- so the
core install registers scans with no torch.

A stale bundle (the checkpoint changed, the bundle was not rebuilt with
``scripts/build_shipped_bundle.py``) fails here: its graphs record the SHA-256 of the checkpoint
they were exported from.
"""

import hashlib

from pddnet.runtime.bundle import opened
from pddnet.weights import shipped_bundle, shipped_checkpoint


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_shipped_bundle_is_small_verified_and_built_from_the_shipped_weights():
    path = shipped_bundle("small")
    assert path.stat().st_size < 8e6, "the shipped bundle should stay a few MB"
    ckpt_sha = _sha256(shipped_checkpoint("small"))
    with opened(path) as bundle:                 # every file's SHA-256 checked
        models = {m["precision"]: m for m in bundle.models}
        assert "fp32" in models
        for m in bundle.models:
            assert m["source"]["checkpoint_sha256"] == ckpt_sha, (
                f"{m['id']} was exported from another checkpoint: rebuild the shipped bundle "
                "(python scripts/build_shipped_bundle.py)")
            assert m["validation"]["passed"] is True
            assert {"disp", "grid_disp", "probs"} <= set(m["outputs"])
        assert bundle.manifest["validation"]


NO_TORCH_REGISTER = r"""
import sys
sys.modules["torch"] = None               # the core install: no torch
sys.modules["matplotlib"] = None
from pddnet.cli import main
main(sys.argv[1:], prog_name="pddnet")
"""


def test_register_without_model_runs_the_shipped_bundle_torch_free(tmp_path):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    import numpy as np

    from helpers.fake_models import ct_like, grid_affine, save_volume

    rng = np.random.default_rng()
    shape = (96, 80, 128)                    # the shipped model's grid, 4 mm
    fixed = save_volume(tmp_path / "f.nii.gz", ct_like(rng, shape), grid_affine(4.0))
    moving = save_volume(tmp_path / "m.nii.gz", ct_like(rng, shape), grid_affine(4.0))
    src = Path(__file__).resolve().parents[2] / "src"
    r = subprocess.run([sys.executable, "-c", NO_TORCH_REGISTER, "register", "--fixed", fixed,
                        "--moving", moving, "--out", tmp_path / "out", "--threads", "2",
                        "--json"], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "PYTHONPATH": str(src)})
    assert r.returncode == 0, r.stderr
    assert "no --model given: the bundle shipped with pddnet" in r.stderr
    res = json.loads(r.stdout)["results"][0]         # stdout is the JSON alone
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert "disp.nii.gz" in res["outputs"] and "disp_itk.nii.gz" in res["outputs"]
    with opened(shipped_bundle("small")) as bundle:       # one of the shipped graphs ran
        assert summary["model"]["sha256"] in {m["sha256"] for m in bundle.models}
