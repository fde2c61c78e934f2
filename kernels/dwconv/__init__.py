"""Our depthwise convolution for FAT's large kernels (CUDA kernels, and a CPU weight gradient), with
a self-check and a PyTorch fallback.

Public API (used by ``models/dwconv.py``; this package imports nothing else from the project):

- ``depthwise_conv2d(x, weight, bias, stride)``: same result as
  ``F.conv2d(x, weight, bias, stride, k // 2, 1, groups=C)``, differentiable in x, weight and bias,
  through the ``torch.ops.fat.depthwise_conv2d`` operator (``ops.py``): CUDA tensors run our kernels;
  fp32 CPU tensors run PyTorch's forward and input gradient with our weight and bias gradients.
- ``gelu_depthwise_conv2d(x, weight, bias, stride, residual=False)``: ``conv(GELU(x))`` (+ ``GELU(x)``)
  on CPU, storing only ``x`` for backward (eager only).
- ``is_usable(device, kernel_size=None, stride=None, dtype=None)``: our code for that device is built
  and passed its first-use self-check there (for that case, when given).
- ``supports(kernel_size, stride)`` / ``SUPPORTED_KERNEL_SIZES``: the shapes the kernels implement.
- ``choose(device, case, measure=True)``: whether ``MODEL.DWCONV_IMPL: auto`` runs ours for a
  ``Case`` (kernel, stride, dtype, layout, input shape, backward): timed against PyTorch at first use
  on this device and remembered (``autotune.py``); with ``measure=False``, the measured tables.
- ``preferred(kernel_size, stride, dtype, device_type='cuda', channels_last=False)``: the measured
  tables (``PREFERRED_CASES``, ``PREFERRED_CPU_CASES``), for cases not timed.
- ``load_extension(verbose=False)``: the compiled CUDA module (installed, or JIT-built), or None.
- ``load_cpu_library()``: the compiled CPU weight-gradient function, or None.
- ``self_check(device, cases, op=depthwise_conv2d)``: what differs from fp64 ``F.conv2d``, or None.
"""
from __future__ import annotations

import logging
import math
import threading
from typing import Callable, Dict, Iterable, Optional, Tuple

import torch
import torch.nn.functional as F

from . import autotune, cpu, ops
from .autotune import Case
from .build import build_directory, load_cpu_library, load_extension

__all__ = ['Case', 'PREFERRED_CASES', 'PREFERRED_CPU_CASES', 'SELF_CHECK_SHAPES', 'SUPPORTED_KERNEL_SIZES',
           'build_directory', 'choose', 'depthwise_conv2d', 'gelu_depthwise_conv2d', 'is_usable', 'load_cpu_library',
           'load_extension', 'preferred', 'self_check', 'supports']

logger = logging.getLogger(__name__)

SUPPORTED_KERNEL_SIZES = range(3, 32, 2)
SUPPORTED_STRIDES = (1, 2)

# Where MODEL.DWCONV_IMPL 'auto' uses our kernel instead of cuDNN when a case is not timed (``choose``): (kernel sizes, strides, dtypes,
# layouts) whose every measured shape ran forward + backward at least 1.05x as fast as cuDNN on an H100
# (benchmarks/bench_dwconv.py, 2026-11-25; tables in benchmarks/README.md). bf16: every depthwise
# shape of FAT-B0..B3 at 224 and kernels 7..31, batch 128, outputs and gradients compared (1.24-4.1x).
# fp16 and fp32: FAT-B0's shapes (fp16's 5x5 FFN convs were slower than cuDNN, 0.64-1.01x). Stride 2
# is left to cuDNN: its 5x5 wins on large maps (up to 2.9x) but loses on 14-28 px ones (down to 0.34x).
# channels_last is left to cuDNN: the layout copies cost more than the kernel gains (0.25-0.7x mostly).
PREFERRED_CASES: tuple = (
    (range(3, 32, 2), (1,), (torch.bfloat16,), ('nchw',)),
    ((3, 7, 9), (1,), (torch.float16,), ('nchw',)),
    ((3, 5, 7, 9), (1,), (torch.float32,), ('nchw',)),
)

# The same for CPU (training: only the weight gradient differs). Measured with bench_dwconv.py --device
# cpu on 2026-11-25: forward + backward 1.4-4.6x oneDNN's for kernels >= 5 at FAT-B0's stage widths on a
# 2-core AMD EPYC Zen 4, 1.0-2.7x on a 2-core Intel Xeon (a few small refined-downsampling steps slower on
# each); slower for its 3x3 (32 channels at 56x56); fp32 only.
PREFERRED_CPU_CASES: tuple = ((range(5, 32, 2), (1, 2), (torch.float32,), ('nchw', 'channels_last')),)

