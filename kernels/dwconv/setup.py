"""Ahead-of-time build of FAT's depthwise-conv CUDA extension (the same sources as the JIT build).

    TORCH_CUDA_ARCH_LIST="8.0;9.0" pip install ./kernels/dwconv --no-build-isolation

TORCH_CUDA_ARCH_LIST picks the GPUs (default: the visible GPU's). Without this step the extension is
JIT-built on first use (kernels/dwconv/__init__.py); an installed build is preferred when present.
"""
import importlib.util
import os

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CUDAExtension

here = os.path.dirname(os.path.abspath(__file__))
# The same include and library folders as the JIT build (the toolkit's, then pip's nvidia headers).
_spec = importlib.util.spec_from_file_location('fat_dwconv_build', os.path.join(here, '__init__.py'))
_package = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_package)

setup(
    name='fat-dwconv-cuda',
    version='1.1.0',
    description="FAT's depthwise 2-D convolution for large kernels (CUDA)",
    ext_modules=[CUDAExtension(
        'fat_dwconv_cuda',
        ['dwconv.cpp', 'dwconv_kernels.cu'],  # pip runs this file from its folder
        include_dirs=[here] + _package.cuda_include_dirs(),
        library_dirs=_package.cuda_library_dirs(),
        extra_compile_args={'cxx': ['-O3'], 'nvcc': ['-O3']},
    )],
    cmdclass={'build_ext': BuildExtension},
)
