"""build_scheduler: timm's cosine / linear / step schedules with warm-up, stepped every iteration."""
from __future__ import annotations

import torch
from timm.scheduler import CosineLRScheduler, PolyLRScheduler, StepLRScheduler
from timm.scheduler.scheduler import Scheduler


def build_scheduler(config, optimizer: torch.optim.Optimizer, n_iter_per_epoch: int, warmup_lr: float,
                    min_lr: float) -> Scheduler:
    """The LR schedule of TRAIN.LR_SCHEDULER in optimizer steps; call ``step_update(global_step)``."""
    steps_per_epoch = n_iter_per_epoch // config.TRAIN.ACCUMULATION_STEPS
    num_steps = int(config.TRAIN.EPOCHS * steps_per_epoch)
    warmup_steps = int(config.TRAIN.WARMUP_EPOCHS * steps_per_epoch)
    name = config.TRAIN.LR_SCHEDULER.NAME
    if name == 'cosine':
        prefix = config.TRAIN.LR_SCHEDULER.WARMUP_PREFIX
        return CosineLRScheduler(optimizer, t_initial=max(num_steps - warmup_steps if prefix else num_steps, 1),
                                 lr_min=min_lr, warmup_lr_init=warmup_lr, warmup_t=warmup_steps, cycle_limit=1,
                                 t_in_epochs=False, warmup_prefix=prefix)
    if name == 'linear':
        return PolyLRScheduler(optimizer, t_initial=num_steps, power=1.0, lr_min=min_lr, warmup_lr_init=warmup_lr,
                               warmup_t=warmup_steps, t_in_epochs=False)
    if name == 'step':
        return StepLRScheduler(optimizer, decay_t=int(config.TRAIN.LR_SCHEDULER.DECAY_EPOCHS * steps_per_epoch),
                               decay_rate=config.TRAIN.LR_SCHEDULER.DECAY_RATE, warmup_lr_init=warmup_lr,
                               warmup_t=warmup_steps, t_in_epochs=False)
    raise ValueError(f"unknown TRAIN.LR_SCHEDULER.NAME {name!r}; choose cosine, linear or step")
