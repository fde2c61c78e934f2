"""FLOP counting with torch.utils.flop_counter, attention included on every device."""
from __future__ import annotations

from typing import Dict, Sequence

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count


def _cpu_flash_attention_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


# torch's counter knows the CUDA attention kernels but not the CPU flash kernel SDPA picks here,
# which would leave attention out of the count on CPU.
_EXTRA_FORMULAS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_attention_flops}


@torch.no_grad()
def macs_by_op(model: nn.Module, input_size: Sequence[int] = (3, 224, 224)) -> Dict[str, int]:
    """Multiply-accumulates of one forward pass on one image, per aten op (``'convolution'``,
    ``'addmm'``, ...), in eval mode."""
    param = next(model.parameters())
    x = torch.randn(1, *input_size, device=param.device, dtype=param.dtype)
    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False, custom_mapping=_EXTRA_FORMULAS) as counter:
            model(x)
    finally:
        model.train(was_training)
    return {op.__name__: flops // 2 for op, flops in counter.get_flop_counts()['Global'].items()}


def count_macs(model: nn.Module, input_size: Sequence[int] = (3, 224, 224)) -> int:
    """Multiply-accumulates of one forward pass on one image (torch's FLOP count / 2), in eval mode."""
    return sum(macs_by_op(model, input_size).values())
