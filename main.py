"""Train, evaluate or benchmark FAT on ImageNet-style data.

    torchrun --nproc_per_node 8 main.py --cfg configs/fat_b0_224.yaml --data-path /data/imagenet
    python main.py --cfg configs/fat_b0_224.yaml --data-path /data/imagenet --eval --resume ckpt.pth
    python main.py --cfg configs/fat_b0_224.yaml --throughput
"""
from __future__ import annotations

import argparse
import datetime
import logging
import os
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn as nn
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.utils import AverageMeter, ModelEmaV3
from torch.nn.parallel import DistributedDataParallel
from torch.utils.tensorboard import SummaryWriter

from config import ConfigError, get_config, scaled_lrs
from data import build_loader
from logger import create_logger
from lr_scheduler import build_scheduler
from models import build_model, count_macs
from optimizer import build_optimizer
from utils import (NonFiniteLossError, Preempted, StopSignal, UserInputError, all_finite, all_reduce_sum, amp_dtype,
                   autocast, init_distributed, is_distributed, keep_freed_memory, load_checkpoint_file,
                   load_model_weights, load_resume_checkpoint, memory_used_mb, prepare_output, rng_state,
                   run_entry_point, save_checkpoint, seed_everything, set_rng_state, unwrap_model)


def parse_option() -> Tuple[argparse.Namespace, object]:
    parser = argparse.ArgumentParser('FAT training and evaluation', add_help=True)
    parser.add_argument('--cfg', type=str, metavar='FILE', help='config yaml')
    parser.add_argument('--opts', nargs='+', default=None, help='override config keys: KEY VALUE ...')
    parser.add_argument('--batch-size', type=int, help='batch size per process')
    parser.add_argument('--data-path', type=str, help='ImageFolder root with train/ and val/')
    parser.add_argument('--pretrained', type=str, help='weights to fine-tune from')
    parser.add_argument('--resume', type=str, help='checkpoint to resume (or to evaluate with --eval)')
    parser.add_argument('--accumulation-steps', type=int, help='micro-batches per optimizer step')
    parser.add_argument('--use-checkpoint', action='store_true', help='activation checkpointing')
    parser.add_argument('--disable-amp', action='store_true', help='run in fp32 on CUDA too')
    parser.add_argument('--amp-dtype', choices=['bf16', 'fp16'], help='mixed-precision type on CUDA')
    parser.add_argument('--output', type=str, metavar='PATH', help='root of run folders')
    parser.add_argument('--tag', type=str, help='run tag')
    parser.add_argument('--eval', action='store_true', help='only validate --resume')
    parser.add_argument('--throughput', action='store_true', help='only measure inference throughput')
    parser.add_argument('--device', choices=['cuda', 'cpu'], help='default: cuda when available')
    parser.add_argument('--compile', action='store_true', help='torch.compile the model')
    parser.add_argument('--channels-last', action='store_true', help='channels_last model and inputs')
    parser.add_argument('--reparam', action='store_true',
                        help='--eval / --throughput: fold BatchNorms into convs first (deploy form, same logits)')
    parser.add_argument('--seed', type=int, help='random seed')
    parser.add_argument('--debug', action='store_true', help='show full tracebacks for input errors')
    args = parser.parse_args()
    return args, get_config(args)


def to_device(samples: torch.Tensor, config, device: torch.device) -> torch.Tensor:
    samples = samples.to(device, non_blocking=True)
    return samples.contiguous(memory_format=torch.channels_last) if config.CHANNELS_LAST else samples


def build_criterion(config, mixup_fn) -> nn.Module:
    if mixup_fn is not None:
        return SoftTargetCrossEntropy()  # the labels are already mixed and smoothed
    if config.MODEL.LABEL_SMOOTHING > 0:
        return LabelSmoothingCrossEntropy(smoothing=config.MODEL.LABEL_SMOOTHING)
    return nn.CrossEntropyLoss()


