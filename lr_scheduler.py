"""build_scheduler: timm's cosine / linear / poly / step / multistep schedules with warm-up, stepped every
optimizer step."""
from __future__ import annotations

import torch
from timm.scheduler import CosineLRScheduler, MultiStepLRScheduler, PolyLRScheduler, StepLRScheduler
from timm.scheduler.scheduler import Scheduler


def build_scheduler(config, optimizer: torch.optim.Optimizer, steps_per_epoch: int, warmup_lr: float,
                    min_lr: float) -> Scheduler:
    """The LR schedule of TRAIN.LR_SCHEDULER over TRAIN.EPOCHS x ``steps_per_epoch`` optimizer steps;
    call ``step_update(n)`` with the number of optimizer steps done. It holds nothing beyond the
    config, so a resumed run rebuilds it from the current config instead of restoring it."""
    num_steps = config.TRAIN.EPOCHS * steps_per_epoch
    warmup_steps = config.TRAIN.WARMUP_STEPS or int(config.TRAIN.WARMUP_EPOCHS * steps_per_epoch)
    schedule = config.TRAIN.LR_SCHEDULER
    warmup = dict(warmup_lr_init=warmup_lr, warmup_t=warmup_steps, t_in_epochs=False)
    if schedule.NAME == 'cosine':
        prefix = schedule.WARMUP_PREFIX
        return CosineLRScheduler(optimizer, t_initial=max(num_steps - warmup_steps if prefix else num_steps, 1),
                                 lr_min=min_lr, cycle_limit=1, warmup_prefix=prefix, **warmup)
    if schedule.NAME in ('linear', 'poly'):
        power = 1.0 if schedule.NAME == 'linear' else schedule.POWER
        return PolyLRScheduler(optimizer, t_initial=num_steps, power=power, lr_min=min_lr, **warmup)
    if schedule.NAME == 'step':
        return StepLRScheduler(optimizer, decay_t=int(schedule.DECAY_EPOCHS * steps_per_epoch),
                               decay_rate=schedule.DECAY_RATE, **warmup)
    return MultiStepLRScheduler(optimizer, decay_t=[int(m * steps_per_epoch) for m in schedule.MILESTONES],
                                decay_rate=schedule.DECAY_RATE, **warmup)
