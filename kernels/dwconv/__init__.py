"""Our depthwise convolution for FAT's large kernels (CUDA kernels, and a CPU weight gradient), with
a self-check and a PyTorch fallback.

Public API (used by ``models/dwconv.py``; this package imports nothing else from the project):

- ``depthwise_conv2d(x, weight, bias, stride)``: same result as
  ``F.conv2d(x, weight, bias, stride, k // 2, 1, groups=C)``, differentiable in x, weight and bias.
  CUDA tensors run our kernels; fp32 CPU tensors run PyTorch's forward and input gradient with our
  weight and bias gradients (``cpu.py``).
- ``gelu_depthwise_conv2d(x, weight, bias, stride, residual=False)``: ``conv(GELU(x))`` (+ ``GELU(x)``)
  on CPU, storing only ``x`` for backward.
- ``is_usable(device)``: our code for that device is built and passed its first-use self-check there.
- ``supports(kernel_size, stride)`` / ``SUPPORTED_KERNEL_SIZES``: the shapes the kernels implement.
- ``preferred(kernel_size, stride, dtype, device_type='cuda')``: whether ``MODEL.DWCONV_IMPL: auto``
  picks ours.
- ``load_extension(verbose=False)``: the compiled CUDA module (installed, or JIT-built with ninja), or None.
- ``load_cpu_library()``: the compiled CPU weight-gradient function, or None.
- ``self_check(device, op=depthwise_conv2d)``: what differs from ``F.conv2d``, or None.

Layout policy: the kernels compute NCHW. A channels_last input is converted to NCHW and the output
(and the input gradient) converted back to channels_last: one copy each way.
"""
from __future__ import annotations

import glob
import logging
import os
import shutil
import sys
import threading
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

from . import cpu

__all__ = ['DepthwiseConv2dFunction', 'PREFERRED_CASES', 'PREFERRED_CPU_CASES', 'SUPPORTED_KERNEL_SIZES',
           'depthwise_conv2d', 'gelu_depthwise_conv2d', 'is_usable', 'load_cpu_library', 'load_extension',
           'preferred', 'self_check', 'supports']

logger = logging.getLogger(__name__)

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = [os.path.join(HERE, 'dwconv.cpp'), os.path.join(HERE, 'dwconv_kernels.cu')]
EXTENSION_NAME = 'fat_dwconv_cuda'
SUPPORTED_KERNEL_SIZES = range(3, 32, 2)
SUPPORTED_STRIDES = (1, 2)

# Where MODEL.DWCONV_IMPL 'auto' uses our kernel instead of cuDNN: (kernel sizes, strides, dtypes),
# only where benchmarks/bench_dwconv.py measured forward + backward at least as fast as cuDNN. Empty:
# no GPU has measured it yet (2026-11-24), so 'auto' keeps cuDNN and is never slower. The design
# target to check first: kernels >= 7 in fp16/bf16, e.g. (range(7, 32, 2), (1, 2), (torch.float16,
# torch.bfloat16)).
PREFERRED_CASES: tuple = ()

# The same for CPU (training: only the weight gradient differs). Measured with bench_dwconv.py --device
# cpu on 2026-11-25: forward + backward 1.4-4.6x oneDNN's for kernels >= 5 at FAT-B0's stage widths on a
# 2-core AMD EPYC Zen 4, 1.0-2.7x on a 2-core Intel Xeon (a few small refined-downsampling steps slower on
# each); slower for its 3x3 (32 channels at 56x56); fp32 only.
PREFERRED_CPU_CASES: tuple = ((range(5, 32, 2), (1, 2), (torch.float32,)),)

_lock = threading.Lock()
_extension: Dict[str, object] = {}
_usable: Dict[str, bool] = {}


def supports(kernel_size: int, stride: int) -> bool:
    """Whether the kernels implement this shape: odd kernel sizes 3..31, stride 1 or 2."""
    return kernel_size in SUPPORTED_KERNEL_SIZES and stride in SUPPORTED_STRIDES


def preferred(kernel_size: int, stride: int, dtype: torch.dtype, device_type: str = 'cuda') -> bool:
    """Whether 'auto' picks ours over PyTorch for this case (listed in ``PREFERRED_CASES`` for CUDA,
    ``PREFERRED_CPU_CASES`` for CPU)."""
    cases = PREFERRED_CPU_CASES if device_type == 'cpu' else PREFERRED_CASES
    return any(kernel_size in sizes and stride in strides and dtype in dtypes for sizes, strides, dtypes in cases)


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


def build_directory() -> str:
    """Where the JIT build goes: ``$FAT_KERNELS_BUILD_DIR``, else ``~/.cache/fat_kernels/<torch>-<cuda>``."""
    default = os.path.join(os.path.expanduser('~'), '.cache', 'fat_kernels',
                           f'torch{torch.__version__}-cuda{torch.version.cuda}'.replace('+', '_'))
    path = os.environ.get('FAT_KERNELS_BUILD_DIR', default)
    os.makedirs(path, exist_ok=True)
    return path


