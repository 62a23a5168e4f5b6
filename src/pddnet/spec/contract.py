"""The model contract: every tensor name and metadata key the exporter writes and the runtime,
the backends and the deployment tools read (docs/model-format.md).

Standard library only: every layer imports this module.
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
#: the two feeds of every full model, in graph order
INPUTS = (INPUT_FIXED, INPUT_MOVING)
#: the parts a model is split into for fixed-scan reuse (``pddnet.graph.split``): ``features``
#: maps one image to its features, ``head`` both feature maps to the outputs
PARTS = ("full", "features", "head")
#: the single input and output of a ``features`` part
FEATURES_INPUT = "image"
FEATURES_OUTPUT = "features"

META_FORMAT = "pddnet.format"
META_CONFIG = "pddnet.config"
META_INPUT = "pddnet.input"
META_OUTPUTS = "pddnet.outputs"
META_PRECISION = "pddnet.precision"
META_SOURCE = "pddnet.source"
META_BLOCKS = "pddnet.blocks"
#: which part of a split model this is (``"features"`` / ``"head"``; absent: the full model)
META_PART = "pddnet.part"
#: a stage-one model's link to its stage-two model (``pddnet export --stage2``)
META_STAGE2 = "pddnet.stage2"
#: the config overrides a model was exported with (e.g. the stage-two model)
META_OVERRIDES = "pddnet.overrides"
REQUIRED_META = (META_FORMAT, META_CONFIG, META_INPUT)

CUSTOM_OPS = ("DeformableSample3D", "Correlation", "MinConv", "MeanFieldStep")

#: The graph's precision blocks, in graph order (docs/precision.md): each ``pddnet.blocks``
#: entry lists the main-graph nodes of one block (both branches for the feature layers).
FEATURE_BLOCKS = ("pool", "conv0", "obelisk", "conv1", "conv2", "conv3")
HEAD_BLOCKS = ("correlation", "meanfield1", "meanfield2", "softmax", "upsample")
BLOCKS = FEATURE_BLOCKS + HEAD_BLOCKS
