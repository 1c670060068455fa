"""Builds the optional C++ (OpenMP) extension ``logo_kernels._C`` from ``csrc/``.

The extension is *optional*: if there is no compiler, or the build fails, installation still succeeds
and ``logo_kernels`` falls back to its chunked torch backend (with a one-line warning at first use).
Set ``LOGO_KERNELS_NO_EXT=1`` to skip the build on purpose.
"""
import glob
import os
import sys

from setuptools import setup


def _extensions():
    if os.environ.get("LOGO_KERNELS_NO_EXT", "0") == "1":
        print("LOGO_KERNELS_NO_EXT=1: skipping the C++ extension", file=sys.stderr)
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:  # torch missing at build time: pure-python install
        print("torch is not importable at build time: skipping the C++ extension", file=sys.stderr)
        return [], {}

    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    ext = CppExtension(
        name="logo_kernels._C",
        sources=sources,
        include_dirs=[os.path.abspath("csrc")],
        extra_compile_args=["-O3", "-fopenmp", "-std=c++17"],
        extra_link_args=["-fopenmp"],
    )
    ext.optional = True

    class OptionalBuildExtension(BuildExtension):
        """torch's BuildExtension probes the compiler before setuptools' `optional` handling applies:
        any failure of the build becomes a warning, and the package installs without `_C`."""

        def run(self):
            try:
                super().run()
            except Exception as exc:  # noqa: BLE001 - any build failure must not fail the install
                print(f"WARNING: logo_kernels._C was not built ({type(exc).__name__}: {exc}); "
                      "logo_kernels will use its torch backend", file=sys.stderr)
                return
            self.record_torch_version()

        def record_torch_version(self):
            """``_C.torch-version`` beside the built library: the torch it was compiled against, which
            logo_kernels compares with the running torch before it loads the library (C++ ABIs differ
            between torch releases)."""
            import torch

            for ext in self.extensions:
                built = self.get_ext_fullpath(ext.name)
                if os.path.exists(built):
                    with open(os.path.join(os.path.dirname(built), "_C.torch-version"), "w") as handle:
                        handle.write(torch.__version__ + "\n")

    return [ext], {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
