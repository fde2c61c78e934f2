"""The CPU side: a depthwise convolution whose weight and bias gradients come from ``dwconv_cpu.cpp``.

On CPU, PyTorch's (oneDNN's) depthwise weight gradient is the slowest op of a FAT training step: for
the 5x5 convs at FAT-B0's stage-0 width it takes 7x the forward. The forward and the input gradient
stay on PyTorch, which is fast for them; only the weight and bias gradients change.

The source is a plain C function (no torch headers), built with the system C++ compiler on first use
in about a second, for this machine's CPU (``-march=native``), into the kernels' cache folder, and
loaded with ctypes. A failed build logs one warning (``kernels.dwconv.load_cpu_library``) and leaves
PyTorch's gradient in place.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .trusted import check_private, private_folder, write_replacing

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'dwconv_cpu.cpp')
LIBRARY_NAME = 'libfat_dwconv_cpu.so'
COMPILE_FLAGS = ['-O3', '-march=native', '-shared', '-fPIC', '-pthread', '-std=c++17']


def _cpu_identity() -> str:
    """What ``-march=native`` depends on: the CPU's model and feature flags."""
    try:
        with open('/proc/cpuinfo') as f:
            lines = [line for line in f if line.startswith(('model name', 'flags'))]
        return ''.join(sorted(set(lines)))
    except OSError:
        return platform.processor() or platform.machine()


def _compiler() -> Optional[str]:
    return next((c for c in (os.environ.get('CXX'), 'c++', 'g++', 'clang++') if c and shutil.which(c)), None)


def library_path(build_root: str, compiler: str) -> str:
    """``<build_root>/cpu-<hash>/libfat_dwconv_cpu.so``; the hash covers the source, the compiler, the
    flags and the CPU, so a changed source or another machine sharing the folder gets its own build."""
    with open(SOURCE, 'rb') as f:
        digest = hashlib.sha1(f.read())
    digest.update('\0'.join([compiler, *COMPILE_FLAGS, _cpu_identity()]).encode())
    return os.path.join(build_root, f'cpu-{digest.hexdigest()[:16]}', LIBRARY_NAME)


def _build(path: str, compiler: str) -> None:
    """Compile into a temporary file beside ``path`` and rename it into place (processes building at
    the same time never load a half-written library)."""
    def compile_to(tmp: str) -> None:
        result = subprocess.run([compiler, *COMPILE_FLAGS, SOURCE, '-o', tmp], capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(' | '.join((result.stderr.strip().splitlines() or ['no output'])[:3]))
    write_replacing(path, compile_to)


def build_library(build_root: str):
    """The compiled weight-gradient function, built into ``build_root`` unless already there; its
    folder and the library must be private to this user (``trusted``). Raises when there is no compiler, the build fails or the files
    are not private (``kernels.dwconv.load_cpu_library`` turns that into one warning)."""
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError('no C++ compiler found (set CXX)')
    path = library_path(build_root, compiler)
    private_folder(os.path.dirname(path))
    if not os.path.exists(path):
        _build(path, compiler)
    check_private(path)
    function = ctypes.CDLL(path).fat_dwconv_weight_bias_grad_nhwc
    function.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 10
    function.restype = ctypes.c_int
    return function


def weight_bias_grad(function, grad_out: torch.Tensor, x: torch.Tensor, kernel_size: int,
                     stride: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Gradients of ``F.conv2d(x, w, b, stride, k // 2, groups=C)`` in ``w`` (C, 1, k, k) and ``b`` (C,),
    fp32, from the compiled ``function``. Inputs in NCHW are converted to channels_last first."""
    x = x.contiguous(memory_format=torch.channels_last)
    grad_out = grad_out.contiguous(memory_format=torch.channels_last)
    b, c, h, w = x.shape
    grad_w = torch.empty(kernel_size, kernel_size, c, dtype=torch.float32)  # what the C function writes
    grad_b = torch.empty(c, dtype=torch.float32)
    status = function(x.data_ptr(), grad_out.data_ptr(), grad_w.data_ptr(), grad_b.data_ptr(), b, h, w, c,
                      grad_out.shape[2], grad_out.shape[3], kernel_size, stride, kernel_size // 2,
                      torch.get_num_threads())
    if status != 0:
        raise RuntimeError(f'the depthwise-conv CPU kernel rejected the shapes x {tuple(x.shape)}, '
                           f'grad {tuple(grad_out.shape)}, kernel {kernel_size}, stride {stride}')
    return grad_w.permute(2, 0, 1).unsqueeze(1), grad_b


class DepthwiseConv2dCPUFunction(torch.autograd.Function):
    """``conv(GELU(x))`` (plus ``GELU(x)`` with ``residual``, stride 1), ``conv`` being ``F.conv2d``'s
    depthwise convolution, with its weight and bias gradients from the compiled kernel. fp32 CPU
    tensors; the output keeps the input's memory format, as ``F.conv2d`` does.

    Only ``x`` is kept for backward and GELU is recomputed there, so the activation between the two
    is never stored (FAT's ConvFFN: one map of 4x the block's width less per block).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: int,
                function, residual: bool = False) -> torch.Tensor:
        k = weight.shape[-1]
        a = F.gelu(x)
        y = F.conv2d(a, weight, bias, stride, k // 2, 1, a.shape[1])
        if residual:
            y += a
        ctx.save_for_backward(x, weight)
        ctx.stride, ctx.function, ctx.has_bias, ctx.residual = stride, function, bias is not None, residual
        return y

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight = ctx.saved_tensors
        k, s = weight.shape[-1], ctx.stride
        a = F.gelu(x)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.convolution_backward(
                grad_out, a, weight, None, [s, s], [k // 2, k // 2], [1, 1], False, [0, 0], a.shape[1],
                [True, False, False])[0]
            if ctx.residual:
                grad_x += grad_out
            # in place: no new buffer of the block's widest size
            grad_x = torch.ops.aten.gelu_backward.grad_input(grad_x, x, grad_input=grad_x)
        if ctx.needs_input_grad[1] or (ctx.has_bias and ctx.needs_input_grad[2]):
            grad_w, grad_b = weight_bias_grad(ctx.function, grad_out, a, k, s)
            grad_w = grad_w if ctx.needs_input_grad[1] else None
            grad_b = grad_b if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None, None, None
