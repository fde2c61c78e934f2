"""How the CUDA extension is built: its sources, source hash, target GPUs and the CUDA folders.

Shared by the JIT build (``build.py``) and the ahead-of-time build (``setup.py``, which loads this
file on its own), so it imports nothing from the package; torch only inside the functions that need it.
"""
from __future__ import annotations

import glob
import hashlib
import os
import shutil
import sys
from typing import List

HERE = os.path.dirname(os.path.abspath(__file__))
EXTENSION_NAME = 'fat_dwconv_cuda'
SOURCE_FILES = ('dwconv.cpp', 'dwconv_kernels.cu', 'dwconv.h')
SOURCES = [os.path.join(HERE, name) for name in SOURCE_FILES[:2]]  # compiled; dwconv.h is included
# Without a visible GPU (and no TORCH_CUDA_ARCH_LIST) the build targets Ampere and Hopper.
DEFAULT_ARCH_LIST = '8.0;9.0'


def source_hash() -> str:
    """A hash of the kernel sources. Both builds compile it into the module (``source_hash``), so an
    installed build made from other sources is recognised and not used."""
    digest = hashlib.sha1()
    for name in SOURCE_FILES:
        with open(os.path.join(HERE, name), 'rb') as f:
            digest.update(name.encode() + b'\0' + f.read())
    return digest.hexdigest()[:16]


def arch_list() -> str:
    """The GPU architectures to build for: ``$TORCH_CUDA_ARCH_LIST``, else the visible GPUs', else
    ``DEFAULT_ARCH_LIST``."""
    import torch

    if os.environ.get('TORCH_CUDA_ARCH_LIST'):
        return os.environ['TORCH_CUDA_ARCH_LIST']
    if torch.cuda.is_available():
        capabilities = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
        return ';'.join(f'{major}.{minor}' for major, minor in sorted(capabilities))
    return DEFAULT_ARCH_LIST


def compile_flags() -> dict:
    """Compiler flags of both builds. No --use_fast_math: it would only add flush-to-zero; the kernels
    are plain multiply-adds."""
    define = f'-DFAT_DWCONV_SOURCE_HASH={source_hash()}'  # unquoted (shells and ninja strip quotes)
    return {'cxx': ['-O3', define], 'nvcc': ['-O3', define]}


def _cuda_roots() -> List[str]:
    """Candidate CUDA toolkit folders. torch may take CUDA_HOME from where ``nvcc`` is found (e.g.
    /usr/local when nvcc is a wrapper in /usr/local/bin), which then lacks the toolkit's headers and
    libraries, so the toolkit ``nvcc`` resolves to and /usr/local/cuda are tried too."""
    from torch.utils.cpp_extension import CUDA_HOME

    nvcc = shutil.which('nvcc')
    roots = [os.environ.get('CUDA_HOME'), os.environ.get('CUDA_PATH'), CUDA_HOME,
             os.path.dirname(os.path.dirname(os.path.realpath(nvcc))) if nvcc else None, '/usr/local/cuda']
    return list(dict.fromkeys(r for r in roots if r))


def cuda_include_dirs() -> List[str]:
    """Include folders for the build: the toolkit's own, then the headers of pip's nvidia packages
    (torch's CUDA headers include cusparse.h and cublas_v2.h, which a system toolkit may lack). The
    toolkit comes first: the pip folder's cuda_runtime_api.h is incomplete without it."""
    toolkit = [os.path.join(r, 'include') for r in _cuda_roots()
               if os.path.exists(os.path.join(r, 'include', 'cuda_runtime_api.h'))][:1]
    if toolkit and os.path.exists(os.path.join(toolkit[0], 'cusparse.h')):
        return toolkit
    found = set()
    for root in sys.path:
        found.update(glob.glob(os.path.join(root, 'nvidia', 'cu[0-9]*', 'include')))
    return toolkit + sorted(found)


def cuda_library_dirs() -> List[str]:
    """Folders holding libcudart.so (see ``_cuda_roots``)."""
    return [os.path.join(r, 'lib64') for r in _cuda_roots() if os.path.exists(os.path.join(r, 'lib64', 'libcudart.so'))]
