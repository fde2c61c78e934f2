"""build_optimizer: AdamW (or SGD) with no weight decay on norms, biases and no_weight_decay()."""
from __future__ import annotations

import torch
import torch.nn as nn


def param_groups(model: nn.Module, weight_decay: float) -> list:
    """Two groups: decayed weights, and 1-d parameters (norms, biases) plus the model's
    ``no_weight_decay()`` names without decay."""
    skip = set(model.no_weight_decay()) if hasattr(model, 'no_weight_decay') else set()
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 or name.endswith('.bias') or name in skip else decay).append(param)
    return [{'params': decay, 'weight_decay': weight_decay}, {'params': no_decay, 'weight_decay': 0.0}]


def build_optimizer(config, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """The optimizer of TRAIN.OPTIMIZER at learning rate ``lr`` (the scaled base LR).

    torch's fused AdamW runs on CUDA and CPU alike, so NVIDIA apex is not needed."""
    groups = param_groups(model, config.TRAIN.WEIGHT_DECAY)
    name = config.TRAIN.OPTIMIZER.NAME.lower()
    if name == 'adamw':
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(config.TRAIN.OPTIMIZER.BETAS),
                                 eps=config.TRAIN.OPTIMIZER.EPS, fused=True)
    if name == 'sgd':
        return torch.optim.SGD(groups, lr=lr, momentum=config.TRAIN.OPTIMIZER.MOMENTUM, nesterov=True)
    raise ValueError(f"unknown TRAIN.OPTIMIZER.NAME {config.TRAIN.OPTIMIZER.NAME!r}; choose 'adamw' or 'sgd'")
