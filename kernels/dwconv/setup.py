"""Ahead-of-time build of FAT's depthwise-conv CUDA extension.

    pip install ./kernels/dwconv --no-build-isolation      # TORCH_CUDA_ARCH_LIST picks the GPUs

Without it the extension is JIT-built on first use (kernels/dwconv/__init__.py).
"""
import glob
import os
import sys

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CUDAExtension

here = os.path.dirname(os.path.abspath(__file__))
nvidia_includes = sorted({d for root in sys.path for d in glob.glob(os.path.join(root, 'nvidia', 'cu*', 'include'))})
cuda_lib_dirs = [d for d in (os.path.join(os.environ.get('CUDA_HOME', '/usr/local/cuda'), 'lib64'),)
                 if os.path.exists(os.path.join(d, 'libcudart.so'))]

setup(
    name='fat-dwconv-cuda',
    version='1.0.0',
    description="FAT's depthwise 2-D convolution for large kernels (CUDA)",
    ext_modules=[CUDAExtension('fat_dwconv_cuda', [os.path.join(here, 'dwconv.cu')],
                               include_dirs=nvidia_includes, library_dirs=cuda_lib_dirs, extra_compile_args={'cxx': ['-O3'], 'nvcc': ['-O3']})],
    cmdclass={'build_ext': BuildExtension},
)