def _error_summary(error: BaseException) -> str:
    """The lines of a build log that say what went wrong (the whole log is long)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    errors = [line for line in lines if 'error' in line.lower() and not line.startswith('[')]
    return ' | '.join(errors[:3] or lines[:1] or [type(error).__name__])


def _build(verbose: bool):
    from torch.utils.cpp_extension import load

    arch_list = os.environ.get('TORCH_CUDA_ARCH_LIST')
    if not arch_list and not torch.cuda.is_available():
        os.environ['TORCH_CUDA_ARCH_LIST'] = '8.0;9.0'  # no GPU to ask: Ampere and Hopper
    try:
        # No --use_fast_math: it would only add flush-to-zero; the kernels are plain multiply-adds.
        return load(name=EXTENSION_NAME, sources=SOURCES, extra_cflags=['-O3'], extra_cuda_cflags=['-O3'],
                    extra_include_paths=cuda_include_dirs(),
                    extra_ldflags=[f'-L{d}' for d in cuda_library_dirs()],
                    build_directory=build_directory(), verbose=verbose)
    finally:
        if arch_list is None:
            os.environ.pop('TORCH_CUDA_ARCH_LIST', None)


def _load_once(key: str, load: Callable[[], object], what: str):
    """``load()``, once per process; on failure one warning saying why, and None from then on."""
    with _lock:
        if key not in _extension:
            try:
                _extension[key] = load()
            except BaseException as error:  # noqa: B036 -- a build may also end in SystemExit
                if isinstance(error, KeyboardInterrupt):
                    raise
                logger.warning(f'{what} could not be built ({_error_summary(error)}); '
                               'PyTorch depthwise convolutions are used instead')
                _extension[key] = None
        return _extension[key]


def _installed_or_built(verbose: bool):
    try:
        import fat_dwconv_cuda as module
    except ImportError:
        module = _build(verbose)
    return module


def load_extension(verbose: bool = False):
    """The compiled extension: an installed build (``pip install ./kernels/dwconv``) first, else
    JIT-built with ninja, once per process. On failure: one warning saying why, and None."""
    return _load_once('module', lambda: _installed_or_built(verbose), 'the depthwise-conv CUDA extension')


def load_cpu_library():
    """The CPU weight-gradient function, built on first use into ``build_directory()``, once per
    process. On failure: one warning saying why, and None."""
    return _load_once('cpu', lambda: cpu.build_library(build_directory()), 'the depthwise-conv CPU kernel')


def _is_channels_last(x: torch.Tensor) -> bool:
    return not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


class DepthwiseConv2dFunction(torch.autograd.Function):
    """Autograd wrapper of the extension's forward, input-gradient and weight/bias-gradient kernels.

    ``x`` and ``weight`` are computed in ``x``'s dtype; gradients come back in each argument's dtype.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: int) -> torch.Tensor:
        ext = load_extension()
        if ext is None:
            raise RuntimeError('the depthwise-conv CUDA extension in kernels/dwconv is not available '
                               '(see the warning above); check kernels.dwconv.is_usable(device) first')
        channels_last = _is_channels_last(x)
        x_nchw = x.contiguous()
        w = weight.to(x.dtype)
        y = ext.forward(x_nchw, w, bias.to(x.dtype) if bias is not None else None, stride)
        ctx.save_for_backward(x_nchw, w)
        ctx.stride, ctx.channels_last = stride, channels_last
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        return y.contiguous(memory_format=torch.channels_last) if channels_last else y

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        ext = load_extension()
        x, w = ctx.saved_tensors
        grad_out = grad_out.to(x.dtype).contiguous()
        weight_dtype, bias_dtype = ctx.dtypes
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = ext.input_grad(grad_out, w, x.shape[2], x.shape[3], ctx.stride)
            if ctx.channels_last:
                grad_x = grad_x.contiguous(memory_format=torch.channels_last)
        if ctx.needs_input_grad[1] or (bias_dtype is not None and ctx.needs_input_grad[2]):
            grad_w, grad_b = ext.weight_bias_grad(grad_out, x, w.shape[-1], ctx.stride)
            grad_w = grad_w.to(weight_dtype) if ctx.needs_input_grad[1] else None
            grad_b = grad_b.to(bias_dtype) if bias_dtype is not None and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None


