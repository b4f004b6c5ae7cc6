"""Build seqfast: the Python package, `kernels/` as `seqfast.kernels`, and the optional C++ extension `seqfast._C`."""

import glob
import os

from setuptools import find_packages, setup


def _extensions():
    """`seqfast._C` from `csrc/*.cpp`, or nothing when there is no source, no torch or no compiler to build it."""
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if not sources or os.environ.get("SEQFAST_NO_EXTENSION") == "1":
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        return [], {}
    # -fopenmp: at::parallel_for is an inline header that runs serially unless _OPENMP is defined
    flags = ["-O3", "-ffp-contract=fast", "-fopenmp"]
    ext = CppExtension("seqfast._C", sources, extra_compile_args=flags, extra_link_args=["-fopenmp"])

    class OptionalBuildExt(BuildExtension.with_options(no_python_abi_suffix=False)):
        """A failed build (no compiler, bad toolchain) installs seqfast without `_C` instead of failing."""

        def run(self):
            print("seqfast: compiling the C++ extension seqfast._C, a few minutes (SEQFAST_NO_EXTENSION=1 skips it)")
            try:
                super().run()
            except Exception as e:  # noqa: BLE001 - any build failure leaves the pure-Python package
                print(f"seqfast: not building the C++ extension seqfast._C ({type(e).__name__}: {e})")

    return [ext], {"build_ext": OptionalBuildExt}


ext_modules, cmdclass = _extensions()

setup(
    packages=["seqfast", "seqfast.kernels"] + [f"seqfast.kernels.{p}" for p in find_packages("kernels")],
    package_dir={"seqfast": "seqfast", "seqfast.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
