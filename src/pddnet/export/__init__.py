"""PyTorch -> ONNX with the custom ops of the ``ai.pddnet`` domain as local functions (the
op bodies themselves are :mod:`pddnet.graph.functions`). Importing this package imports
nothing heavy; its exporter imports torch."""
