"""The one place where FAT's depthwise convolutions are made.

Every depthwise conv of the model is a :class:`DepthwiseConv2d`: an ``nn.Conv2d`` with
``groups == channels`` and padding ``k // 2``, so its parameters and state-dict keys are those
of the plain PyTorch layer whatever implementation runs it. It can run the project's own kernels
(``kernels/dwconv``) instead of PyTorch's: the CUDA extension on CUDA tensors, and on CPU, when
gradients are needed, our weight gradient (PyTorch's oneDNN one is the slowest op of a CPU training
step). Chosen by ``impl``:

- ``'auto'``: ours where it is built, passed its first-use self-check on that device and is the
  faster choice for the shape; PyTorch otherwise. Ours is the ``torch.ops.fat.depthwise_conv2d``
  operator, so it stays in ``torch.compile`` graphs.
- ``'torch'``: always ``F.conv2d``.
- ``'cuda'``: always our kernel on CUDA tensors, an error if it cannot be used; PyTorch on CPU.
"""

from typing import Literal, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import register_notrace_module
from torch.fx._symbolic_trace import is_fx_symbolic_tracing

DwConvImpl = Literal['auto', 'torch', 'cuda']
DWCONV_IMPLS = ('auto', 'torch', 'cuda')


def _kernels():
    """The extension's Python package, or None where it is not importable (model used alone)."""
    try:
        from kernels import dwconv
    except ImportError:
        return None
    return dwconv


@torch.compiler.assume_constant_result
def _extension_ready(device_type: str, index: Optional[int], kernel_size: int, stride: int, dtype: torch.dtype) -> bool:
    """Our kernel implements this case and passed its self-check for it on this device. Constant for
    ``torch.compile`` (the check runs once, eagerly, while the graph is traced)."""
    kernels = _kernels()
    return (kernels is not None and kernels.supports(kernel_size, stride)
            and kernels.is_usable(torch.device(device_type, index), kernel_size, stride, dtype))


@torch.compiler.assume_constant_result
def _extension_chosen(device_type: str, index: Optional[int], kernel_size: int, stride: int, dtype: torch.dtype,
                      channels_last: bool) -> bool:
    """'auto' runs ours for this case: ready (above) and measured faster (``kernels.dwconv.preferred``)."""
    kernels = _kernels()
    return (kernels is not None and kernels.supports(kernel_size, stride)
            and kernels.preferred(kernel_size, stride, dtype, device_type, channels_last)
            and kernels.is_usable(torch.device(device_type, index), kernel_size, stride, dtype))


def _is_channels_last(x: torch.Tensor) -> bool:
    return not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


@register_notrace_module  # one leaf for FX (feature extraction, quantization): its dispatch is Python
class DepthwiseConv2d(nn.Conv2d):
    """Depthwise ``k x k`` convolution with stride ``s``, padding ``k // 2`` and bias.

    With ``gelu_input`` it computes ``conv(a)``, plus ``a`` with ``residual`` (stride 1), where
    ``a = GELU(x)``: FAT's ConvFFN, where our CPU kernel runs both as one op that stores only ``x``
    for backward (one activation of 4x the block's width fewer in CPU training).
    """

    def __init__(self, channels: int, kernel_size: int, stride: int = 1, impl: DwConvImpl = 'auto',
                 gelu_input: bool = False, residual: bool = False):
        if kernel_size % 2 != 1:
            raise ValueError(f'depthwise kernel size must be odd, got {kernel_size}')
        if residual and stride != 1:
            raise ValueError(f'a residual depthwise conv needs stride 1, got {stride}')
        super().__init__(channels, channels, kernel_size, stride, kernel_size // 2, groups=channels, bias=True)
        self.impl = check_impl(impl)
        self.gelu_input = gelu_input
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting() and self.gelu_input and self._fused_on_cpu(x):
            return _kernels().gelu_depthwise_conv2d(x, self.weight, self.bias, self.stride[0], self.residual)
        a = F.gelu(x) if self.gelu_input else x
        if not torch.jit.is_scripting() and self._use_extension(a):
            y = self._extension_conv(a)
        else:
            y = F.conv2d(a, self.weight, self.bias, self.stride, self.padding, 1, self.groups)
        return y + a if self.residual else y

    @torch.jit.unused
    def _fused_on_cpu(self, x: torch.Tensor) -> bool:
        """GELU and the conv as our one CPU op: eager CPU training where our kernel is chosen."""
        return (not is_fx_symbolic_tracing() and not x.is_cuda and not torch.compiler.is_compiling()
                and self._use_extension(x))

    @torch.jit.unused
    def _extension_conv(self, x: torch.Tensor) -> torch.Tensor:
        return _kernels().depthwise_conv2d(x, self.weight, self.bias, self.stride[0])

    @torch.jit.unused
    def _use_extension(self, x: torch.Tensor) -> bool:
        if self.impl == 'torch' or is_fx_symbolic_tracing():  # an FX graph records PyTorch's ops
            return False
        k, s = self.kernel_size[0], self.stride[0]
        if x.is_cuda:
            dtype = torch.get_autocast_dtype('cuda') if torch.is_autocast_enabled('cuda') else x.dtype
            if self.impl == 'auto':
                return _extension_chosen('cuda', x.device.index, k, s, dtype, _is_channels_last(x))
            if not _extension_ready('cuda', x.device.index, k, s, dtype):
                raise RuntimeError(
                    f'MODEL.DWCONV_IMPL is "cuda" but the depthwise-conv extension in kernels/dwconv has no kernel '
                    f'for size {k} stride {s} (odd sizes 3..31, stride 1 or 2), could not be built or failed its '
                    'self-check on this device; see the warning above, or use "auto" to fall back to PyTorch')
            return True
        # CPU: our kernel differs only in the weight gradient, so it pays only when one is computed.
        return (self.impl == 'auto' and x.device.type == 'cpu' and torch.is_grad_enabled()
                and (x.requires_grad or self.weight.requires_grad) and not torch.is_autocast_enabled('cpu')
                and _extension_chosen('cpu', None, k, s, x.dtype, _is_channels_last(x)))

    def extra_repr(self) -> str:
        extra = f', impl={self.impl}' + ', gelu_input=True' * self.gelu_input + ', residual=True' * self.residual
        return super().extra_repr() + extra


def check_impl(impl: str) -> str:
    """Validate a depthwise-conv implementation name (``MODEL.DWCONV_IMPL``)."""
    if impl not in DWCONV_IMPLS:
        raise ValueError(f'unknown depthwise-conv implementation {impl!r}; choose one of {DWCONV_IMPLS}')
    return impl


def create_dwconv(channels: int, kernel_size: int, stride: int = 1, impl: DwConvImpl = 'auto',
                  gelu_input: bool = False, residual: bool = False) -> DepthwiseConv2d:
    """Make a depthwise conv; the single factory every FAT layer uses."""
    return DepthwiseConv2d(channels, kernel_size, stride, impl, gelu_input, residual)


def set_dwconv_impl(model: nn.Module, impl: DwConvImpl) -> nn.Module:
    """Switch every depthwise conv of ``model`` to ``impl``; parameters are untouched."""
    impl = check_impl(impl)
    for module in model.modules():
        if isinstance(module, DepthwiseConv2d):
            module.impl = impl
    return model
