"""Train, evaluate or benchmark FAT on ImageNet-style data.

    torchrun --nproc_per_node 8 main.py --cfg configs/fat_b0_224.yaml --data-path /data/imagenet
    python main.py --cfg configs/fat_b0_224.yaml --data-path /data/imagenet --eval --resume ckpt.pth
    python main.py --cfg configs/fat_b0_224.yaml --throughput

Image classification is a task of the one run engine (``engine.py``): this file says how to build
its data, model, loss and metric; the engine trains, evaluates, checkpoints and resumes.
"""
from __future__ import annotations

import time
from typing import Dict

import torch
import torch.nn as nn
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

import engine
from config import parse_command_line
from data import build_loader, build_mixup
from models import build_model, checkpoint_filter_fn, count_macs
from utils import CheckpointError, all_reduce, autocast, load_checkpoint_file, run_entry_point, state_dict_mismatch


class Classification(engine.Task):
    """ImageFolder classification: timm augmentation and Mixup/CutMix, cross-entropy, top-1 / top-5."""

    primary_metric = 'acc1'

    def build_data(self) -> engine.TaskData:
        config = self.config
        dataset_train, dataset_val, loader_train, loader_val = build_loader(config)
        classes = dataset_train.classes
        if len(classes) != config.MODEL.NUM_CLASSES:
            self.logger.info(f'the data has {len(classes)} classes: MODEL.NUM_CLASSES {config.MODEL.NUM_CLASSES} '
                             f'-> {len(classes)}')
            config.defrost()
            config.MODEL.NUM_CLASSES = len(classes)
            config.freeze()
        self.mixup = build_mixup(config, len(classes))
        if self.mixup is not None:
            self.criterion = SoftTargetCrossEntropy()  # the labels are already mixed and smoothed
        elif config.MODEL.LABEL_SMOOTHING > 0:
            self.criterion = LabelSmoothingCrossEntropy(smoothing=config.MODEL.LABEL_SMOOTHING)
        else:
            self.criterion = nn.CrossEntropyLoss()
        return engine.TaskData(
            loader_train, loader_val, identity={'classes': list(classes), 'train_images': len(dataset_train)},
            description=f'{len(dataset_train)} training and {len(dataset_val)} validation images, {len(classes)} classes')

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


def inference_model(config, model: nn.Module, device: torch.device, logger) -> nn.Module:
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
def throughput(session: engine.Session) -> float:
    """Inference images per second at DATA.BATCH_SIZE and DATA.IMG_SIZE on random images, timed after
    warm-up."""
    config, device, logger = session.config, session.device, session.logger
    model = build_model(config)
    logger.info(f'{config.MODEL.NAME}: {sum(p.numel() for p in model.parameters()):,} parameters')
    log_macs(config, model, logger)
    model.to(device)
    if config.CHANNELS_LAST:
        model.to(memory_format=torch.channels_last)
    model = inference_model(config, model, device, logger)
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
    size = config.DATA.IMG_SIZE
    images = torch.randn(config.DATA.BATCH_SIZE, config.DATA.IN_CHANS, size, size, device=device)
    if config.CHANNELS_LAST:
        images = images.contiguous(memory_format=torch.channels_last)
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
    seconds = time.time() - start
    rate = iters * config.DATA.BATCH_SIZE / seconds
    logger.info(f'batch_size {config.DATA.BATCH_SIZE} image size {size}: {iters * config.DATA.BATCH_SIZE} images in '
                f'{seconds:.2f} s, throughput {rate:.1f} img/s')
    return rate


def main(config) -> None:
    """The story of a run: join the processes and open the run folder, then measure throughput, or
    evaluate a checkpoint, or train (resuming where the folder left off)."""
    session = engine.start(config)
    if config.THROUGHPUT_MODE:
        throughput(session)
        return
    engine.train_or_evaluate(Classification(session))


if __name__ == '__main__':
    run_entry_point(lambda: main(parse_command_line('FAT training and evaluation')))
