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
import random
import time
from contextlib import nullcontext
from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.utils import AverageMeter, ModelEmaV3
from torch.nn.parallel import DistributedDataParallel
from torch.utils.tensorboard import SummaryWriter

from config import get_config, output_dir, scaled_lrs
from data import build_loader
from logger import create_logger
from lr_scheduler import build_scheduler
from models import build_model, count_macs
from optimizer import build_optimizer
from utils import (all_reduce_sum, find_resume_checkpoint, init_distributed, load_checkpoint_file,
                   load_model_weights, memory_used_mb, save_checkpoint, unwrap_model)


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
    parser.add_argument('--seed', type=int, help='random seed')
    args = parser.parse_args()
    return args, get_config(args)


def autocast(config, device: torch.device):
    """Mixed precision on CUDA (AMP_DTYPE); CPU runs in fp32."""
    if device.type != 'cuda' or not config.AMP_ENABLE:
        return nullcontext()
    return torch.autocast('cuda', dtype=torch.bfloat16 if config.AMP_DTYPE == 'bf16' else torch.float16)


def to_device(samples: torch.Tensor, config, device: torch.device) -> torch.Tensor:
    samples = samples.to(device, non_blocking=True)
    return samples.contiguous(memory_format=torch.channels_last) if config.CHANNELS_LAST else samples


def build_criterion(config, mixup_fn) -> nn.Module:
    if mixup_fn is not None:
        return SoftTargetCrossEntropy()  # the labels are already mixed and smoothed
    if config.MODEL.LABEL_SMOOTHING > 0:
        return LabelSmoothingCrossEntropy(smoothing=config.MODEL.LABEL_SMOOTHING)
    return nn.CrossEntropyLoss()


def train_one_epoch(config, model, criterion, loader, optimizer, epoch, mixup_fn, lr_scheduler, scaler, ema,
                    device, logger, writer: Optional[SummaryWriter]) -> None:
    model.train()
    optimizer.zero_grad(set_to_none=True)
    loader.sampler.set_epoch(epoch)
    num_steps = len(loader)
    accumulation = config.TRAIN.ACCUMULATION_STEPS
    params = [p for p in model.parameters() if p.requires_grad]
    max_norm = config.TRAIN.CLIP_GRAD if config.TRAIN.CLIP_GRAD > 0 else float('inf')
    batch_time, data_time = AverageMeter(), AverageMeter()
    # Running sums stay on the device; they are read (one sync) only at the print interval.
    loss_sum = torch.zeros((), device=device)
    norm_sum = torch.zeros((), device=device)
    loss_count = norm_count = 0
    start = end = time.time()
    for idx, (samples, targets) in enumerate(loader):
        samples, targets = to_device(samples, config, device), targets.to(device, non_blocking=True)
        if mixup_fn is not None:
            samples, targets = mixup_fn(samples, targets)
        data_time.update(time.time() - end)

        update = (idx + 1) % accumulation == 0
        sync_grads = update or not hasattr(model, 'no_sync')
        with (nullcontext() if sync_grads else model.no_sync()), autocast(config, device):
            loss = criterion(model(samples), targets)
        scaler.scale(loss / accumulation).backward()
        loss_sum += loss.detach()
        loss_count += 1
        if update:
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            global_step = (epoch * num_steps + idx) // accumulation
            lr_scheduler.step_update(global_step + 1)
            if ema is not None:
                ema.update(unwrap_model(model), step=global_step)
            norm_sum += grad_norm.detach()
            norm_count += 1
        batch_time.update(time.time() - end)
        end = time.time()

        if idx % config.PRINT_FREQ == 0 or idx == num_steps - 1:
            lr = optimizer.param_groups[0]['lr']
            loss_avg = (loss_sum / max(loss_count, 1)).item()
            norm_avg = (norm_sum / max(norm_count, 1)).item()
            eta = datetime.timedelta(seconds=int(batch_time.avg * (num_steps - idx - 1)))
            logger.info(
                f'Train: [{epoch}/{config.TRAIN.EPOCHS}][{idx}/{num_steps}]\t'
                f'eta {eta} lr {lr:.3e}\t time {batch_time.val:.4f} ({batch_time.avg:.4f})\t'
                f'data {data_time.val:.4f} ({data_time.avg:.4f})\t loss {loss_avg:.4f}\t'
                f'grad_norm {norm_avg:.4f}\t mem {memory_used_mb(device):.0f}MB')
            if writer is not None:
                step = epoch * num_steps + idx
                writer.add_scalar('train/loss', loss_avg, step)
                writer.add_scalar('train/lr', lr, step)
                writer.add_scalar('train/grad_norm', norm_avg, step)
                writer.add_scalar('train/data_time', data_time.avg, step)
            loss_sum.zero_()
            norm_sum.zero_()
            loss_count = norm_count = 0
    epoch_time = time.time() - start
    logger.info(f'EPOCH {epoch} training takes {datetime.timedelta(seconds=int(epoch_time))}')
    if writer is not None:
        writer.add_scalar('train/epoch_time', epoch_time, epoch)


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


def checkpoint_state(config, model, optimizer, lr_scheduler, scaler, ema, epoch: int, max_accuracy: float) -> dict:
    """Everything a resume needs, as plain data (loads with weights_only=True)."""
    return {
        'model': unwrap_model(model).state_dict(), 'optimizer': optimizer.state_dict(),
        'lr_scheduler': lr_scheduler.state_dict(), 'scaler': scaler.state_dict(),
        'ema': unwrap_model(ema.module).state_dict() if ema is not None else None,
        'epoch': epoch, 'max_accuracy': max_accuracy, 'config': config.dump(),
    }


