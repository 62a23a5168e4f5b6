"""The TensorRT backend, importable without TensorRT (``tensorrt`` and cuda-python are imported
lazily): engine building (:mod:`~pddnet.backends.trt.build`), the engine cache
(:mod:`~pddnet.backends.trt.cache`), which ops bind to plugins
(:mod:`~pddnet.backends.trt.binding`), the static readiness check
(:mod:`~pddnet.backends.trt.support`), the plugins and their Triton kernels
(:mod:`~pddnet.backends.trt.plugins`, :mod:`~pddnet.backends.trt.kernels`), CUDA runtime calls
(:mod:`~pddnet.backends.trt.cuda`), buffer bookkeeping (:mod:`~pddnet.backends.trt.io`) and
the runner (:mod:`~pddnet.backends.trt.runner`).
"""
