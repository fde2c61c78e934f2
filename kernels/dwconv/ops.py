"""The depthwise convolution as PyTorch operators (``torch.ops.fat.*``), so ``torch.compile``,
``torch.export`` and FX see one op with a known output (fake kernels), and autograd has one formula.

- ``fat::depthwise_conv2d(x, weight, bias, stride)``: ``F.conv2d(x, weight, bias, stride, k // 2,
  groups=C)`` in ``x``'s dtype (weight and bias are cast to it).
- ``fat::depthwise_conv2d_input_grad(grad_out, weight, height, width, stride)``: its input gradient.
- ``fat::depthwise_conv2d_weight_bias_grad(grad_out, x, kernel_size, stride)``: its weight and bias
  gradients, in fp32 (fp64 for fp64 inputs).

CUDA tensors run our extension's kernels; CPU tensors run PyTorch's forward and input gradient, and
our weight gradient for fp32 (``cpu.py``) when it is built. The gradient ops have no gradient of
their own: a second derivative (``create_graph=True``) raises instead of silently dropping terms.

Layout: the CUDA kernels compute NCHW. A channels_last ``x`` (or ``grad_out``) is copied to NCHW and
the result copied back to channels_last; each op's result has the memory format of its first tensor.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import cpu
from .build import load_cpu_library, load_extension


def is_channels_last(x: Tensor) -> bool:
    return not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _like(t: Tensor, layout_of: Tensor) -> Tensor:
    """``t`` in the memory format of ``layout_of`` (see the module's layout rule)."""
    return t.contiguous(memory_format=torch.channels_last if is_channels_last(layout_of) else torch.contiguous_format)


def _out_size(size: int, kernel_size: int, stride: int) -> int:
    return (size + 2 * (kernel_size // 2) - kernel_size) // stride + 1


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _extension():
    ext = load_extension()
    if ext is None:
        raise RuntimeError('the depthwise-conv CUDA extension in kernels/dwconv is not available (see the warning '
                           'above); check kernels.dwconv.is_usable(device) first')
    return ext


@torch.library.custom_op('fat::depthwise_conv2d', mutates_args=())
def depthwise_conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: int) -> Tensor:
    k = weight.shape[-1]
    y = F.conv2d(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype), stride, k // 2, 1, x.shape[1])
    return _like(y, x)


@depthwise_conv2d.register_kernel('cuda')
def _(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: int) -> Tensor:
    y = _extension().forward(x.contiguous(), weight.to(x.dtype), bias, stride)
    return _like(y, x)


@depthwise_conv2d.register_fake
def _(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: int) -> Tensor:
    k = weight.shape[-1]
    shape = (x.shape[0], x.shape[1], _out_size(x.shape[2], k, stride), _out_size(x.shape[3], k, stride))
    return _like(x.new_empty(shape), x)


@torch.library.custom_op('fat::depthwise_conv2d_input_grad', mutates_args=())
def input_grad(grad_out: Tensor, weight: Tensor, height: int, width: int, stride: int) -> Tensor:
    k = weight.shape[-1]
    size = (grad_out.shape[0], grad_out.shape[1], height, width)
    grad_x = torch.nn.grad.conv2d_input(size, weight.to(grad_out.dtype), grad_out, stride, k // 2, 1, size[1])
    return _like(grad_x, grad_out)


@input_grad.register_kernel('cuda')
def _(grad_out: Tensor, weight: Tensor, height: int, width: int, stride: int) -> Tensor:
    grad_x = _extension().input_grad(grad_out.contiguous(), weight.to(grad_out.dtype), height, width, stride)
    return _like(grad_x, grad_out)


@input_grad.register_fake
def _(grad_out: Tensor, weight: Tensor, height: int, width: int, stride: int) -> Tensor:
    return _like(grad_out.new_empty(grad_out.shape[0], grad_out.shape[1], height, width), grad_out)


@torch.library.custom_op('fat::depthwise_conv2d_weight_bias_grad', mutates_args=())
def weight_bias_grad(grad_out: Tensor, x: Tensor, kernel_size: int, stride: int) -> Tuple[Tensor, Tensor]:
    function = load_cpu_library() if x.dtype == torch.float32 else None
    if function is not None:
        grad_w, grad_b = cpu.weight_bias_grad(function, grad_out, x, kernel_size, stride)
        return grad_w.contiguous(), grad_b
    acc = _accumulation_dtype(x.dtype)
    grad_out = grad_out.to(acc)
    grad_w = torch.nn.grad.conv2d_weight(x.to(acc), (x.shape[1], 1, kernel_size, kernel_size), grad_out, stride,
                                         kernel_size // 2, 1, x.shape[1])
    return grad_w, grad_out.sum((0, 2, 3))


@weight_bias_grad.register_kernel('cuda')
def _(grad_out: Tensor, x: Tensor, kernel_size: int, stride: int) -> Tuple[Tensor, Tensor]:
    grad_w, grad_b = _extension().weight_bias_grad(grad_out.contiguous(), x.contiguous(), kernel_size, stride)
    return grad_w, grad_b


@weight_bias_grad.register_fake
def _(grad_out: Tensor, x: Tensor, kernel_size: int, stride: int) -> Tuple[Tensor, Tensor]:
    acc = _accumulation_dtype(x.dtype)
    return x.new_empty(x.shape[1], 1, kernel_size, kernel_size, dtype=acc), x.new_empty(x.shape[1], dtype=acc)


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, stride = inputs
    ctx.save_for_backward(x, weight)
    ctx.stride = stride
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, grad_out: Tensor):
    x, weight = ctx.saved_tensors
    grad_out = grad_out.to(x.dtype)
    needs_x, needs_w, needs_b = ctx.needs_input_grad[:3]
    grad_x = grad_w = grad_b = None
    if needs_x:
        grad_x = input_grad(grad_out, weight.to(x.dtype), x.shape[2], x.shape[3], ctx.stride)
    if needs_w or (ctx.bias_dtype is not None and needs_b):
        grad_w, grad_b = weight_bias_grad(grad_out, x, weight.shape[-1], ctx.stride)
        grad_w = grad_w.to(weight.dtype) if needs_w else None
        grad_b = grad_b.to(ctx.bias_dtype) if ctx.bias_dtype is not None and needs_b else None
    return grad_x, grad_w, grad_b, None


depthwise_conv2d.register_autograd(_backward, setup_context=_setup_context)
