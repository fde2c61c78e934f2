"""The one place where FAT's depthwise convolutions are made.

Every depthwise conv of the model is a :class:`DepthwiseConv2d`: an ``nn.Conv2d`` with
``groups == channels`` and padding ``k // 2``, so its parameters and state-dict keys are those
of the plain PyTorch layer whatever implementation runs it. It can run the project's own kernels
(``kernels/dwconv``) instead of PyTorch's: the CUDA extension on CUDA tensors, and on CPU, when
gradients are needed, our weight gradient (PyTorch's oneDNN one is the slowest op of a CPU training
step). Chosen by ``impl``:

- ``'auto'``: ours where it is built, passed its first-use self-check on that device and ran
  faster than PyTorch's for the conv's case (``kernels.dwconv.choose``: timed on the device at first
  use, remembered); PyTorch otherwise. :func:`choose_kernels` decides every conv of a model once it
  is on its device, the same on every process, and installs the choice on each (``install``:
  ``chosen``, and where our CPU kernel trains FAT's GELU + conv, the fused module
  :class:`FusedGeluDepthwiseConv2d`); forward passes only read it. A model used on its own decides
  each case at its first eager use; under torch.compile or torch.export (whose shapes may be
  symbolic) it follows the measured tables. Ours is the ``torch.ops.fat.depthwise_conv2d``
  operator, so it stays in ``torch.compile`` graphs.
- ``'torch'``: always ``F.conv2d``.
- ``'cuda'``: always our kernel on CUDA tensors, an error if it cannot be used; PyTorch on CPU.
"""

import dataclasses
from typing import Dict, Literal, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import register_notrace_module
from torch.fx._symbolic_trace import is_fx_symbolic_tracing

from utils import rank_world

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
def _extension_preferred(device_type: str, index: Optional[int], kernel_size: int, stride: int, dtype: torch.dtype,
                         channels_last: bool, backward: bool) -> bool:
    """'auto' by the measured tables, for a conv that :func:`choose_kernels` did not decide when the
    shape may be symbolic (torch.compile, torch.export). Constant for the traced graph."""
    kernels = _kernels()
    if kernels is None:
        return False
    case = kernels.Case(kernel_size, stride, dtype, channels_last, (0, 0, 0, 0), backward)
    return kernels.choose(torch.device(device_type, index), case, measure=False)


def _extension_chosen(device: torch.device, kernel_size: int, stride: int, dtype: torch.dtype, channels_last: bool,
                      shape: Tuple[int, ...], backward: bool) -> bool:
    """'auto' for a conv that :func:`choose_kernels` did not decide (a model used on its own), in eager
    mode: as timed at the case's first use (``kernels.dwconv.choose``), or by the measured tables
    where several processes run, so that they all run the same kernels."""
    kernels = _kernels()
    if kernels is None:
        return False
    case = kernels.Case(kernel_size, stride, dtype, channels_last, shape, backward)
    return kernels.choose(device, case, measure=rank_world()[1] == 1)


def _is_channels_last(x: torch.Tensor) -> bool:
    return not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


@register_notrace_module  # one leaf for FX (feature extraction, quantization): its dispatch is Python
class DepthwiseConv2d(nn.Conv2d):
    """Depthwise ``k x k`` convolution with stride ``s``, padding ``k // 2`` and bias."""

    def __init__(self, channels: int, kernel_size: int, stride: int = 1, impl: DwConvImpl = 'auto'):
        if kernel_size % 2 != 1:
            raise ValueError(f'depthwise kernel size must be odd, got {kernel_size}')
        super().__init__(channels, channels, kernel_size, stride, kernel_size // 2, groups=channels, bias=True)
        self.impl = check_impl(impl)
        # With 'auto': whether ours runs in training ('train') and inference ('infer'), as
        # choose_kernels decided for this conv; decided per case at first use where empty.
        self.chosen: Dict[str, bool] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv(x)

    def install(self, chosen: Dict[str, bool]) -> None:
        """Take ``choose_kernels``' decision for this conv."""
        self.chosen = dict(chosen)

    def _conv(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting() and self._use_extension(x):
            return self._extension_conv(x)
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, 1, self.groups)

    @torch.jit.unused
    def _extension_conv(self, x: torch.Tensor) -> torch.Tensor:
        return _kernels().depthwise_conv2d(x, self.weight, self.bias, self.stride[0])

    @torch.jit.unused
    def _use_extension(self, x: torch.Tensor) -> bool:
        if self.impl == 'torch' or is_fx_symbolic_tracing():  # an FX graph records PyTorch's ops
            return False
        k, s = self.kernel_size[0], self.stride[0]
        backward = torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)
        if x.is_cuda:
            dtype = torch.get_autocast_dtype('cuda') if torch.is_autocast_enabled('cuda') else x.dtype
            if self.impl == 'auto':
                return self._auto(x, dtype, backward)
            if not _extension_ready('cuda', x.device.index, k, s, dtype):
                raise RuntimeError(
                    f'MODEL.DWCONV_IMPL is "cuda" but the depthwise-conv extension in kernels/dwconv has no kernel '
                    f'for size {k} stride {s} (odd sizes 3..31, stride 1 or 2), could not be built or failed its '
                    'self-check on this device; see the warning above, or use "auto" to fall back to PyTorch')
            return True
        # CPU: our kernel differs only in the weight gradient, so it pays only when one is computed.
        return (self.impl == 'auto' and x.device.type == 'cpu' and backward and x.dtype == torch.float32
                and not torch.is_autocast_enabled('cpu') and self._auto(x, x.dtype, backward))

    @torch.jit.unused
    def _auto(self, x: torch.Tensor, dtype: torch.dtype, backward: bool) -> bool:
        chosen = self.chosen.get('train' if backward else 'infer')
        if chosen is not None:
            return chosen
        k, s, layout = self.kernel_size[0], self.stride[0], _is_channels_last(x)
        if torch.compiler.is_compiling():  # the shape may be symbolic
            return _extension_preferred(x.device.type, x.device.index, k, s, dtype, layout, backward)
        return _extension_chosen(x.device, k, s, dtype, layout, tuple(x.shape), backward)

    def extra_repr(self) -> str:
        return super().extra_repr() + f', impl={self.impl}'


