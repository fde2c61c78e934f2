"""Ahead-of-time build of FAT's depthwise-conv CUDA extension (the same sources and flags as the JIT build).

    TORCH_CUDA_ARCH_LIST="8.0;9.0" pip install ./kernels/dwconv --no-build-isolation

TORCH_CUDA_ARCH_LIST picks the GPUs (default: the visible GPUs', else 8.0 and 9.0). Without this step
the extension is JIT-built on first use (kernels/dwconv/build.py); an installed build is used when it
was built from the current sources.
"""
import importlib.util
import os

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CUDAExtension

here = os.path.dirname(os.path.abspath(__file__))
# toolchain.py on its own: the package's __init__ uses relative imports, which fail outside the package.
_spec = importlib.util.spec_from_file_location('fat_dwconv_toolchain', os.path.join(here, 'toolchain.py'))
toolchain = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(toolchain)
os.environ['TORCH_CUDA_ARCH_LIST'] = toolchain.arch_list()

setup(
    name='fat-dwconv-cuda',
    version='1.2.0',
    description="FAT's depthwise 2-D convolution for large kernels (CUDA)",
    ext_modules=[CUDAExtension(
        toolchain.EXTENSION_NAME,
        [os.path.relpath(s, here) for s in toolchain.SOURCES],  # pip runs this file from its folder
        include_dirs=[here] + toolchain.cuda_include_dirs(),
        library_dirs=toolchain.cuda_library_dirs(),
        extra_compile_args=toolchain.compile_flags(),
    )],
    cmdclass={'build_ext': BuildExtension},
)
