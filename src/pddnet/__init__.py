"""pddnet: PDD-Net deformable registration from PyTorch training to deployed engines.

Subpackages, in the order data flows through them:

- ``pddnet.data``        volumes, labels, NIfTI I/O, the synthetic abdomen, Learn2Reg datasets
- ``pddnet.model``       the PyTorch reference (network, custom-op references, losses, training)
- ``pddnet.export``      PyTorch -> ONNX with custom ops, graph checks, TensorRT engines and plugins
- ``pddnet.calibration`` representative data, activation ranges, FP16/INT8 graphs
- ``pddnet.runtime``     torch-free registration on ONNX Runtime / TensorRT
- ``pddnet.validation``  metrics, backend comparison, reports, benchmarks

Conventions used everywhere (see ``docs/conventions.md``):

- Volumes are numpy arrays indexed ``[i, j, k]`` (NIfTI voxel axes), float32 for images.
- Torch tensors are ``(N, C, i, j, k)``; normalised coordinates follow
  ``align_corners=False`` (-1 and +1 are the outer faces of the first and last voxel).
- Displacement fields are ``(i, j, k, 3)`` float32 in voxels of the fixed image;
  channel ``a`` is the displacement along array axis ``a``;
  ``warped(x) = moving(x + u(x))``.
"""

__version__ = "0.1.0"

from pddnet.errors import PddnetError  # noqa: E402

__all__ = ["PddnetError", "__version__"]
