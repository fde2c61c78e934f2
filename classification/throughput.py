"""--throughput: training, then inference, images per second with a run's own settings on synthetic
batches, before any data exists."""
from __future__ import annotations

import copy
import datetime
import itertools
import math
import time
from typing import Callable, Tuple

import torch
import torch.nn as nn

import engine
from models import choose_run_kernels
from utils import ConfigError, all_reduce, amp_dtype, autocast, memory_used_mb

from .task import Classification, inference_model


# ImageNet-1k's training images: the epoch that --throughput estimates the time of.
IMAGENET_TRAIN_IMAGES = 1_281_167


class SameBatch:
    """An ``engine.TrainLoader`` whose epoch is ``count`` times ``batch``."""

    def __init__(self, batch, count: int):
        self.batch, self.count = batch, count

    def __len__(self) -> int:
        return self.count

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        pass

    def __iter__(self):
        return itertools.repeat(self.batch, self.count)


def throughput(session: engine.Session) -> None:
    """Training, then inference, images per second with the run's settings (DATA.BATCH_SIZE,
    DATA.IMG_SIZE, TRAIN.ACCUMULATION_STEPS, AMP, COMPILE, CHANNELS_LAST) on synthetic batches, with
    no data folder: how long the run will take, before it starts."""
    task = Classification(session)
    engine.check_config(task)
    task.build_teacher()
    if task.teacher is not None and task.teacher.num_classes != session.config.MODEL.NUM_CLASSES:
        raise ConfigError(f'DISTILL.TEACHER {task.teacher.name} has {task.teacher.num_classes} classes: set '
                          'MODEL.NUM_CLASSES to match for --throughput')
    task.build_loss(session.config.MODEL.NUM_CLASSES)
    model = engine.build_model(task)
    fresh = copy.deepcopy(model)  # for inference, untouched by the training steps; on the CPU until then
    task.on_device(engine.to_device(model, session))
    train_throughput(task, model)
    fresh = engine.to_device(fresh, session)
    line = choose_run_kernels(session.config, fresh, (session.config.DATA.IMG_SIZE,) * 2)
    if line:
        session.logger.info(line)
    infer_throughput(task, fresh)


def train_throughput(task: Classification, model: nn.Module) -> float:
    """Training images per second of this process, every micro-batch counted, through the engine's
    own step (loss, backward, accumulation, clipping, optimizer, EMA) on one synthetic batch already on
    the device; logs the peak memory and how long an ImageNet epoch and TRAIN.EPOCHS take."""
    config, session = task.config, task.session
    device, logger = session.device, session.logger
    batch_size, accumulation, size = config.DATA.BATCH_SIZE, config.TRAIN.ACCUMULATION_STEPS, config.DATA.IMG_SIZE
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    resident_before = memory_used_mb(device) if device.type == 'cpu' else 0.0
    batch = (torch.randn(batch_size, config.DATA.IN_CHANS, size, size, device=device),
             torch.randint(config.MODEL.NUM_CLASSES, (batch_size,), device=device))
    # The training set is one optimizer step's micro-batches: the trainer sizes its LR schedule by it.
    trainer = engine.Trainer(task, engine.TaskData(SameBatch(batch, accumulation), [], {}, 'synthetic'), model)
    micro_batches = itertools.count()

    def optimizer_step() -> None:
        for _ in range(accumulation):
            trainer.train_step(next(micro_batches), batch)

    warmup, min_steps, min_seconds = (10, 10, 5.0) if device.type == 'cuda' else (2, 3, 3.0)
    for _ in range(warmup):
        optimizer_step()
    trained_before = trainer.progress.micro_batches
    steps, seconds = timed(optimizer_step, device, min_steps, min_seconds)
    images = (trainer.progress.micro_batches - trained_before) * batch_size  # the micro-batches the trainer stepped over
    rate = images / seconds
    peak = memory_used_mb(device) - resident_before
    precision = amp_dtype(config, device)
    settings = ', '.join([str(precision).split('.')[-1] if precision else 'fp32']
                         + ['compiled'] * config.COMPILE + ['channels_last'] * config.CHANNELS_LAST
                         + ([f'the teacher {task.teacher.name}\'s forward included'] if task.teacher else []))
    # Every process ran as many steps over the same (slowest) time, so all together train world_size times as fast.
    total = rate * session.world_size
    logger.info(f'training: batch_size {batch_size} x {accumulation} micro-batch(es) per optimizer step, image size '
                f'{size}, {settings}: {steps} optimizer steps, {images} images in {seconds:.2f} s, {rate:.1f} img/s '
                + ('(one process)' if session.world_size == 1 else
                   f'per process, {total:.1f} img/s over {session.world_size} processes')
                + (f'; peak memory {peak:.0f} MB allocated' if device.type == 'cuda'
                   else f'; peak resident memory +{peak:.0f} MB over the built model'))
    epoch = IMAGENET_TRAIN_IMAGES / total
    logger.info(f'at {total:.1f} img/s an ImageNet-1k epoch ({IMAGENET_TRAIN_IMAGES:,} images) trains in '
                f'{datetime.timedelta(seconds=round(epoch))} and TRAIN.EPOCHS {config.TRAIN.EPOCHS} in '
                f'{datetime.timedelta(seconds=round(epoch * config.TRAIN.EPOCHS))} (data loading and evaluation '
                'not counted)')
    return rate


@torch.no_grad()
def infer_throughput(task: Classification, model: nn.Module) -> float:
    """Inference images per second of this process on random images, timed after warm-up, in the
    form --eval runs (REPARAM, COMPILE)."""
    config, device, logger = task.config, task.device, task.logger
    model = inference_model(config, model, device, logger)
    batch_size, size = config.DATA.BATCH_SIZE, config.DATA.IMG_SIZE
    images = torch.randn(batch_size, config.DATA.IN_CHANS, size, size, device=device)
    if config.CHANNELS_LAST:
        images = images.contiguous(memory_format=torch.channels_last)
    warmup, min_steps, min_seconds = (50, 10, 5.0) if device.type == 'cuda' else (3, 10, 3.0)
    with autocast(config, device):
        for _ in range(warmup):
            model(images)
        steps, seconds = timed(lambda: model(images), device, min_steps, min_seconds)
    rate = steps * batch_size / seconds
    logger.info(f'inference: batch_size {batch_size} image size {size}: {steps * batch_size} images in '
                f'{seconds:.2f} s, throughput {rate:.1f} img/s (one process)')
    return rate


def timed(step: Callable[[], object], device: torch.device, min_steps: int, min_seconds: float) -> Tuple[int, float]:
    """(steps, seconds) of ``step`` run at least ``min_steps`` times and for at least ``min_seconds``,
    the device synchronised only between rounds of steps. Every process runs as many steps (so that
    training's gradient all-reduces pair up) and takes the slowest one's time."""
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
    sync()
    steps, todo, start = 0, min_steps, time.time()
    while todo:
        for _ in range(todo):
            step()
        steps += todo
        sync()
        seconds = all_reduce(torch.tensor(time.time() - start, dtype=torch.float64, device=device), 'max').item()
        todo = math.ceil(steps * (min_seconds / seconds - 1)) if seconds < min_seconds else 0
    return steps, seconds