_lock = threading.Lock()
_usable: Dict[tuple, bool] = {}


def supports(kernel_size: int, stride: int) -> bool:
    """Whether the kernels implement this shape: odd kernel sizes 3..31, stride 1 or 2."""
    return kernel_size in SUPPORTED_KERNEL_SIZES and stride in SUPPORTED_STRIDES


def preferred(kernel_size: int, stride: int, dtype: torch.dtype, device_type: str = 'cuda',
              channels_last: bool = False) -> bool:
    """Whether 'auto' picks ours over PyTorch for this case (listed in ``PREFERRED_CASES`` for CUDA,
    ``PREFERRED_CPU_CASES`` for CPU)."""
    cases = PREFERRED_CPU_CASES if device_type == 'cpu' else PREFERRED_CASES
    layout = 'channels_last' if channels_last else 'nchw'
    return any(kernel_size in sizes and stride in strides and dtype in dtypes and layout in layouts
               for sizes, strides, dtypes, layouts in cases)


def choose(device: torch.device, case: Case, measure: bool = True, folder: Optional[str] = None) -> bool:
    """Whether 'auto' runs ours for ``case`` on ``device``: only where the kernels implement it and
    passed their self-check there, and on CPU only for fp32 cases with a backward (ours differs only
    in the weight gradient). Then, with ``measure``, as timed against PyTorch at the case's first use
    on this device and remembered (``autotune``; in ``folder`` when given); without, as the measured
    tables say."""
    device = torch.device(device)
    k, s = case.kernel_size, case.stride
    if not supports(k, s) or device.type not in ('cuda', 'cpu'):
        return False
    if device.type == 'cpu' and (not case.backward or case.dtype != torch.float32):
        return False
    if device.type == 'cuda' and device.index is None:
        device = torch.device('cuda', torch.cuda.current_device())
    table = lambda: preferred(k, s, case.dtype, device.type, case.channels_last)  # noqa: E731
    usable = lambda: is_usable(device, k, s, case.dtype)  # noqa: E731
    if not measure:
        return table() and usable()
    return autotune.tuner(device, folder).decide(case, depthwise_conv2d, usable, table)


