"""Helpers shared by the test modules (one place): contract-conforming fake ONNX models and
volumes (:mod:`helpers.fake_models`), fake bundles and engines (:mod:`helpers.deploy_helpers`),
tiny custom-op graphs for the TensorRT binding (:mod:`helpers.trt_models`), the C kernel library
made absent (:mod:`helpers.native_lib`)."""