@dataclass
class Run:
    """Everything a training run carries from step to step, and what its checkpoints hold."""
    model: nn.Module  # the plain model (what checkpoints store)
    train_model: nn.Module  # what runs the steps: the model, or DDP / torch.compile around it
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    scaler: torch.amp.GradScaler
    loss_scaling: bool  # fp16: the scaler really scales; otherwise it only skips non-finite steps
    ema: Optional[ModelEmaV3]
    epoch: int = 0  # the epoch in progress
    step: int = 0  # batches of that epoch already trained on
    max_accuracy: float = 0.0
    nonfinite_steps: Optional[torch.Tensor] = None  # on the device: no sync to count them
    first_nonfinite: Optional[torch.Tensor] = None  # epoch * steps_per_epoch + batch of the first one

    def state_dict(self, config, rng_states: list) -> dict:
        """Plain data only, so it loads with torch.load(..., weights_only=True)."""
        return {
            'model': self.model.state_dict(), 'optimizer': self.optimizer.state_dict(),
            'lr_scheduler': self.lr_scheduler.state_dict(), 'scaler': self.scaler.state_dict(),
            'ema': unwrap_model(self.ema.module).state_dict() if self.ema is not None else None,
            'epoch': self.epoch, 'step': self.step, 'max_accuracy': self.max_accuracy,
            'rng': rng_states, 'config': config.dump(),
        }

    def load_state_dict(self, checkpoint: dict, path: str, rank: int, world_size: int, logger) -> None:
        load_model_weights(self.model, path, logger, checkpoint=checkpoint)
        self.optimizer.load_state_dict(checkpoint['optimizer'])
        self.lr_scheduler.load_state_dict(checkpoint['lr_scheduler'])
        self.scaler.load_state_dict(checkpoint['scaler'])
        if self.ema is not None and checkpoint.get('ema') is not None:
            unwrap_model(self.ema.module).load_state_dict(checkpoint['ema'])
        self.epoch, self.step, self.max_accuracy = checkpoint['epoch'], checkpoint['step'], checkpoint['max_accuracy']
        if len(checkpoint['rng']) == world_size:
            set_rng_state(checkpoint['rng'][rank])
        else:
            logger.warning(f'{path} was written by {len(checkpoint["rng"])} process(es), this run has {world_size}: '
                           'random states are not restored, so the run continues but not bit-exactly')
        logger.info(f'resumed from {path} (epoch {self.epoch}, {self.step} steps done, '
                    f'best top-1 {self.max_accuracy:.2f}%)')


def check_nonfinite(config, run: Run, steps_per_epoch: int) -> None:
    """Stop once more optimizer steps had a non-finite loss or gradient than TRAIN.MAX_NONFINITE_STEPS
    (those steps were skipped on the device, so the weights are untouched)."""
    count = int(run.nonfinite_steps.item())
    if count > config.TRAIN.MAX_NONFINITE_STEPS:
        epoch, step = divmod(int(run.first_nonfinite.item()), steps_per_epoch)
        raise NonFiniteLossError(
            f'non-finite loss or gradients at epoch {epoch} step {step} ({count} step(s) so far, '
            f'TRAIN.MAX_NONFINITE_STEPS is {config.TRAIN.MAX_NONFINITE_STEPS}); those steps were skipped and '
            'nothing non-finite was saved. Lower TRAIN.BASE_LR, check TRAIN.CLIP_GRAD and the data, '
            'or allow skipping with --opts TRAIN.MAX_NONFINITE_STEPS N')


