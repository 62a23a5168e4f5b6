"""Build of the optional C kernel library (the fused head, the OBELISK sampling of the features
and the `features` refinement loop, src/pddnet/backends/native).

Everything else is in pyproject.toml.  The library is plain C (no Python API), loaded with
ctypes; it is built by ``pip install .`` and ``pip install -e .`` (``make setup``).  Each kernel
file gets its own code-generation flags (AVX-512, AVX2+FMA, SSE2, portable), chosen at run time by the
library.  Where no C compiler works the install still succeeds without it and the runtime runs
the head in ONNX Runtime (``pddnet doctor`` says which).
"""

from __future__ import annotations

import os
import platform
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

NATIVE = "src/pddnet/backends/native"
X86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")
COMMON = ["-O3", "-fPIC", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math",
          "-pthread"]
#: per-source flags; the x86 kernel sets only on x86
SOURCES = {
    "pdd_head.c": [],
    "pdd_refine.c": [],
    "pdd_sample.c": [],
    "pdd_conv.c": [],
    "pdd_k_portable.c": ["-fno-tree-vectorize", "-fno-tree-slp-vectorize"],
}
if X86:
    SOURCES["pdd_k_sse2.c"] = ["-msse2"]
    SOURCES["pdd_k_avx2.c"] = ["-mavx2", "-mfma", "-ffp-contract=fast"]
    SOURCES["pdd_k_avx512.c"] = ["-mavx512f", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma",
                                 "-mprefer-vector-width=512", "-ffp-contract=fast"]


class BuildNative(build_ext):
    """Compiles the library as a plain shared object (``libpddnet_head`` + the platform's
    extension suffix, so a wheel is tagged for it), each source with its own flags; a failure
    is reported and skipped, never fatal."""

    def build_extension(self, ext):
        if ext.name != "pddnet.backends.native.lib._pddnet_head":
            return super().build_extension(ext)
        try:
            self._build_native(ext)
        except Exception as exc:  # no compiler, unsupported flags, ...: install without it
            sys.stderr.write(f"warning: the pddnet C kernel library was not built ({exc}); "
                             "the runtime will run the head in ONNX Runtime and the "
                             "refinement in numpy\n")

    def _build_native(self, ext):
        objects = []
        for src in ext.sources:
            flags = COMMON + SOURCES[os.path.basename(src)]
            objects += self.compiler.compile([src], output_dir=self.build_temp,
                                             extra_postargs=flags, depends=ext.depends)
        out = self.get_ext_fullpath(ext.name)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        self.compiler.link_shared_object(objects, out, extra_postargs=["-pthread", "-lm"])


setup(
    ext_modules=[Extension(
        "pddnet.backends.native.lib._pddnet_head",
        sources=[f"{NATIVE}/{name}" for name in SOURCES],
        depends=[f"{NATIVE}/pdd_head.h", f"{NATIVE}/pdd_kernels.inc"],
        optional=True,
    )],
    cmdclass={"build_ext": BuildNative},
)
