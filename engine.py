"""The run shared by the dense-prediction entry points (``detection/``, ``segmentation/``).

A task says how to build its data, its model, its training loss and its evaluation; this module
does the rest with the project's own pieces: yacs config (``config.py``), torchrun/DDP and
checkpoints (``utils.py``), logging, AdamW and the LR schedules. ``main.py`` keeps its own loop
because classification adds Mixup, EMA, exact mid-epoch resume and throughput.
"""
from __future__ import annotations

import argparse
import datetime
import logging
import os
import signal
import time
from typing import Dict, Iterable, Optional, Tuple

import torch
import torch.nn as nn
from timm.utils import AverageMeter
from torch.nn.parallel import DistributedDataParallel
from torch.utils.tensorboard import SummaryWriter
from yacs.config import CfgNode as CN

from config import ConfigError, default_config, key_choices, scaled_lrs, update_config
from logger import create_logger
from lr_scheduler import build_scheduler
from optimizer import build_optimizer
from utils import (CHECKPOINT_LAST, NonFiniteLossError, Preempted, StopSignal, UserInputError, all_finite, autocast,
                   init_distributed, is_distributed, load_checkpoint_file, load_resume_checkpoint, memory_used_mb,
                   prepare_output, rng_state, run_entry_point, save_checkpoint, seed_everything, set_rng_state,
                   state_dict_mismatch, unwrap_model)

# Classification-only keys that a dense config leaves out, so its dump shows only what is used.
_CLASSIFICATION_KEYS = ('AUG', 'TEST', 'MODEL.LABEL_SMOOTHING', 'MODEL.EMA', 'MODEL.NUM_CLASSES', 'MODEL.DROP_RATE',
                        'DATA.INTERPOLATION', 'DATA.SKIP_CORRUPT', 'DATA.DATASET', 'DATA.IMG_SIZE', 'THROUGHPUT_MODE',
                        'COMPILE', 'CHANNELS_LAST', 'TRAIN.ACCUMULATION_STEPS')


def dense_defaults() -> CN:
    """The project's defaults without the classification-only keys, plus the backbone's freezing."""
    config = default_config()
    for key in _CLASSIFICATION_KEYS:
        *parents, leaf = key.split('.')
        node = config
        for parent in parents:
            node = node[parent]
        del node[leaf]
    config.MODEL.BACKBONE = CN()
    config.MODEL.BACKBONE.FROZEN_STAGES = -1  # -1 trains all; 0 freezes the stem; k freezes the stem and stages 0..k-1
    config.MODEL.BACKBONE.FREEZE_BN = False  # freeze every backbone BatchNorm (statistics and affine)
    config.TRAIN.AUTO_RESUME = True
    return config


def dense_choices(extra: Dict[str, Tuple[str, ...]]) -> dict:
    """The project's one-of-a-few-words keys that a dense config keeps, plus the task's own."""
    kept = {k: v for k, v in key_choices().items() if not k.startswith(_CLASSIFICATION_KEYS)}
    return {**kept, **extra}


def parse_args(description: str, defaults: CN, choices: dict) -> CN:
    """The entry point's command line, merged into ``defaults`` (frozen)."""
    parser = argparse.ArgumentParser(description)
    parser.add_argument('--cfg', type=str, metavar='FILE', required=True, help='config yaml')
    parser.add_argument('--opts', nargs='+', default=None, help='override config keys: KEY VALUE ...')
    parser.add_argument('--batch-size', type=int, help='images per process')
    parser.add_argument('--data-path', type=str, help='data root (see the README of this folder)')
    parser.add_argument('--pretrained', type=str, help='ImageNet checkpoint for the backbone')
    parser.add_argument('--resume', type=str, help='checkpoint to resume (or to evaluate with --eval)')
    parser.add_argument('--eval', action='store_true', help='only evaluate --resume')
    parser.add_argument('--device', choices=['cuda', 'cpu'], help='default: cuda when available')
    parser.add_argument('--output', type=str, metavar='PATH', help='root of run folders')
    parser.add_argument('--tag', type=str, help='run tag')
    parser.add_argument('--seed', type=int, help='random seed')
    parser.add_argument('--disable-amp', action='store_true', help='run in fp32 on CUDA too')
    parser.add_argument('--debug', action='store_true', help='show full tracebacks for input errors')
    args = parser.parse_args()
    update_config(defaults, args, choices)
    return defaults