def train_one_epoch(config, run: Run, criterion, loader, steps_per_epoch: int, mixup_fn, device, logger,
                    writer: Optional[SummaryWriter], stop: StopSignal) -> bool:
    """Train from ``run.step`` to the end of ``run.epoch``; False when a stop signal ended it early
    (``run.step`` then says how far it got, at an optimizer-step boundary)."""
    model, optimizer = run.train_model, run.optimizer
    model.train()
    optimizer.zero_grad(set_to_none=True)
    loader.sampler.set_epoch(run.epoch, skip=run.step * config.DATA.BATCH_SIZE)
    accumulation = config.TRAIN.ACCUMULATION_STEPS
    params = [p for p in model.parameters() if p.requires_grad]
    max_norm = config.TRAIN.CLIP_GRAD if config.TRAIN.CLIP_GRAD > 0 else float('inf')
    batch_time, data_time = AverageMeter(), AverageMeter()
    # Running sums stay on the device; they are read (one sync) only at the print interval.
    loss_sum = torch.zeros((), device=device)
    norm_sum = torch.zeros((), device=device)
    loss_finite = torch.ones((), dtype=torch.bool, device=device)
    loss_count = norm_count = 0
    start = end = time.time()
    for idx, (samples, targets) in enumerate(loader, start=run.step):
        samples, targets = to_device(samples, config, device), targets.to(device, non_blocking=True)
        if mixup_fn is not None:
            samples, targets = mixup_fn(samples, targets)
        data_time.update(time.time() - end)

        update = (idx + 1) % accumulation == 0
        sync_grads = update or not hasattr(model, 'no_sync')
        with (nullcontext() if sync_grads else model.no_sync()), autocast(config, device):
            loss = criterion(model(samples), targets)
        run.scaler.scale(loss / accumulation).backward()
        loss = loss.detach()
        loss_finite &= torch.isfinite(loss)
        loss_sum += loss
        loss_count += 1
        if update:
            run.scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm).detach()
            # With loss scaling an overflowing gradient is routine (the scaler backs off); only a
            # non-finite loss is then a fault. Either way the scaler skips the step on the device.
            bad = ~loss_finite if run.loss_scaling else ~(loss_finite & torch.isfinite(grad_norm))
            run.nonfinite_steps += bad
            run.first_nonfinite.copy_(torch.where(bad & (run.first_nonfinite < 0),
                                                  run.epoch * steps_per_epoch + idx, run.first_nonfinite))
            loss_finite.fill_(True)
            run.scaler.step(optimizer)
            run.scaler.update() if run.loss_scaling else run.scaler.update(1.0)
            optimizer.zero_grad(set_to_none=True)
            global_step = (run.epoch * steps_per_epoch + idx) // accumulation
            run.lr_scheduler.step_update(global_step + 1)
            if run.ema is not None:
                run.ema.update(run.model, step=global_step)
            norm_sum += torch.where(torch.isfinite(grad_norm), grad_norm, 0)
            norm_count += 1
            run.step = idx + 1
        batch_time.update(time.time() - end)
        end = time.time()

        print_now = idx % config.PRINT_FREQ == 0 or idx == steps_per_epoch - 1
        if print_now:
            check_nonfinite(config, run, steps_per_epoch)
            lr = optimizer.param_groups[0]['lr']
            loss_avg = (loss_sum / max(loss_count, 1)).item()
            norm_avg = (norm_sum / max(norm_count, 1)).item()
            eta = datetime.timedelta(seconds=int(batch_time.avg * (steps_per_epoch - idx - 1)))
            logger.info(
                f'Train: [{run.epoch}/{config.TRAIN.EPOCHS}][{idx}/{steps_per_epoch}]\t'
                f'eta {eta} lr {lr:.3e}\t time {batch_time.val:.4f} ({batch_time.avg:.4f})\t'
                f'data {data_time.val:.4f} ({data_time.avg:.4f})\t loss {loss_avg:.4f}\t'
                f'grad_norm {norm_avg:.4f}\t mem {memory_used_mb(device):.0f}MB')
            if writer is not None:
                step = run.epoch * steps_per_epoch + idx
                writer.add_scalar('train/loss', loss_avg, step)
                writer.add_scalar('train/lr', lr, step)
                writer.add_scalar('train/grad_norm', norm_avg, step)
                writer.add_scalar('train/data_time', data_time.avg, step)
            loss_sum.zero_()
            norm_sum.zero_()
            loss_count = norm_count = 0
        # One process checks its flag each step for free; several agree on it at the print interval.
        if update and idx + 1 < steps_per_epoch and (stop.signum if not is_distributed() else
                                                     print_now and stop.agreed(device)):
            return False
    check_nonfinite(config, run, steps_per_epoch)
    run.step = steps_per_epoch
    epoch_time = time.time() - start
    logger.info(f'EPOCH {run.epoch} training takes {datetime.timedelta(seconds=int(epoch_time))}')
    if writer is not None:
        writer.add_scalar('train/epoch_time', epoch_time, run.epoch)
    return True


