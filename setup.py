"""Build of the extension ``nsru._C``.

The C++ (CPU) sources are always compiled. The CUDA sources are added when a CUDA toolkit
and a CUDA-enabled torch are both present; ``NSRU_CUDA=1`` forces them (fails loudly without
a toolkit), ``NSRU_CUDA=0`` skips them. The Triton kernels in ``kernels/`` (a folder, not a package:
``import kernels`` is a PyPI project that transformers imports) ship inside the wheel as
``nsru.kernels``; in a source checkout ``nsru/kernels/__init__.py`` points that package at them.
"""

import glob
import os

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension


def _want_cuda() -> bool:
    flag = os.environ.get("NSRU_CUDA", "auto").lower()
    if flag in ("0", "false", "no", "off"):
        return False
    if flag in ("1", "true", "yes", "on"):
        return True
    return CUDA_HOME is not None and torch.version.cuda is not None


def _extension():
    cpp_sources = sorted(glob.glob("csrc/*.cpp"))
    cxx_flags = ["-O3", "-std=c++20", "-fopenmp"]
    if _want_cuda():
        cuda_sources = sorted(glob.glob("csrc/*.cu"))
        return CUDAExtension(
            "nsru._C",
            cpp_sources + cuda_sources,
            extra_compile_args={
                "cxx": cxx_flags + ["-DNSRU_WITH_CUDA"],
                "nvcc": ["-O3", "-std=c++20", "--use_fast_math", "-DNSRU_WITH_CUDA"],
            },
            extra_link_args=["-fopenmp"],
        )
    return CppExtension("nsru._C", cpp_sources, extra_compile_args=cxx_flags, extra_link_args=["-fopenmp"])


setup(
    packages=find_packages(include=["nsru", "nsru.*"]),
    package_dir={"nsru": "nsru", "nsru.kernels": "kernels"},
    package_data={"nsru.bench": ["data/*.json"]},
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
