"""Train, evaluate or benchmark FAT on ImageNet-style data.

    torchrun --nproc_per_node 8 main.py --cfg configs/fat_b0_224.yaml --data-path /data/imagenet
    python main.py --cfg configs/fat_b0_224.yaml --data-path /data/imagenet --eval --resume ckpt.pth
    python main.py --cfg configs/fat_b0_224.yaml --throughput

Image classification is a task of the one run engine (``engine.py``): this file says how to build
its data, model, loss and metric; the engine trains, evaluates, checkpoints and resumes.
"""
from __future__ import annotations

import copy
import datetime
import itertools
import math
import time
from pathlib import Path
from typing import Callable, Dict, Tuple

import torch
import torch.nn as nn
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

import engine
from config import parse_command_line
from data import build_loader, build_mixup
from models import build_model, checkpoint_filter_fn, count_macs
from models.export import check_destination, export as export_model
from utils import (CheckpointError, all_reduce, amp_dtype, autocast, load_checkpoint_file, memory_used_mb,
                   UserInputError, run_entry_point, state_dict_mismatch)


class Classification(engine.Task):
    """Image classification (ImageFolders or their shards): timm augmentation and Mixup/CutMix,
    cross-entropy, top-1 / top-5."""

    primary_metric = 'acc1'

    def build_data(self) -> engine.TaskData:
        config = self.config
        data = build_loader(config)
        classes = data.classes
        if len(classes) != config.MODEL.NUM_CLASSES:
            self.logger.info(f'the data has {len(classes)} classes: MODEL.NUM_CLASSES {config.MODEL.NUM_CLASSES} '
                             f'-> {len(classes)}')
            config.defrost()
            config.MODEL.NUM_CLASSES = len(classes)
            config.freeze()
        self.build_loss(len(classes))
        return engine.TaskData(
            data.train, data.val, identity={'classes': list(classes), 'train_images': data.train_images},
            description=f'{data.train_images} training and {data.val_images} validation images, {len(classes)} classes')

    def build_loss(self, num_classes: int) -> None:
        """Mixup/CutMix (as AUG configures them) and the training criterion that fits them."""
        config = self.config
        self.mixup = build_mixup(config, num_classes)
        if self.mixup is not None:
            self.criterion = SoftTargetCrossEntropy()  # the labels are already mixed and smoothed
        elif config.MODEL.LABEL_SMOOTHING > 0:
            self.criterion = LabelSmoothingCrossEntropy(smoothing=config.MODEL.LABEL_SMOOTHING)
        else:
            self.criterion = nn.CrossEntropyLoss()

    def build_model(self) -> nn.Module:
        config = self.config
        model = build_model(config)
        log_macs(config, model, self.logger)
        if config.TRAIN.USE_CHECKPOINT:
            model.set_grad_checkpointing(True)
        if config.MODEL.PRETRAINED:
            load_pretrained(model, config.MODEL.PRETRAINED, self.logger)
        return model

    def _inputs(self, samples: torch.Tensor) -> torch.Tensor:
        samples = samples.to(self.device, non_blocking=True)
        return samples.contiguous(memory_format=torch.channels_last) if self.config.CHANNELS_LAST else samples

    def loss(self, model: nn.Module, batch):
        samples, targets = self._inputs(batch[0]), batch[1].to(self.device, non_blocking=True)
        if self.mixup is not None:
            samples, targets = self.mixup(samples, targets)
        return self.criterion(model(samples), targets), {}

    def evaluate(self, model: nn.Module, loader) -> Dict[str, float]:
        """Top-1, top-5 (percent), mean loss and the number of images, exact over all processes."""
        criterion = nn.CrossEntropyLoss(reduction='sum')
        totals = torch.zeros(4, dtype=torch.float64, device=self.device)  # loss sum, top-1 hits, top-5 hits, images
        for samples, targets in loader:
            samples, targets = self._inputs(samples), targets.to(self.device, non_blocking=True)
            output = model(samples).float()
            hits = output.topk(min(5, output.shape[1]), dim=1).indices.eq(targets[:, None])
            totals += torch.stack([criterion(output, targets).double(), hits[:, 0].sum().double(),
                                   hits.any(dim=1).sum().double(), torch.tensor(len(targets), device=self.device).double()])
        loss, top1, top5, images = all_reduce(totals).tolist()
        return {'acc1': 100 * top1 / images, 'acc5': 100 * top5 / images, 'loss': loss / images, 'images': images}

    def summary(self, metrics: Dict[str, float]) -> str:
        return (f'Accuracy of the network on the {int(metrics["images"])} test images: {metrics["acc1"]:.2f}% '
                f'(top-5 {metrics["acc5"]:.2f}%, loss {metrics["loss"]:.4f})')

    def weights(self, checkpoint: dict) -> dict:
        return checkpoint_filter_fn(checkpoint)  # this project's, the authors' or a bare state dict

    def for_inference(self, model: nn.Module) -> nn.Module:
        return inference_model(self.config, model, self.device, self.logger)


def log_macs(config, model: nn.Module, logger) -> None:
    size = config.DATA.IMG_SIZE
    logger.info(f'{config.MODEL.VARIANT}: {count_macs(model, (config.DATA.IN_CHANS, size, size)) / 1e9:.3f} GMACs at '
                f'{size}px (torch.utils.flop_counter, attention included)')


