"""The model contract, with no torch and no onnx: tensor names and metadata keys
(:mod:`~pddnet.spec.contract`), reading and writing metadata (:mod:`~pddnet.spec.metadata`), the
network's configuration and presets (:mod:`~pddnet.spec.config`), and the refinement and
registration-mode settings (:mod:`~pddnet.spec.refine`). Every other package builds on these.
"""
