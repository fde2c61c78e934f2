"""build_optimizer: AdamW (or SGD) with no weight decay on norms, biases and no_weight_decay()."""
from __future__ import annotations

import torch
import torch.nn as nn
from timm.optim import param_groups_weight_decay


def build_optimizer(config, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """The optimizer of TRAIN.OPTIMIZER at learning rate ``lr`` (the scaled base LR), over the trainable
    parameters in timm's two groups: decayed weights, and undecayed 1-d parameters, biases and the
    model's ``no_weight_decay()`` names. torch's fused AdamW runs on CUDA and CPU alike (no apex)."""
    skip = model.no_weight_decay() if hasattr(model, 'no_weight_decay') else ()
    groups = param_groups_weight_decay(model, config.TRAIN.WEIGHT_DECAY, no_weight_decay_list=skip)
    if config.TRAIN.OPTIMIZER.NAME == 'adamw':
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(config.TRAIN.OPTIMIZER.BETAS),
                                 eps=config.TRAIN.OPTIMIZER.EPS, fused=True)
    return torch.optim.SGD(groups, lr=lr, momentum=config.TRAIN.OPTIMIZER.MOMENTUM, nesterov=True)