@register_notrace_module
class GeluDepthwiseConv2d(DepthwiseConv2d):
    """``conv(a)``, plus ``a`` with ``residual`` (stride 1), where ``a = GELU(x)``: the middle of FAT's
    ConvFFN. Where our CPU kernel is chosen for its training, ``install`` makes it a
    :class:`FusedGeluDepthwiseConv2d`."""

    def __init__(self, channels: int, kernel_size: int, stride: int = 1, impl: DwConvImpl = 'auto',
                 residual: bool = False):
        if residual and stride != 1:
            raise ValueError(f'a residual depthwise conv needs stride 1, got {stride}')
        super().__init__(channels, kernel_size, stride, impl)
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._gelu_conv(x)

    def install(self, chosen: Dict[str, bool]) -> None:
        """Take ``choose_kernels``' decision, as the fused module where ours trains on the CPU."""
        super().install(chosen)
        fused = self.weight.device.type == 'cpu' and self.chosen.get('train', False)
        self.__class__ = FusedGeluDepthwiseConv2d if fused else GeluDepthwiseConv2d

    def _gelu_conv(self, x: torch.Tensor) -> torch.Tensor:
        a = F.gelu(x)
        y = self._conv(a)
        return y + a if self.residual else y

    def extra_repr(self) -> str:
        return super().extra_repr() + ', residual=True' * self.residual