def depthwise_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: int) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, stride, k // 2, 1, groups=C)`` on our kernels (``torch.ops.fat``):
    CUDA tensors, or CPU tensors (our weight gradient for fp32).

    Under ``torch.autocast('cuda')`` the input is cast to the autocast dtype, as ``F.conv2d`` does.
    """
    if x.is_cuda and torch.is_autocast_enabled('cuda'):
        x = x.to(torch.get_autocast_dtype('cuda'))
    return ops.depthwise_conv2d(x, weight, bias, stride)


def gelu_depthwise_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: int,
                          residual: bool = False) -> torch.Tensor:
    """``conv(a) (+ a if residual)`` with ``a = GELU(x)`` and ``conv`` as in ``depthwise_conv2d``, on
    fp32 CPU tensors, keeping only ``x`` for backward (GELU is recomputed there)."""
    if residual and stride != 1:
        raise ValueError(f'a residual depthwise conv needs stride 1, got {stride}')
    if x.device.type != 'cpu' or x.dtype != torch.float32 or torch.is_autocast_enabled('cpu'):
        raise RuntimeError(f'the depthwise-conv CPU kernel takes fp32 CPU tensors outside autocast, got {x.dtype} '
                           f'on {x.device}')
    function = load_cpu_library()
    if function is None:
        raise RuntimeError('the depthwise-conv CPU kernel in kernels/dwconv is not available (see the warning '
                           "above); check kernels.dwconv.is_usable('cpu') first")
    return cpu.DepthwiseConv2dCPUFunction.apply(x, weight, bias, stride, function, residual)


# Shapes of the self-check: more than one tile in each direction with partly empty last blocks, many
# small planes packed per block, and a single pixel.
SELF_CHECK_SHAPES = ((2, 8, 70, 40), (5, 8, 7, 7), (1, 4, 1, 1))


def _tolerance(dtype: torch.dtype, terms: int) -> float:
    """Allowed |ours - fp64 reference| per unit of the element's sum of |terms|, for a case computed in
    ``dtype``: a few units of its precision (rounding of inputs and results) plus fp32 accumulation
    over ``terms`` products."""
    return 4 * torch.finfo(dtype).eps + 4 * math.sqrt(terms) * torch.finfo(torch.float32).eps


def _check_case(device: torch.device, op: Callable, k: int, stride: int, dtype: torch.dtype,
                shape: Tuple[int, int, int, int], generator: torch.Generator) -> Optional[str]:
    """One case against fp64 ``F.conv2d``: output and gradients for x, weight and bias. The weight
    and bias are fp32 parameters (as under autocast); x and the output gradient are ``dtype``."""
    n, c = shape[:2]
    x = torch.randn(shape, generator=generator).to(device, dtype).requires_grad_()
    w = torch.randn(c, 1, k, k, generator=generator).to(device).requires_grad_()
    b = torch.randn(c, generator=generator).to(device).requires_grad_()
    out = op(x, w, b, stride)
    grad = torch.randn(out.shape, generator=generator).to(device, dtype)
    got = (out, *torch.autograd.grad(out, (x, w, b), grad))

    def reference(x64, w64, b64, g64):
        leaves = [t.detach().requires_grad_() for t in (x64, w64, b64)]
        y = F.conv2d(leaves[0], leaves[1], leaves[2], stride, k // 2, 1, c)
        return (y.detach(), *torch.autograd.grad(y, leaves, g64))

    as64 = lambda t: t.detach().to(dtype).double()  # noqa: E731 -- the values ours computes with
    want = reference(as64(x), as64(w), as64(b), grad.double())
    scale = reference(as64(x).abs(), as64(w).abs(), as64(b).abs(), grad.double().abs())  # sums of |terms|
    positions = n * out.shape[2] * out.shape[3]
    names = ('output', 'input grad', 'weight grad', 'bias grad')
    for name, a, r, s, terms in zip(names, got, want, scale, (k * k, k * k, positions, positions)):
        if a.shape != r.shape:
            return f'{name} has shape {tuple(a.shape)}, F.conv2d {tuple(r.shape)}'
        excess = (a.double() - r).abs() - _tolerance(dtype, terms) * s - 1e-30
        if not bool((excess <= 0).all()):  # also catches NaN
            worst = torch.nan_to_num(excess, nan=math.inf).argmax()
            return (f'{name} differs from F.conv2d by {(a.double() - r).abs().flatten()[worst]:.3g} where '
                    f'{_tolerance(dtype, terms) * s.flatten()[worst]:.3g} is allowed')
    return None


def self_check(device: torch.device, cases: Iterable[Tuple[int, int, torch.dtype]],
               op: Optional[Callable] = None) -> Optional[str]:
    """Compare ``op(x, w, b, stride)`` (default ``depthwise_conv2d``) with fp64 ``F.conv2d`` for each
    (kernel size, stride, dtype) of ``cases`` on ``SELF_CHECK_SHAPES``: output and all three
    gradients. Runs with gradients on whatever the caller's mode (``no_grad``, ``inference_mode``).
    None if they agree, else what differs."""
    op = op or depthwise_conv2d
    generator = torch.Generator(device='cpu').manual_seed(0)
    with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False):
        for k, stride, dtype in cases:
            for shape in SELF_CHECK_SHAPES:
                problem = _check_case(device, op, k, stride, dtype, shape, generator)
                if problem:
                    return f'{problem} (kernel {k}, stride {stride}, {dtype}, input {shape})'
    return None


def is_usable(device: torch.device, kernel_size: Optional[int] = None, stride: Optional[int] = None,
              dtype: Optional[torch.dtype] = None) -> bool:
    """True when our code for this device (the CUDA extension, or the CPU weight-gradient kernel) is
    built and passed ``self_check`` there, for (kernel size, stride) in fp32 and ``dtype`` (default: a
    kernel-3 and a kernel-5 stride-2 case). Checked once per device and case; a failure logs one
    warning and stays False. Never raises."""
    try:
        device = torch.device(device)
        if device.type not in ('cuda', 'cpu'):
            return False
        if device.type == 'cuda' and device.index is None:
            device = torch.device('cuda', torch.cuda.current_device())
    except Exception:  # no usable CUDA runtime at all
        return False
    if kernel_size is None:
        cases = ((3, 1, torch.float32), (5, 2, torch.float32))
    else:
        dtypes = (torch.float32,) if device.type == 'cpu' else tuple(dict.fromkeys((torch.float32, dtype or torch.float32)))
        cases = tuple((kernel_size, stride, d) for d in dtypes)
    key = (str(device), cases)
    with _lock:
        known = _usable.get(key)
    if known is not None:
        return known
    try:
        loaded = load_extension() if device.type == 'cuda' else load_cpu_library()
        problem = 'it could not be built' if loaded is None else self_check(device, cases)
    except Exception as error:  # a crashing kernel is as unusable as a wrong one
        problem = f'{type(error).__name__}: {error}'
    if problem:
        logger.warning(f'our depthwise-conv kernels are not used on {device}: {problem}; '
                       'PyTorch depthwise convolutions are used instead')
    with _lock:
        _usable[key] = problem is None
    return _usable[key]
