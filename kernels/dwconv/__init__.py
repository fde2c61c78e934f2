"""Our CUDA depthwise convolution for FAT's large kernels, with a self-check and a PyTorch fallback.

Public API (used by ``models/dwconv.py``; this package imports nothing else from the project):

- ``depthwise_conv2d(x, weight, bias, stride)``: same result as
  ``F.conv2d(x, weight, bias, stride, k // 2, 1, groups=C)``, differentiable in x, weight and bias.
- ``is_usable(device)``: the extension is built and passed its first-use check on ``device``.
- ``preferred(kernel_size, stride, dtype)``: whether ``auto`` should pick it over cuDNN.
- ``supports(kernel_size, stride)``: shapes the kernels implement.
- ``load_extension()``: the compiled module (installed, or JIT-built with ninja), or None.

Layout policy: the kernels compute NCHW; a channels_last input is converted to NCHW and the result
back to channels_last (one copy each way).
"""
from __future__ import annotations

import glob
import logging
import os
import sys
import threading
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'dwconv.cu')
EXTENSION_NAME = 'fat_dwconv_cuda'
KERNEL_SIZES = range(3, 32, 2)
# (kernel size, stride, dtype) where ours measured faster than cuDNN forward + backward. Empty until a
# GPU benchmark (benchmarks/bench_dwconv.py) fills it: until then 'auto' keeps cuDNN everywhere, so
# it is never slower; MODEL.DWCONV_IMPL 'cuda' selects ours explicitly.
MEASURED_FASTER: frozenset = frozenset()

_lock = threading.Lock()
_extension: Dict[str, object] = {}
_usable: Dict[str, bool] = {}


def supports(kernel_size: int, stride: int) -> bool:
    """Kernel sizes 3..31 (odd) with stride 1 or 2."""
    return kernel_size in KERNEL_SIZES and stride in (1, 2)


def preferred(kernel_size: int, stride: int, dtype: torch.dtype) -> bool:
    """Whether 'auto' picks our kernel for this case (only where measured faster than cuDNN)."""
    return (kernel_size, stride, dtype) in MEASURED_FASTER


def cuda_include_dirs() -> list:
    """CUDA headers that torch's own headers need (cusparse.h, cublas_v2.h): pip's nvidia packages
    ship them when the system CUDA folder lacks them."""
    found = []
    for root in sys.path:
        found += glob.glob(os.path.join(root, 'nvidia', 'cu*', 'include'))
    return sorted(set(found))


def cuda_library_dirs() -> list:
    """Folders holding libcudart.so: torch may take CUDA_HOME from where `nvcc` is found (e.g.
    /usr/local when nvcc is /usr/local/bin/nvcc), whose lib64 does not hold the runtime."""
    from torch.utils.cpp_extension import CUDA_HOME

    roots = [CUDA_HOME, os.environ.get('CUDA_HOME'), os.environ.get('CUDA_PATH'), '/usr/local/cuda']
    return [os.path.join(root, 'lib64') for root in dict.fromkeys(r for r in roots if r)
            if os.path.exists(os.path.join(root, 'lib64', 'libcudart.so'))]


