"""ONNX ModelProto tools, with no torch: loading and checking an exported model and its
metadata (:mod:`~pddnet.graph.model`), cutting it into ``features`` and ``head``
(:mod:`~pddnet.graph.split`), building graphs and the custom ops' local-function bodies
(:mod:`~pddnet.graph.builder`, :mod:`~pddnet.graph.functions`), and the rewrite passes
(:mod:`~pddnet.graph.passes`).
"""
