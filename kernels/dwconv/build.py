"""Loading our compiled code, once per process: the CUDA extension (installed, or JIT-built with
ninja) and the CPU weight-gradient library. A failure is one warning and None, never an exception."""
from __future__ import annotations

import fcntl
import logging
import os
import threading
from typing import Callable, Dict

import torch

from . import cpu, toolchain
from .trusted import private_folder

logger = logging.getLogger('kernels.dwconv')

_lock = threading.Lock()
_loaded: Dict[str, object] = {}


def build_directory() -> str:
    """Where builds go: ``$FAT_KERNELS_BUILD_DIR``, else ``~/.cache/fat_kernels/<torch>-<cuda>-sm<archs>``
    (a build for other GPUs, or another torch, never shares a folder); refused as
    ``trusted.check_private`` says when others could plant code there."""
    archs = toolchain.arch_list().replace(';', '_').replace(' ', '_').replace('.', '')
    default = os.path.join(os.path.expanduser('~'), '.cache', 'fat_kernels',
                           f'torch{torch.__version__}-cuda{torch.version.cuda}-sm{archs}'.replace('+', '_'))
    return private_folder(os.environ.get('FAT_KERNELS_BUILD_DIR', default))


def _error_summary(error: BaseException) -> str:
    """The lines of a build log that say what went wrong (the whole log is long)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    errors = [line for line in lines if 'error' in line.lower() and not line.startswith('[')]
    return ' | '.join(errors[:3] or lines[:1] or [type(error).__name__])


def _jit_build(verbose: bool):
    """``torch.utils.cpp_extension.load`` of the sources into ``build_directory()``, under an OS lock
    (released by the kernel when its holder dies). Under it, a ``lock`` file left by a killed build
    of a torch whose cpp_extension marks a build by the file's existence is removed: otherwise every
    later build waits on it for ever."""
    from torch.utils.cpp_extension import load

    directory = build_directory()
    with open(os.path.join(directory, 'fat_build.lock'), 'w') as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        stale = os.path.join(directory, 'lock')
        if os.path.exists(stale):
            os.remove(stale)
        previous = os.environ.get('TORCH_CUDA_ARCH_LIST')
        os.environ['TORCH_CUDA_ARCH_LIST'] = toolchain.arch_list()
        try:
            flags = toolchain.compile_flags()
            return load(name=toolchain.EXTENSION_NAME, sources=toolchain.SOURCES, extra_cflags=flags['cxx'],
                        extra_cuda_cflags=flags['nvcc'], extra_include_paths=toolchain.cuda_include_dirs(),
                        extra_ldflags=[f'-L{d}' for d in toolchain.cuda_library_dirs()],
                        build_directory=directory, verbose=verbose)
        finally:
            if previous is None:
                os.environ.pop('TORCH_CUDA_ARCH_LIST', None)
            else:
                os.environ['TORCH_CUDA_ARCH_LIST'] = previous


def _installed_or_built(verbose: bool):
    """An installed ``fat_dwconv_cuda`` built from the current sources, else a JIT build."""
    try:
        import fat_dwconv_cuda as module
    except ImportError:
        return _jit_build(verbose)
    if getattr(module, 'source_hash', None) == toolchain.source_hash():
        return module
    logger.warning(f'the installed {toolchain.EXTENSION_NAME} ({module.__file__}) was built from other sources '
                   'than kernels/dwconv; building the current ones (reinstall: pip install ./kernels/dwconv '
                   '--no-build-isolation)')
    return _jit_build(verbose)


def _load_once(key: str, load: Callable[[], object], what: str):
    """``load()``, once per process; on failure one warning saying why, and None from then on."""
    with _lock:
        if key not in _loaded:
            try:
                _loaded[key] = load()
            except BaseException as error:  # noqa: B036 -- a build may also end in SystemExit
                if isinstance(error, KeyboardInterrupt):
                    raise
                logger.warning(f'{what} could not be built ({_error_summary(error)}); '
                               'PyTorch depthwise convolutions are used instead')
                _loaded[key] = None
        return _loaded[key]


def load_extension(verbose: bool = False):
    """The compiled CUDA extension: an installed build of the current sources (``pip install
    ./kernels/dwconv``), else JIT-built with ninja, once per process. On failure: one warning, None."""
    return _load_once('cuda', lambda: _installed_or_built(verbose), 'the depthwise-conv CUDA extension')


def load_cpu_library():
    """The CPU weight-gradient function, built on first use into ``build_directory()``, once per
    process. On failure: one warning saying why, and None."""
    return _load_once('cpu', lambda: cpu.build_library(build_directory()), 'the depthwise-conv CPU kernel')