@register_notrace_module
class FusedGeluDepthwiseConv2d(GeluDepthwiseConv2d):
    """:class:`GeluDepthwiseConv2d` as our one CPU op in eager training: it stores only ``x`` for
    backward (one activation of 4x the block's width fewer). Elsewhere (inference, CUDA,
    ``torch.compile``, FX, TorchScript) it runs unfused. ``choose_kernels`` installs it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting() and self._runs_fused(x):
            return _kernels().gelu_depthwise_conv2d(x, self.weight, self.bias, self.stride[0], self.residual)
        return self._gelu_conv(x)

    @torch.jit.unused
    def _runs_fused(self, x: torch.Tensor) -> bool:
        return (not is_fx_symbolic_tracing() and not x.is_cuda and not torch.compiler.is_compiling()
                and self._use_extension(x))


def check_impl(impl: str) -> str:
    """Validate a depthwise-conv implementation name (``MODEL.DWCONV_IMPL``)."""
    if impl not in DWCONV_IMPLS:
        raise ValueError(f'unknown depthwise-conv implementation {impl!r}; choose one of {DWCONV_IMPLS}')
    return impl


def create_dwconv(channels: int, kernel_size: int, stride: int = 1, impl: DwConvImpl = 'auto',
                  gelu_input: bool = False, residual: bool = False) -> DepthwiseConv2d:
    """Make a depthwise conv, of ``GELU(x)`` (plus its residual) with ``gelu_input``; the single
    factory every FAT layer uses."""
    if gelu_input:
        return GeluDepthwiseConv2d(channels, kernel_size, stride, impl, residual)
    if residual:
        raise ValueError('a residual depthwise conv is one of GELU(x): gelu_input=True')
    return DepthwiseConv2d(channels, kernel_size, stride, impl)


def set_dwconv_impl(model: nn.Module, impl: DwConvImpl) -> nn.Module:
    """Switch every depthwise conv of ``model`` to ``impl``; parameters are untouched."""
    impl = check_impl(impl)
    for module in model.modules():
        if isinstance(module, DepthwiseConv2d):
            module.impl = impl
    return model


def choose_kernels(model: nn.Module, input_shape: Tuple[int, ...], batch_size: int, training: bool,
                   dtype: Optional[torch.dtype] = None, channels_last: bool = False,
                   entry: Optional[nn.Module] = None, decisions: Optional[str] = None) -> str:
    """Decide which of ``model``'s 'auto' depthwise convs run ours, now that it is on its device (and
    memory format), and install the choice on each (``DepthwiseConv2d.chosen``), for training (when
    ``training``) and inference.

    One forward of ``entry`` (default: ``model``) on one zero image of ``input_shape`` (C, H, W) in
    eval mode records each conv's case: its input's shape with ``batch_size`` images, its layout, and
    ``dtype`` (the run's autocast type; None: fp32). Rank 0 decides every case with
    ``kernels.dwconv.choose`` (timed at first use on this device, remembered) and sends the decisions
    to the other processes, so that all run the same kernels (``decisions``: the folder of the
    decisions file, default the kernel cache's); every process then self-checks ours for
    the cases chosen, and a case that fails anywhere runs PyTorch's everywhere. Returns a line for the
    log ('' when no conv is 'auto', and on the other processes)."""
    convs = [m for m in model.modules() if isinstance(m, DepthwiseConv2d) and m.impl == 'auto']
    kernels = _kernels()
    if not convs or kernels is None:
        return ''
    for conv in convs:
        conv.install({'train': False, 'infer': False})  # PyTorch's while the cases are recorded
    seen = _record_inputs(entry or model, convs, input_shape, channels_last, dtype)
    device = convs[0].weight.device
    cases = {}
    for conv, (shape, layout, seen_dtype) in seen.items():
        for mode in ('train', 'infer') if training else ('infer',):
            cases[conv, mode] = kernels.Case(conv.kernel_size[0], conv.stride[0], dtype or seen_dtype, layout,
                                             (batch_size, *shape), mode == 'train')
    rank, world_size = rank_world()
    box = [None, None]  # rank 0's decisions by case, or what went wrong there
    if rank == 0:
        tuner = kernels.autotune.tuner(device, decisions)
        before = dataclasses.replace(tuner.stats)
        try:
            box[0] = {case.key(): kernels.choose(device, case, folder=decisions) for case in cases.values()}
        except Exception as error:  # said on every process, rather than leaving the others waiting
            box[1] = f'{type(error).__name__}: {error}'
        after = tuner.stats
    if world_size > 1:
        dist.broadcast_object_list(box, src=0)
    ours_by_case, problem = box
    if problem:
        raise RuntimeError(f'choosing the depthwise-conv kernels failed on rank 0: {problem}')
    # Every process self-checks ours for the cases it would run it on; where one cannot, all run PyTorch's.
    ours = sorted({case for case in cases.values() if ours_by_case[case.key()]}, key=lambda case: case.key())
    usable = [kernels.is_usable(device, case.kernel_size, case.stride, case.dtype) for case in ours]
    if world_size > 1:
        everywhere = [None] * world_size
        dist.all_gather_object(everywhere, usable)
        usable = [all(flags) for flags in zip(*everywhere)]
    for case, ok in zip(ours, usable):
        ours_by_case[case.key()] = ok
    chosen = {conv: {'train': False, 'infer': False} for conv in seen}
    for (conv, mode), case in cases.items():
        chosen[conv][mode] = ours_by_case[case.key()]
    for conv, choice in chosen.items():
        conv.install(choice)
    if rank != 0:
        return ''
    counts = ', '.join(f'{sum(conv.chosen[mode] for conv in seen)} of {len(seen)} for {name}'
                       for mode, name in (('train', 'training'), ('infer', 'inference')) if training or mode == 'infer')
    timed, untimed = after.timed - before.timed, after.untimed - before.untimed
    return (f'depthwise convs (MODEL.DWCONV_IMPL auto) on {device}: ours in {counts}; {len(ours_by_case)} case(s), '
            f'{timed} timed now ({after.seconds - before.seconds:.1f} s)'
            + (f', {untimed} left to the tables' if untimed else '')
            + (f'; decisions kept in {tuner.path}' if tuner.path else ''))


def _record_inputs(entry: nn.Module, convs, input_shape, channels_last: bool, dtype: Optional[torch.dtype]) -> dict:
    """For each of ``convs`` that one eval-mode forward of ``entry`` on a zero image runs: its input's
    (C, H, W), whether it is channels_last, and its dtype."""
    seen = {}

    def record(conv, args) -> None:
        seen.setdefault(conv, (tuple(args[0].shape[1:]), _is_channels_last(args[0]), args[0].dtype))

    hooks = [conv.register_forward_pre_hook(record) for conv in convs]
    modes = {module: module.training for module in entry.modules()}
    parameter = next(entry.parameters())
    image = torch.zeros((1, *input_shape), device=parameter.device, dtype=parameter.dtype)
    if channels_last:
        image = image.contiguous(memory_format=torch.channels_last)
    try:
        entry.eval()
        with torch.no_grad(), torch.autocast(parameter.device.type, dtype=dtype, enabled=dtype is not None):
            entry(image)
    finally:
        for hook in hooks:
            hook.remove()
        for module, mode in modes.items():
            module.training = mode
    return seen
