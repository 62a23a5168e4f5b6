"""Graph rewrites as passes (onnx-ir style): each is an object with
``call(model) -> (new model, changed)`` that never modifies its input.

- :class:`~pddnet.graph.passes.inline.InlineNamed`: inline local functions, nodes named after
  their caller (profiling, precision blocks, Q/DQ preparation);
- :class:`~pddnet.graph.passes.bind_plugins.BindPlugins`: prepare custom nodes for TensorRT
  plugins;
- :class:`~pddnet.graph.passes.fp16_storage.EmulateFP16Storage`: the FP32 graph that computes
  what an FP16 graph computes with FP16 storage;
- :class:`~pddnet.graph.passes.constants.ConstantsToInitializers`: main-graph ``Constant``
  nodes as initializers (what the INT8 quantiser treats as weights).
"""