def _error_summary(error: Exception) -> str:
    """The lines of a build log that say what went wrong (the log itself is long)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    errors = [line for line in lines if 'error' in line.lower() and not line.startswith('[')]
    return ' | '.join(errors[:3] or lines[:1] or [type(error).__name__])


def build_directory() -> str:
    default = os.path.join(os.path.expanduser('~'), '.cache', 'fat_kernels',
                           f'torch{torch.__version__}-cuda{torch.version.cuda}'.replace('+', '_'))
    path = os.environ.get('FAT_KERNELS_BUILD_DIR', default)
    os.makedirs(path, exist_ok=True)
    return path


def _build(verbose: bool):
    from torch.utils.cpp_extension import load

    if not os.environ.get('TORCH_CUDA_ARCH_LIST') and not torch.cuda.is_available():
        os.environ['TORCH_CUDA_ARCH_LIST'] = '8.0;9.0'  # no GPU to ask: Ampere and Hopper
    return load(name=EXTENSION_NAME, sources=[SOURCE], extra_cuda_cflags=['-O3'],
                extra_include_paths=cuda_include_dirs(), extra_ldflags=[f'-L{d}' for d in cuda_library_dirs()],
                build_directory=build_directory(), verbose=verbose)


def load_extension(verbose: bool = False):
    """The compiled extension (an installed build first, else built once per process), or None with
    one warning saying why."""
    with _lock:
        if 'module' not in _extension:
            try:
                import fat_dwconv_cuda as module  # installed with kernels/dwconv/setup.py
            except ImportError:
                try:
                    module = _build(verbose)
                except Exception as error:  # any build failure means: fall back to PyTorch
                    logger.warning(f'the depthwise-conv CUDA extension could not be built ({_error_summary(error)}); '
                                   'FAT uses PyTorch depthwise convolutions instead')
                    module = None
            _extension['module'] = module
        return _extension['module']


class DepthwiseConv2dFunction(torch.autograd.Function):
    """Autograd wrapper around the extension's forward, input-gradient and weight-gradient kernels."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: int):
        ext = load_extension()
        weight_dtype = weight.dtype
        channels_last = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
        x = x.contiguous()
        weight = weight.to(x.dtype)
        y = ext.forward(x, weight, bias.to(x.dtype) if bias is not None else None, stride)
        ctx.save_for_backward(x, weight)
        ctx.stride, ctx.channels_last = stride, channels_last
        ctx.param_dtypes = (weight_dtype, bias.dtype if bias is not None else None)
        return y.contiguous(memory_format=torch.channels_last) if channels_last else y

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        ext = load_extension()
        x, weight = ctx.saved_tensors
        grad_out = grad_out.to(x.dtype).contiguous()
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = ext.input_grad(grad_out, weight, x.shape[2], x.shape[3], ctx.stride)
            if ctx.channels_last:
                grad_x = grad_x.contiguous(memory_format=torch.channels_last)
        weight_dtype, bias_dtype = ctx.param_dtypes
        if ctx.needs_input_grad[1]:
            grad_w = ext.weight_grad(grad_out, x, weight.shape[-1], ctx.stride).to(weight_dtype)
        if bias_dtype is not None and ctx.needs_input_grad[2]:
            grad_b = grad_out.sum((0, 2, 3), dtype=torch.float32).to(bias_dtype)
        return grad_x, grad_w, grad_b, None


def depthwise_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: int) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, stride, k // 2, 1, groups=C)`` on our kernels (CUDA tensors)."""
    if torch.is_autocast_enabled('cuda'):
        x = x.to(torch.get_autocast_dtype('cuda'))
    return DepthwiseConv2dFunction.apply(x, weight, bias, stride)


def _reference(x, weight, bias, stride):
    return F.conv2d(x, weight, bias, stride, weight.shape[-1] // 2, 1, x.shape[1])


def self_check(device: torch.device, op: Callable = depthwise_conv2d, tolerance: float = 1e-4) -> Optional[str]:
    """Compare ``op`` with F.conv2d, forward and backward, on small random inputs on ``device``
    (fp32; both strides; a small, the largest and an in-between kernel). None if they agree, else
    what differs."""
    generator = torch.Generator(device='cpu').manual_seed(0)
    for k, stride, shape in ((3, 1, (2, 8, 13, 17)), (7, 2, (2, 8, 13, 17)), (31, 1, (1, 4, 9, 40))):
        x = torch.randn(shape, generator=generator).to(device).requires_grad_()
        w = torch.randn(shape[1], 1, k, k, generator=generator).to(device).requires_grad_()
        b = torch.randn(shape[1], generator=generator).to(device).requires_grad_()
        out = op(x, w, b, stride)
        grad = torch.randn(out.shape, generator=generator).to(device)
        got = (out, *torch.autograd.grad(out, (x, w, b), grad))
        ref_out = _reference(x, w, b, stride)
        want = (ref_out, *torch.autograd.grad(ref_out, (x, w, b), grad))
        for name, a, r in zip(('output', 'input grad', 'weight grad', 'bias grad'), got, want):
            if a.shape != r.shape or not torch.allclose(a, r, rtol=tolerance, atol=tolerance * r.abs().max().item()):
                return f'{name} differs from F.conv2d for kernel {k} stride {stride}'
    return None


def is_usable(device: torch.device) -> bool:
    """True when the extension is built and passed ``self_check`` on this CUDA device (checked once
    per device; a failure logs one warning and stays False). Never raises."""
    if device.type != 'cuda':
        return False
    key = str(device)
    if key not in _usable:
        try:
            problem = 'it could not be built' if load_extension() is None else self_check(device)
        except Exception as error:  # a crashing kernel is just as unusable as a wrong one
            problem = f'{type(error).__name__}: {error}'
        if problem:
            logger.warning(f'the depthwise-conv CUDA extension is not used on {key}: {problem}; '
                           'falling back to PyTorch')
        _usable[key] = problem is None
    return _usable[key]