def load_pretrained(model: nn.Module, path: str, logger) -> None:
    """Start from the weights of ``path`` (this project's, the authors' or a bare state dict); a
    classifier of another class count is re-initialised for fine-tuning."""
    state = checkpoint_filter_fn(load_checkpoint_file(path))
    own = model.state_dict()
    for key in [k for k in state if k.startswith('head.') and k in own and state[k].shape != own[k].shape]:
        logger.info(f'{path}: {key} {tuple(state[key].shape)} does not fit {tuple(own[key].shape)}; '
                    'the classifier is re-initialised for fine-tuning')
        state[key] = own[key]
    report = state_dict_mismatch(own, state)
    if report:
        raise CheckpointError(f'{path} does not fit this model (check MODEL.VARIANT and MODEL.FAT): {report}')
    model.load_state_dict(state)
    logger.info(f'loaded weights from {path}')


def deploy_form(config, model: nn.Module, logger) -> nn.Module:
    """``model`` (in eval mode) with its BatchNorms and depthwise residuals folded into the convs when
    REPARAM is set (same logits)."""
    if config.REPARAM:
        n_norms = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
        model.reparameterize()
        logger.info(f'deploy form: {n_norms} BatchNorms and the depthwise residuals folded into the convs')
    return model


def inference_model(config, model: nn.Module, device: torch.device, logger) -> nn.Module:
    """The model --eval and --throughput run: in eval mode, in deploy form with REPARAM, compiled with
    COMPILE (on CPU with inductor's weight freezing, PyTorch's CPU inference recipe: it prepacks the
    conv weights and fuses activations into them; safe here because the weights no longer change)."""
    model = deploy_form(config, model.eval(), logger)
    if not config.COMPILE:
        return model
    if device.type == 'cpu':
        import torch._inductor.config  # only here: its import takes most of a second
        torch._inductor.config.freezing = True
    return torch.compile(model)


# ImageNet-1k's training images: the epoch that --throughput estimates the time of.
IMAGENET_TRAIN_IMAGES = 1_281_167


def throughput(session: engine.Session) -> None:
    """Training, then inference, images per second with the run's settings (DATA.BATCH_SIZE,
    DATA.IMG_SIZE, TRAIN.ACCUMULATION_STEPS, AMP, COMPILE, CHANNELS_LAST) on synthetic batches, with
    no data folder: how long the run will take, before it starts."""
    task = Classification(session)
    task.build_loss(session.config.MODEL.NUM_CLASSES)
    model = engine.build_model(task)
    fresh = copy.deepcopy(model)  # for inference, untouched by the training steps; on the CPU until then
    train_throughput(task, engine.to_device(model, session))
    infer_throughput(task, engine.to_device(fresh, session))


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
    trainer = engine.Trainer(task, engine.TaskData([batch] * accumulation, [], {}, 'synthetic'), model)
    micro_batches = itertools.count()

    def optimizer_step() -> None:
        for _ in range(accumulation):
            trainer.train_step(next(micro_batches), batch)

    warmup, min_steps, min_seconds = (10, 10, 5.0) if device.type == 'cuda' else (2, 3, 3.0)
    for _ in range(warmup):
        optimizer_step()
    trained_before = trainer.progress.step
    steps, seconds = timed(optimizer_step, device, min_steps, min_seconds)
    images = (trainer.progress.step - trained_before) * batch_size  # the micro-batches the trainer stepped over
    rate = images / seconds
    peak = memory_used_mb(device) - resident_before
    precision = amp_dtype(config, device)
    settings = ', '.join([str(precision).split('.')[-1] if precision else 'fp32']
                         + ['compiled'] * config.COMPILE + ['channels_last'] * config.CHANNELS_LAST)
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


def export(session: engine.Session) -> None:
    """Write the model with MODEL.RESUME's weights (else fresh ones), in deploy form with REPARAM, to
    EXPORT (.onnx or .pt2), and check the file against PyTorch at DATA.IMG_SIZE and a non-square size."""
    config, logger = session.config, session.logger
    path = Path(config.EXPORT)
    check_destination(path)
    if session.world_size > 1:
        raise UserInputError('--export runs in one process; start it without torchrun')
    if config.MODEL.DWCONV_IMPL == 'cuda':
        logger.info('--export writes PyTorch depthwise convs: our kernels (MODEL.DWCONV_IMPL cuda) are never exported')
    task = Classification(session)
    model = engine.build_model(task)
    if config.MODEL.RESUME:
        engine.load_weights(model, task.weights(load_checkpoint_file(config.MODEL.RESUME)), config.MODEL.RESUME)
    else:
        logger.info('--export without --resume writes freshly initialised weights')
    export_model(deploy_form(config, model.eval(), logger), path, config.DATA.IMG_SIZE, logger)


def main(config) -> None:
    """The story of a run: join the processes and open the run folder, then measure throughput, or
    export the model, or evaluate a checkpoint, or train (resuming where the folder left off)."""
    session = engine.start(config)
    if config.THROUGHPUT_MODE:
        throughput(session)
        return
    if config.EXPORT:
        export(session)
        return
    engine.train_or_evaluate(Classification(session))


if __name__ == '__main__':
    run_entry_point(lambda: main(parse_command_line('FAT training and evaluation')))