@torch.no_grad()
def validate(config, model, loader, device) -> Tuple[float, float, float]:
    """Top-1, top-5 (percent) and mean loss over the whole validation set, exact across processes."""
    model.eval()
    criterion = nn.CrossEntropyLoss(reduction='sum')
    # loss sum, top-1 hits, top-5 hits, samples
    totals = torch.zeros(4, dtype=torch.float64, device=device)
    for samples, targets in loader:
        samples, targets = to_device(samples, config, device), targets.to(device, non_blocking=True)
        with autocast(config, device):
            output = model(samples)
        top5 = output.topk(min(5, output.shape[1]), dim=1).indices
        hits = top5.eq(targets[:, None])
        totals += torch.stack([criterion(output.float(), targets).double(), hits[:, 0].sum().double(),
                               hits.any(dim=1).sum().double(), torch.tensor(len(targets), device=device).double()])
    loss, top1, top5, count = all_reduce_sum(totals).tolist()
    return 100 * top1 / count, 100 * top5 / count, loss / count


def inference_model(config, model: nn.Module, device: torch.device, logger: logging.Logger) -> nn.Module:
    """The model --eval and --throughput run: in eval mode, in deploy form with REPARAM, compiled with
    COMPILE (on CPU with inductor's weight freezing, PyTorch's CPU inference recipe: it prepacks the
    conv weights and fuses activations into them; safe here because the weights no longer change)."""
    model.eval()
    if config.REPARAM:
        n_norms = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
        model.reparameterize()
        logger.info(f'deploy form: {n_norms} BatchNorms and the depthwise residuals folded into the convs')
    if not config.COMPILE:
        return model
    if device.type == 'cpu':
        import torch._inductor.config  # only here: its import takes most of a second
        torch._inductor.config.freezing = True
    return torch.compile(model)


@torch.no_grad()
def throughput(config, model, device, logger: logging.Logger) -> float:
    """Inference images per second at DATA.BATCH_SIZE and DATA.IMG_SIZE, timed after warm-up."""
    model.eval()
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
    size = config.DATA.IMG_SIZE
    images = to_device(torch.randn(config.DATA.BATCH_SIZE, config.DATA.IN_CHANS, size, size), config, device)
    warmup, min_seconds = (50, 5.0) if device.type == 'cuda' else (3, 3.0)
    with autocast(config, device):
        for _ in range(warmup):
            model(images)
        sync()
        iters, start = 0, time.time()
        while iters < 10 or time.time() - start < min_seconds:
            model(images)
            iters += 1
        sync()
    rate = iters * config.DATA.BATCH_SIZE / (time.time() - start)
    logger.info(f'batch_size {config.DATA.BATCH_SIZE} image size {size} throughput {rate:.1f} img/s')
    return rate