class DenseTask:
    """What a dense-prediction entry point supplies to :func:`run`."""

    #: the metric (a key of ``evaluate``'s result) that picks ckpt_best.pth
    primary_metric: str = ''

    def build_loaders(self, config, rank: int, world_size: int) -> Tuple[Iterable, Iterable]:
        """(training loader with a DistributedSampler, evaluation loader sharded over the processes)."""
        raise NotImplementedError

    def build_model(self, config) -> nn.Module:
        """The network, backbone weights loaded from MODEL.PRETRAINED when given."""
        raise NotImplementedError

    def loss(self, model: nn.Module, batch, device: torch.device) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """(total loss, its parts) of one training batch, under autocast."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module, loader: Iterable, device: torch.device, config,
                 logger: logging.Logger) -> Dict[str, float]:
        """Metrics over the whole evaluation set, the same on every process."""
        raise NotImplementedError


def _load_weights(model: nn.Module, checkpoint: dict, path: str) -> None:
    state = checkpoint.get('model', checkpoint)
    report = state_dict_mismatch(model.state_dict(), state)
    if report:
        raise UserInputError(f'{path} does not fit this model (another config?): {report}')
    model.load_state_dict(state)


def train_one_epoch(config, task: DenseTask, model: nn.Module, optimizer, lr_scheduler, scaler, loader, epoch: int,
                    start_step: int, steps: int, device: torch.device, logger: logging.Logger,
                    writer: Optional[SummaryWriter], stop: StopSignal) -> int:
    """Train epoch ``epoch`` from batch ``start_step`` of its ``steps``; returns the batches done, fewer
    than ``steps`` when a stop signal ended it early. Loss sums stay on the device and are read only
    every PRINT_FREQ steps; a step with a non-finite loss or gradient is skipped by the scaler on the device."""
    model.train()
    loader.sampler.set_epoch(epoch, skip=start_step * config.DATA.BATCH_SIZE)
    params = [p for p in model.parameters() if p.requires_grad]
    max_norm = config.TRAIN.CLIP_GRAD if config.TRAIN.CLIP_GRAD > 0 else float('inf')
    batch_time, data_time = AverageMeter(), AverageMeter()
    sums: Dict[str, torch.Tensor] = {}
    nonfinite = torch.zeros((), dtype=torch.long, device=device)
    count = 0
    start = end = time.time()
    for idx, batch in enumerate(loader, start=start_step):
        data_time.update(time.time() - end)
        with autocast(config, device):
            loss, parts = task.loss(model, batch, device)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        nonfinite += ~(torch.isfinite(loss.detach()) & torch.isfinite(grad_norm))
        scaler.step(optimizer)
        scaler.update(1.0)
        optimizer.zero_grad(set_to_none=True)
        lr_scheduler.step_update(epoch * steps + idx + 1)
        for name, value in {'loss': loss, **parts}.items():
            sums[name] = sums.get(name, 0) + value.detach().float()
        count += 1
        batch_time.update(time.time() - end)
        end = time.time()
        print_now = idx % config.PRINT_FREQ == 0 or idx == steps - 1
        if print_now:
            skipped = int(nonfinite.item())
            if skipped > config.TRAIN.MAX_NONFINITE_STEPS:
                raise NonFiniteLossError(
                    f'non-finite loss or gradients in epoch {epoch} ({skipped} step(s) skipped, '
                    f'TRAIN.MAX_NONFINITE_STEPS is {config.TRAIN.MAX_NONFINITE_STEPS}); nothing non-finite was saved. '
                    'Lower TRAIN.BASE_LR or check the data and annotations')
            means = {name: (total / count).item() for name, total in sums.items()}
            eta = datetime.timedelta(seconds=int(batch_time.avg * (steps - idx - 1)))
            lr = optimizer.param_groups[0]['lr']
            logger.info(f'Train: [{epoch}/{config.TRAIN.EPOCHS}][{idx}/{steps}]\teta {eta} lr {lr:.3e}\t'
                        f'time {batch_time.avg:.4f} data {data_time.avg:.4f}\t'
                        + ' '.join(f'{name} {value:.4f}' for name, value in means.items())
                        + f'\tmem {memory_used_mb(device):.0f}MB')
            if writer is not None:
                for name, value in means.items():
                    writer.add_scalar(f'train/{name}', value, epoch * steps + idx)
                writer.add_scalar('train/lr', lr, epoch * steps + idx)
            sums, count = {}, 0
        # One process checks its flag each step for free; several agree on it at the print interval.
        if idx + 1 < steps and (stop.signum if not is_distributed() else print_now and stop.agreed(device)):
            return idx + 1
    logger.info(f'EPOCH {epoch} training takes {datetime.timedelta(seconds=int(time.time() - start))}')
    return steps


def _log_metrics(logger: logging.Logger, metrics: Dict[str, float], writer: Optional[SummaryWriter],
                 epoch: int) -> None:
    logger.info('Evaluation: ' + ', '.join(f'{name} {value:.4f}' for name, value in metrics.items()))
    if writer is not None:
        for name, value in metrics.items():
            writer.add_scalar(f'val/{name}', value, epoch)


def run(task: DenseTask, config) -> Dict[str, float]:
    """Train (resuming from the run folder), evaluating after every epoch, or with EVAL_MODE only
    evaluate MODEL.RESUME. Returns the last metrics."""
    rank, world_size, device = init_distributed(config.DEVICE)
    seed_everything(config.SEED + rank)
    out_dir = prepare_output(config)
    logger = create_logger(out_dir, rank, name=config.MODEL.NAME)
    if rank == 0 and not config.EVAL_MODE:
        with open(os.path.join(out_dir, 'config.yaml'), 'w') as f:
            f.write(config.dump())
    logger.info(f'config:\n{config.dump()}')
    loader_train, loader_val = task.build_loaders(config, rank, world_size)
    try:
        model = task.build_model(config)
    except ValueError as error:
        raise ConfigError(f'MODEL: {error}') from error
    n_params = sum(p.numel() for p in model.parameters())
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info(f'{config.MODEL.NAME}: {n_params:,} parameters ({n_trainable:,} trainable); '
                f'{world_size} process(es) on {device}')
    model.to(device)

    if config.EVAL_MODE:
        if not config.MODEL.RESUME:
            raise UserInputError('--eval needs a checkpoint: pass --resume CKPT')
        _load_weights(model, load_checkpoint_file(config.MODEL.RESUME), config.MODEL.RESUME)
        metrics = task.evaluate(model, loader_val, device, config, logger)
        _log_metrics(logger, metrics, None, 0)
        return metrics

    writer = SummaryWriter(out_dir) if rank == 0 else None
    if device.type == 'cuda' and world_size > 1 and not config.MODEL.BACKBONE.FREEZE_BN:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    base_lr, warmup_lr, min_lr = scaled_lrs(config, world_size)
    optimizer = build_optimizer(config, model, base_lr)
    lr_scheduler = build_scheduler(config, optimizer, len(loader_train), warmup_lr, min_lr)
    scaler = torch.amp.GradScaler(device.type, init_scale=1.0)  # skips non-finite steps on the device
    train_model = DistributedDataParallel(model, device_ids=[device] if device.type == 'cuda' else None) \
        if world_size > 1 else model
    logger.info(f'LR scaled to the total batch: base {base_lr:.3e}, warm-up {warmup_lr:.3e}, min {min_lr:.3e}')

    steps = len(loader_train)
    epoch, step, best = 0, 0, float('-inf')
    path, checkpoint = (config.MODEL.RESUME, load_checkpoint_file(config.MODEL.RESUME)) if config.MODEL.RESUME \
        else load_resume_checkpoint(out_dir, logger) if config.TRAIN.AUTO_RESUME else (None, None)
    if checkpoint is not None:
        _load_weights(model, checkpoint, path)
        optimizer.load_state_dict(checkpoint['optimizer'])
        lr_scheduler.load_state_dict(checkpoint['lr_scheduler'])
        scaler.load_state_dict(checkpoint['scaler'])
        epoch, step, best = checkpoint['epoch'], checkpoint['step'], checkpoint['best']
        if len(checkpoint['rng']) == world_size:
            set_rng_state(checkpoint['rng'][rank])
        logger.info(f'resumed from {path} (epoch {epoch}, {step} steps done, best {task.primary_metric} {best:.4f})')
        if step >= steps:
            epoch, step = epoch + 1, 0

    def save(metrics: Dict[str, float], is_best: bool, epoch_complete: bool) -> None:
        rng_states = [rng_state()]
        if is_distributed():
            rng_states = [None] * world_size
            torch.distributed.all_gather_object(rng_states, rng_state())
        if rank != 0:
            return
        state = {'model': unwrap_model(model).state_dict(), 'optimizer': optimizer.state_dict(),
                 'lr_scheduler': lr_scheduler.state_dict(), 'scaler': scaler.state_dict(), 'epoch': epoch,
                 'step': step, 'best': best, 'metrics': metrics, 'rng': rng_states, 'config': config.dump()}
        if not all_finite(state['model']):
            raise NonFiniteLossError(f'the weights are non-finite at epoch {epoch} step {step}; not saving them, '
                                     f'the last good checkpoint in {out_dir} is kept')
        periodic = epoch_complete and config.SAVE_FREQ > 0 and (
            (epoch + 1) % config.SAVE_FREQ == 0 or epoch + 1 == config.TRAIN.EPOCHS)
        save_checkpoint(out_dir, state, epoch, is_best, periodic, logger)

    stop = StopSignal(logger)
    metrics: Dict[str, float] = {}
    start_time = time.time()
    while epoch < config.TRAIN.EPOCHS:
        step = train_one_epoch(config, task, train_model, optimizer, lr_scheduler, scaler, loader_train, epoch, step,
                               steps, device, logger, writer, stop)
        if step < steps:
            save({}, is_best=False, epoch_complete=False)
            signum = stop.signum or signal.SIGTERM
            raise Preempted(f'stopped by {signal.Signals(signum).name} at epoch {epoch} step {step}/{steps}; saved '
                            f'{os.path.join(out_dir, CHECKPOINT_LAST)}. Run the same command again to continue '
                            'from there.', signum)
        metrics = task.evaluate(model, loader_val, device, config, logger)
        _log_metrics(logger, metrics, writer, epoch)
        is_best = metrics[task.primary_metric] > best
        best = max(best, metrics[task.primary_metric])
        save(metrics, is_best, epoch_complete=True)
        epoch, step = epoch + 1, 0
    logger.info(f'training time {datetime.timedelta(seconds=int(time.time() - start_time))}')
    if writer is not None:
        writer.close()
    return metrics


def main(task: DenseTask, description: str, defaults: CN, choices: dict) -> None:
    """Parse the command line and run ``task`` (errors and stop signals as ``utils.run_entry_point``)."""
    run_entry_point(lambda: run(task, parse_args(description, defaults, choices)))
