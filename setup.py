"""Builds qjax's native int8 GEMM (qjax/integer/kernels/int8_gemm.cc) for jax.ffi.

The library is a plain shared object loaded with ctypes (no Python C API): it needs the XLA
FFI headers that jaxlib ships (`jaxlib/include`, the build requirement in pyproject.toml) and a
C++17 compiler. It is optional: when it cannot be built, qjax installs without it and runs
its integer path on XLA.
"""

import os
import pathlib

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


def _ffi_include() -> str:
  import jaxlib  # the include directory of jax.ffi.include_dir(), without importing jax

  return str(pathlib.Path(jaxlib.__file__).parent / "include")


class _BuildNative(build_ext):
  """build_ext with the FFI include path resolved at build time, and a failure a warning."""

  def build_extensions(self):
    try:
      include = _ffi_include()
    except ImportError as error:
      self.warn(f"qjax: jaxlib is not importable at build time ({error}); the native int8 "
                f"GEMM is not built and the integer path will run on XLA.")
      self.extensions = []
      return
    for ext in self.extensions:
      ext.include_dirs.append(include)
    super().build_extensions()


# -fno-tree-pre: GCC's PRE spilled the VNNI accumulators every iteration; -ffp-contract=off:
# the requantization's add then multiply must stay two roundings (no FMA), as XLA's.
_FLAGS = ["-std=c++17", "-O3", "-g0", "-fno-tree-pre", "-ffp-contract=off",
          "-fvisibility=hidden", "-w"]

setup(
    ext_modules=[
        Extension(
            "qjax.integer.kernels._int8_gemm",
            sources=["qjax/integer/kernels/int8_gemm.cc"],
            language="c++",
            extra_compile_args=_FLAGS + os.environ.get("QJAX_CXXFLAGS", "").split(),
            extra_link_args=["-pthread"],
            optional=True,
        )
    ],
    cmdclass={"build_ext": _BuildNative},
)