def save(config, run: Run, out_dir: str, rank: int, logger, is_best: bool = False, epoch_complete: bool = True) -> None:
    """Checkpoint the run (rank 0 writes; every rank contributes its random state). Non-finite
    weights are never written: the last good checkpoint stays."""
    rng_states = [rng_state()]
    if is_distributed():
        rng_states = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(rng_states, rng_state())
    if rank != 0:
        return
    state = run.state_dict(config, rng_states)
    if not all_finite(state['model']):
        raise NonFiniteLossError(f'the weights or BatchNorm statistics are non-finite at epoch {run.epoch} step '
                                 f'{run.step}; not saving them, the last good checkpoint in {out_dir} is kept')
    periodic = epoch_complete and config.SAVE_FREQ > 0 and (
        (run.epoch + 1) % config.SAVE_FREQ == 0 or run.epoch + 1 == config.TRAIN.EPOCHS)
    save_checkpoint(out_dir, state, run.epoch, is_best, periodic, logger)


def main(config) -> None:
    rank, world_size, device = init_distributed(config.DEVICE)
    heap_reuse = device.type == 'cpu' and keep_freed_memory()
    seed_everything(config.SEED + rank)
    out_dir = prepare_output(config)
    logger = create_logger(out_dir, rank, name=config.MODEL.NAME)
    writer = SummaryWriter(out_dir) if rank == 0 and not (config.EVAL_MODE or config.THROUGHPUT_MODE) else None

    if not config.THROUGHPUT_MODE:
        dataset_train, dataset_val, loader_train, loader_val, mixup_fn = build_loader(config)
        num_classes = len(dataset_train.classes)
        if num_classes != config.MODEL.NUM_CLASSES:
            logger.info(f'the data has {num_classes} classes: MODEL.NUM_CLASSES {config.MODEL.NUM_CLASSES} -> {num_classes}')
            config.defrost()
            config.MODEL.NUM_CLASSES = num_classes
            config.freeze()
        logger.info(f'{len(dataset_train)} training and {len(dataset_val)} validation images, {num_classes} classes')
    # Only training writes config.yaml: an --eval or --throughput run in the same folder keeps it.
    if rank == 0 and not (config.EVAL_MODE or config.THROUGHPUT_MODE):
        with open(os.path.join(out_dir, 'config.yaml'), 'w') as f:
            f.write(config.dump())
    logger.info(f'config:\n{config.dump()}')
    precision = amp_dtype(config, device)
    logger.info(f'{world_size} process(es) on {device}; {torch.get_num_threads()} CPU threads per process; '
                f'{"autocast " + str(precision).split(".")[-1] if precision else "fp32"}'
                f'{"; large blocks kept on the heap for reuse (glibc mallopt)" if heap_reuse else ""}')

    try:
        model = build_model(config)
    except ValueError as error:
        raise ConfigError(f'MODEL: {error}') from error
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    macs = count_macs(model, (config.DATA.IN_CHANS, config.DATA.IMG_SIZE, config.DATA.IMG_SIZE))
    logger.info(f'{config.MODEL.NAME}: {n_params:,} parameters, {macs / 1e9:.3f} GMACs at {config.DATA.IMG_SIZE}px '
                '(torch.utils.flop_counter, attention included)')
    if config.TRAIN.USE_CHECKPOINT:
        model.set_grad_checkpointing(True)
    model.to(device)
    if config.CHANNELS_LAST:
        model.to(memory_format=torch.channels_last)

    if config.THROUGHPUT_MODE:
        throughput(config, inference_model(config, model, device, logger), device, logger)
        return
    if config.EVAL_MODE:
        if not config.MODEL.RESUME:
            raise UserInputError('--eval needs a checkpoint: pass --resume CKPT')
        load_model_weights(model, config.MODEL.RESUME, logger)
        acc1, acc5, loss = validate(config, inference_model(config, model, device, logger), loader_val, device)
        logger.info(f'Accuracy of the network on the {len(dataset_val)} test images: {acc1:.2f}% '
                    f'(top-5 {acc5:.2f}%, loss {loss:.4f})')
        return

    if config.MODEL.PRETRAINED:
        load_model_weights(model, config.MODEL.PRETRAINED, logger, drop_head=True)
    if device.type == 'cuda' and world_size > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    base_lr, warmup_lr, min_lr = scaled_lrs(config, world_size)
    logger.info(f'LR scaled to the total batch: base {base_lr:.3e}, warm-up {warmup_lr:.3e}, min {min_lr:.3e}')
    optimizer = build_optimizer(config, model, base_lr)
    steps_per_epoch = len(loader_train)
    loss_scaling = device.type == 'cuda' and config.AMP_ENABLE and config.AMP_DTYPE == 'fp16'
    train_model = DistributedDataParallel(model, device_ids=[device] if device.type == 'cuda' else None) \
        if world_size > 1 else model
    run = Run(
        model=model, train_model=torch.compile(train_model) if config.COMPILE else train_model, optimizer=optimizer,
        lr_scheduler=build_scheduler(config, optimizer, steps_per_epoch, warmup_lr, min_lr),
        # Without fp16 the scaler keeps scale 1 and serves to skip non-finite steps on the device.
        scaler=torch.amp.GradScaler(device.type, init_scale=2.0 ** 16 if loss_scaling else 1.0),
        loss_scaling=loss_scaling,
        ema=ModelEmaV3(model, decay=config.MODEL.EMA.DECAY) if config.MODEL.EMA.ENABLE else None,
        epoch=config.TRAIN.START_EPOCH,
        nonfinite_steps=torch.zeros((), dtype=torch.long, device=device),
        first_nonfinite=torch.full((), -1, dtype=torch.long, device=device))

    if config.MODEL.RESUME:
        run.load_state_dict(load_checkpoint_file(config.MODEL.RESUME), config.MODEL.RESUME, rank, world_size, logger)
    elif config.TRAIN.AUTO_RESUME:
        path, checkpoint = load_resume_checkpoint(out_dir, logger)
        if path:
            run.load_state_dict(checkpoint, path, rank, world_size, logger)
    if run.step >= steps_per_epoch:
        run.epoch, run.step = run.epoch + 1, 0

    criterion = build_criterion(config, mixup_fn)
    stop = StopSignal(logger)
    logger.info('start training')
    start_time = time.time()
    while run.epoch < config.TRAIN.EPOCHS:
        if not train_one_epoch(config, run, criterion, loader_train, steps_per_epoch, mixup_fn, device, logger,
                               writer, stop):
            save(config, run, out_dir, rank, logger, epoch_complete=False)
            raise Preempted(f'stopped by {signal.Signals(stop.signum or signal.SIGTERM).name} at epoch {run.epoch} '
                            f'step {run.step}/{steps_per_epoch}; saved {os.path.join(out_dir, "ckpt_last.pth")}. '
                            'Run the same command again to continue from there.', stop.signum or signal.SIGTERM)
        acc1, acc5, loss = validate(config, run.train_model, loader_val, device)
        logger.info(f'Accuracy of the network on the {len(dataset_val)} test images: {acc1:.2f}% '
                    f'(top-5 {acc5:.2f}%, loss {loss:.4f})')
        if run.ema is not None:
            ema_acc1, _, _ = validate(config, run.ema.module, loader_val, device)
            logger.info(f'EMA accuracy: {ema_acc1:.2f}%')
        is_best = acc1 > run.max_accuracy
        run.max_accuracy = max(run.max_accuracy, acc1)
        logger.info(f'Max accuracy: {run.max_accuracy:.2f}%')
        if writer is not None:
            for name, value in (('val/acc1', acc1), ('val/acc5', acc5), ('val/loss', loss)):
                writer.add_scalar(name, value, run.epoch)
            if run.ema is not None:
                writer.add_scalar('val/ema_acc1', ema_acc1, run.epoch)
        save(config, run, out_dir, rank, logger, is_best=is_best)
        run.epoch, run.step = run.epoch + 1, 0
    logger.info(f'training time {datetime.timedelta(seconds=int(time.time() - start_time))}')
    if writer is not None:
        writer.close()


if __name__ == '__main__':
    run_entry_point(lambda: main(parse_option()[1]))