def resume(path: str, model, optimizer, lr_scheduler, scaler, ema, logger) -> Tuple[int, float]:
    """Restore a training checkpoint; returns (next epoch, best top-1 so far)."""
    checkpoint = load_checkpoint_file(path)
    load_model_weights(unwrap_model(model), path, logger)
    optimizer.load_state_dict(checkpoint['optimizer'])
    lr_scheduler.load_state_dict(checkpoint['lr_scheduler'])
    scaler.load_state_dict(checkpoint['scaler'])
    if ema is not None and checkpoint.get('ema') is not None:
        unwrap_model(ema.module).load_state_dict(checkpoint['ema'])
    logger.info(f"resumed from {path} (epoch {checkpoint['epoch']}, best top-1 {checkpoint['max_accuracy']:.2f}%)")
    return checkpoint['epoch'] + 1, checkpoint['max_accuracy']


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def main(config) -> None:
    rank, world_size, device = init_distributed(config.DEVICE)
    seed_everything(config.SEED + rank)
    out_dir = output_dir(config)
    os.makedirs(out_dir, exist_ok=True)
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
    if rank == 0:
        with open(os.path.join(out_dir, 'config.yaml'), 'w') as f:
            f.write(config.dump())
    logger.info(f'config:\n{config.dump()}')
    logger.info(f'{world_size} process(es) on {device}; {torch.get_num_threads()} CPU threads per process')

    model = build_model(config)
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
        throughput(config, torch.compile(model) if config.COMPILE else model, device, logger)
        return
    if config.EVAL_MODE:
        if not config.MODEL.RESUME:
            raise ValueError('--eval needs a checkpoint: pass --resume CKPT')
        load_model_weights(model, config.MODEL.RESUME, logger)
        acc1, acc5, loss = validate(config, torch.compile(model) if config.COMPILE else model, loader_val, device)
        logger.info(f'Accuracy of the network on the {len(dataset_val)} test images: {acc1:.2f}% '
                    f'(top-5 {acc5:.2f}%, loss {loss:.4f})')
        return

    if config.MODEL.PRETRAINED:
        load_model_weights(model, config.MODEL.PRETRAINED, logger, drop_head=True)
    if device.type == 'cuda' and world_size > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ema = ModelEmaV3(model, decay=config.MODEL.EMA.DECAY) if config.MODEL.EMA.ENABLE else None
    base_lr, warmup_lr, min_lr = scaled_lrs(config, world_size)
    logger.info(f'LR scaled to the total batch: base {base_lr:.3e}, warm-up {warmup_lr:.3e}, min {min_lr:.3e}')
    optimizer = build_optimizer(config, model, base_lr)
    lr_scheduler = build_scheduler(config, optimizer, len(loader_train), warmup_lr, min_lr)
    use_fp16 = device.type == 'cuda' and config.AMP_ENABLE and config.AMP_DTYPE == 'fp16'
    scaler = torch.amp.GradScaler(device.type, enabled=use_fp16)
    train_model = DistributedDataParallel(model, device_ids=[device] if device.type == 'cuda' else None) \
        if world_size > 1 else model
    if config.COMPILE:
        train_model = torch.compile(train_model)

    resume_path = config.MODEL.RESUME or (find_resume_checkpoint(out_dir) if config.TRAIN.AUTO_RESUME else None)
    start_epoch, max_accuracy = config.TRAIN.START_EPOCH, 0.0
    if resume_path:
        start_epoch, max_accuracy = resume(resume_path, model, optimizer, lr_scheduler, scaler, ema, logger)

    criterion = build_criterion(config, mixup_fn)
    logger.info('start training')
    start_time = time.time()
    for epoch in range(start_epoch, config.TRAIN.EPOCHS):
        train_one_epoch(config, train_model, criterion, loader_train, optimizer, epoch, mixup_fn, lr_scheduler,
                        scaler, ema, device, logger, writer)
        acc1, acc5, loss = validate(config, train_model, loader_val, device)
        logger.info(f'Accuracy of the network on the {len(dataset_val)} test images: {acc1:.2f}% '
                    f'(top-5 {acc5:.2f}%, loss {loss:.4f})')
        if ema is not None:
            ema_acc1, _, _ = validate(config, ema.module, loader_val, device)
            logger.info(f'EMA accuracy: {ema_acc1:.2f}%')
        is_best = acc1 > max_accuracy
        max_accuracy = max(max_accuracy, acc1)
        logger.info(f'Max accuracy: {max_accuracy:.2f}%')
        if writer is not None:
            for name, value in (('val/acc1', acc1), ('val/acc5', acc5), ('val/loss', loss)):
                writer.add_scalar(name, value, epoch)
            if ema is not None:
                writer.add_scalar('val/ema_acc1', ema_acc1, epoch)
        if rank == 0:
            state = checkpoint_state(config, model, optimizer, lr_scheduler, scaler, ema, epoch, max_accuracy)
            save_checkpoint(out_dir, state, epoch, is_best, config.SAVE_FREQ, config.TRAIN.EPOCHS, logger)
    logger.info(f'training time {datetime.timedelta(seconds=int(time.time() - start_time))}')
    if writer is not None:
        writer.close()


if __name__ == '__main__':
    _, cfg = parse_option()
    main(cfg)
