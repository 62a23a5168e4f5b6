"""A tiny trained-looking pipeline for the validation, report and calibration tests: a synthetic
dataset, the ``tiny`` preset network with sharp probabilities (a field of a few voxels), its
checkpoint and its FP32 export. Needs torch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

#: the image grid of the tiny exports (I, J, K) at 8 mm
SHAPE = (48, 40, 64)
SPACING_MM = (8.0, 8.0, 8.0)


def tiny_pipeline(tmp: Path, *, subjects: int = 4, outputs: tuple[str, ...] = ()) -> dict[str, Any]:
    """``{"tmp", "data", "net", "ckpt", "model", "onnx"}`` written under ``tmp``."""
    import onnx
    import torch

    from pddnet._files import sha256_file
    from pddnet.data.synth import write_dataset
    from pddnet.export.onnx_export import export_model
    from pddnet.model.checkpoint import save_checkpoint
    from pddnet.model.network import PDDNet
    from pddnet.spec.config import preset

    data = tmp / "data"
    write_dataset(data, subjects=subjects, seed=0, preset="small", progress=False)
    net = PDDNet(preset("tiny"), seed=0).eval()
    with torch.no_grad():
        net.alpha[5] = 3000.0  # sharp probabilities: a field of a few voxels
    ckpt = save_checkpoint(tmp / "tiny.pt", net, image_shape=SHAPE,
                           metadata={"spacing_mm": list(SPACING_MM)})
    model = export_model(net, SHAPE, spacing_mm=SPACING_MM, outputs=outputs,
                         source={"checkpoint_sha256": sha256_file(ckpt)})
    path = tmp / "tiny.onnx"
    onnx.save(model, str(path))
    return {"tmp": tmp, "data": data, "net": net, "ckpt": ckpt, "model": model, "onnx": path}


def sharp_tiny_two_stage(folder: Path, *, seed: int, shape=(24, 24, 24)):
    """A ``tiny`` network made to see structure (larger OBELISK offsets, a larger cost scale and
    softmax temperature than at initialisation, so its probabilities are peaked and its fields
    reach a few voxels), its checkpoint, and an export of both stages with the probabilities:
    ``(net, ckpt, model)``."""
    import torch

    from pddnet.export.onnx_export import export_checkpoint
    from pddnet.model.checkpoint import save_checkpoint
    from pddnet.model.network import PDDNet
    from pddnet.spec.config import preset

    net = PDDNet(preset("tiny"), seed=seed).eval()
    with torch.no_grad():
        net.features.offsets *= 10.0
        net.alpha[0] = 1000.0
        net.alpha[5] = 20.0
    ckpt = save_checkpoint(Path(folder) / "tiny.pt", net, image_shape=shape,
                           metadata={"spacing_mm": [4.0, 4.0, 4.0]})
    model = export_checkpoint(ckpt, Path(folder) / "tiny.onnx", outputs=("probs",), stage2=True)
    return net, ckpt, model
