"""pddnet: PDD-Net deformable registration from PyTorch training to deployed engines.

Packages, bottom to top (each imports only the layers below it; docs/architecture.md):

- ``pddnet.spec``        the model contract: tensor names, metadata keys, config, settings
- ``pddnet.graph``       ONNX ModelProto tools, custom-op bodies, rewrite passes
- ``pddnet.metrics``     Learn2Reg metrics (numpy)
- ``pddnet.data``        volumes, NIfTI I/O, the synthetic abdomen, Learn2Reg datasets
- ``pddnet.model``       the PyTorch reference (network, custom-op references, losses, training)
- ``pddnet.export``      PyTorch -> ONNX with the custom ops
- ``pddnet.backends``    ONNX Runtime, TensorRT and the torch reference behind one interface
- ``pddnet.runtime``     torch-free registration
- ``pddnet.validation``  backend comparison, reports, benchmarks
- ``pddnet.calibration`` representative data, activation ranges, FP16/INT8 graphs
- ``pddnet.deploy``      bundles, Triton repositories, the demo
- ``pddnet.cli``         the ``pddnet`` command

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
