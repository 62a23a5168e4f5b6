"""PyTorch -> ONNX with custom ops in the ``ai.pddnet`` domain, graph checks, TensorRT engines."""