def depthwise_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: int) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, stride, k // 2, 1, groups=C)`` on our kernels: CUDA tensors, or fp32
    CPU tensors outside autocast.

    Under ``torch.autocast('cuda')`` the input is cast to the autocast dtype, as ``F.conv2d`` does.
    """
    if x.is_cuda:
        if torch.is_autocast_enabled('cuda'):
            x = x.to(torch.get_autocast_dtype('cuda'))
        return DepthwiseConv2dFunction.apply(x, weight, bias, stride)
    return cpu.DepthwiseConv2dCPUFunction.apply(x, weight, bias, stride, _cpu_function(x))


def gelu_depthwise_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: int,
                          residual: bool = False) -> torch.Tensor:
    """``conv(a) (+ a if residual)`` with ``a = GELU(x)`` and ``conv`` as in ``depthwise_conv2d``, on
    fp32 CPU tensors, keeping only ``x`` for backward (GELU is recomputed there)."""
    if residual and stride != 1:
        raise ValueError(f'a residual depthwise conv needs stride 1, got {stride}')
    return cpu.DepthwiseConv2dCPUFunction.apply(x, weight, bias, stride, _cpu_function(x), True, residual)


def _cpu_function(x: torch.Tensor):
    if x.device.type != 'cpu' or x.dtype != torch.float32 or torch.is_autocast_enabled('cpu'):
        raise RuntimeError(f'the depthwise-conv CPU kernel takes fp32 CPU tensors outside autocast, got {x.dtype} '
                           f'on {x.device}')
    function = load_cpu_library()
    if function is None:
        raise RuntimeError('the depthwise-conv CPU kernel in kernels/dwconv is not available (see the warning '
                           "above); check kernels.dwconv.is_usable('cpu') first")
    return function


def _reference(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: int) -> torch.Tensor:
    return F.conv2d(x, weight, bias, stride, weight.shape[-1] // 2, 1, x.shape[1])


# (kernel size, stride, shape) of the self-check: the unrolled path (3, 7), the runtime-k path (31),
# odd sizes, both strides, more than one plane per block.
SELF_CHECK_CASES = ((3, 1, (2, 8, 13, 17)), (7, 2, (2, 8, 13, 17)), (5, 2, (1, 4, 30, 9)), (31, 1, (1, 4, 9, 40)))


def self_check(device: torch.device, op: Optional[Callable] = None, tolerance: float = 1e-4) -> Optional[str]:
    """Compare ``op(x, w, b, stride)`` with F.conv2d, output and all three gradients, in fp32 on
    small random inputs on ``device`` (see ``SELF_CHECK_CASES``); ``op`` defaults to ``depthwise_conv2d``.
    None if they agree, else what differs."""
    op = op or depthwise_conv2d
    generator = torch.Generator(device='cpu').manual_seed(0)
    with torch.autocast(device.type, enabled=False):
        for k, stride, shape in SELF_CHECK_CASES:
            x = torch.randn(shape, generator=generator).to(device).requires_grad_()
            w = torch.randn(shape[1], 1, k, k, generator=generator).to(device).requires_grad_()
            b = torch.randn(shape[1], generator=generator).to(device).requires_grad_()
            out = op(x, w, b, stride)
            grad = torch.randn(out.shape, generator=generator).to(device)
            got = (out, *torch.autograd.grad(out, (x, w, b), grad))
            ref_out = _reference(x, w, b, stride)
            want = (ref_out, *torch.autograd.grad(ref_out, (x, w, b), grad))
            for name, a, r in zip(('output', 'input grad', 'weight grad', 'bias grad'), got, want):
                if a.shape != r.shape:
                    return f'{name} has shape {tuple(a.shape)}, F.conv2d {tuple(r.shape)} (kernel {k} stride {stride})'
                error = (a - r).abs().max().item()
                if not error <= tolerance * max(1.0, r.abs().max().item()):  # also catches NaN
                    return f'{name} differs from F.conv2d by {error:.3g} for kernel {k} stride {stride}'
    return None


def is_usable(device: torch.device) -> bool:
    """True when our code for this device (the CUDA extension, or the CPU weight-gradient kernel) is
    built and passed ``self_check`` there. Checked once per device; a failure logs one warning and
    stays False. Never raises."""
    try:
        device = torch.device(device)
        if device.type not in ('cuda', 'cpu'):
            return False
        if device.type == 'cuda' and device.index is None:
            device = torch.device('cuda', torch.cuda.current_device())
    except Exception:  # no usable CUDA runtime at all
        return False
    key = str(device)
    with _lock:
        known = _usable.get(key)
    if known is not None:
        return known
    try:
        loaded = load_extension() if device.type == 'cuda' else load_cpu_library()
        problem = 'it could not be built' if loaded is None else self_check(device)
    except Exception as error:  # a crashing kernel is as unusable as a wrong one
        problem = f'{type(error).__name__}: {error}'
    if problem:
        logger.warning(f'our depthwise-conv kernels are not used on {key}: {problem}; '
                       'PyTorch depthwise convolutions are used instead')
    with _lock:
        _usable[key] = problem is None
    return _usable[key]
