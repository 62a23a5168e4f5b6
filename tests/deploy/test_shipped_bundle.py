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
