"""Names shared by the exporter, the runtime and every backend (see docs/model-format.md).

Torch-free and onnx-free: the runtime imports this module.
"""

from __future__ import annotations

FORMAT_VERSION = 1
DOMAIN = "ai.pddnet"
DOMAIN_VERSION = 1
PLUGIN_NAMESPACE = "pddnet"
PLUGIN_VERSION = "1"
OPSET = 20

INPUT_FIXED = "fixed"
INPUT_MOVING = "moving"
OUTPUT_DISP = "disp"
OUTPUT_GRID_DISP = "grid_disp"
OUTPUT_PROBS = "probs"
OUTPUT_ENTROPY = "entropy"
OPTIONAL_OUTPUTS = (OUTPUT_PROBS, OUTPUT_ENTROPY)
FIXED_FEATURES = "fixed_features"
MOVING_FEATURES = "moving_features"

META_FORMAT = "pddnet.format"
META_CONFIG = "pddnet.config"
META_INPUT = "pddnet.input"
META_OUTPUTS = "pddnet.outputs"
META_PRECISION = "pddnet.precision"
META_SOURCE = "pddnet.source"
META_BLOCKS = "pddnet.blocks"
REQUIRED_META = (META_FORMAT, META_CONFIG, META_INPUT)

CUSTOM_OPS = ("DeformableSample3D", "Correlation", "MinConv", "MeanFieldStep")

#: The graph's precision blocks, in graph order (docs/precision.md): each ``pddnet.blocks``
#: entry lists the main-graph nodes of one block (both branches for the feature layers).
FEATURE_BLOCKS = ("pool", "conv0", "obelisk", "conv1", "conv2", "conv3")
HEAD_BLOCKS = ("correlation", "meanfield1", "meanfield2", "softmax", "upsample")
BLOCKS = FEATURE_BLOCKS + HEAD_BLOCKS
