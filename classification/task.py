"""Image classification as a task of the run engine: its data, model, loss and metric
(``Classification``), and the forms of the model that --eval, --throughput and --export run."""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch
import torch.nn as nn
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

import engine
from models import (build_model, check_architecture, checkpoint_filter_fn, choose_kernels, choose_run_kernels,
                    count_macs, kernel_decisions)
from models.hub import read_weights
from utils import ConfigError, all_reduce, amp_dtype, load_weights

from .data import build_loader, build_mixup, preprocessing
from .distill import Teacher, TeacherLogits, build_teacher, distillation_loss


class Classification(engine.Task):
    """Image classification (ImageFolders or their shards): timm augmentation and Mixup/CutMix,
    cross-entropy (blended with a teacher's logits under DISTILL), top-1 / top-5."""

    primary_metric = 'acc1'
    identity_sections = ('MODEL.', 'DATA.', 'DISTILL.')
    # Folders and their shards hold the same samples in the same order (data/shards/).
    launch_keys = ('THROUGHPUT_MODE', 'DATA.FORMAT', 'DATA.SHARD_CACHE', 'DATA.FETCH_RETRIES', 'DATA.FETCH_TIMEOUT')

    def __init__(self, session: engine.Session):
        super().__init__(session)
        self.teacher: Optional[Teacher] = None  # DISTILL.TEACHER, when training with distillation
        self.teacher_logits: Optional[nn.Module] = None  # it, on the device, run on the student's batches

    def check_config(self) -> None:
        check_architecture(self.config)

    def build_data(self) -> engine.TaskData:
        config = self.config
        self.build_teacher()
        # A teacher of other classes is refused as soon as the data's classes are known, before the data is scanned.
        data = build_loader(config, self.check_teacher if self.teacher is not None else None)
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

    def build_teacher(self) -> None:
        """With DISTILL.TYPE soft or hard (and not --eval): the teacher, checked against the student's
        input channels and resolution, on the run's device and memory format."""
        config, logger = self.config, self.logger
        if config.DISTILL.TYPE == 'none' or config.EVAL_MODE:
            return
        teacher = build_teacher(config.DISTILL.TEACHER, config.DISTILL.TEACHER_WEIGHTS)
        form = preprocessing(config)
        channels, size = form['input_size'][0], form['input_size'][1:]
        if teacher.input_size[0] != channels or (teacher.fixed_input_size and teacher.input_size[1:] != size):
            raise ConfigError(f'DISTILL.TEACHER {teacher.name} takes {teacher.input_size[0]}-channel images'
                              + (f' of exactly {teacher.input_size[1]}x{teacher.input_size[2]}'
                                 if teacher.fixed_input_size else '')
                              + f'; the student\'s are {channels}-channel at DATA.IMG_SIZE {size[0]}')
        module = TeacherLogits(teacher, form['mean'], form['std']).to(self.device)
        if config.CHANNELS_LAST:
            module.to(memory_format=torch.channels_last)
        self.teacher, self.teacher_logits = teacher, module  # compiled with COMPILE in on_device
        logger.info(f'distillation: {config.DISTILL.TYPE}, ALPHA {config.DISTILL.ALPHA}, TAU {config.DISTILL.TAU}, '
                    f'from {teacher.name} ({sum(p.numel() for p in teacher.model.parameters()):,} parameters, '
                    f'{teacher.num_classes} classes, trained at {teacher.input_size[1]}px'
                    + (f', shown the batches at {size[0]}px' if teacher.input_size[1:] != size else '')
                    + ('; the batches are renormalised to its mean and std' if module.renormalise else '')
                    + f'; weights sha256 {teacher.fingerprint[:12]})')

    def check_teacher(self, classes: Sequence[str]) -> None:
        """The teacher scores the data's classes: as many, and the same names in the same order when
        it records them."""
        teacher = self.teacher
        if teacher.num_classes != len(classes):
            raise ConfigError(f'DISTILL.TEACHER {teacher.name} has {teacher.num_classes} classes and the data '
                              f'{len(classes)}: a teacher must score the data set\'s classes')
        if teacher.label_names is not None and list(teacher.label_names) != list(classes):
            raise ConfigError(f'DISTILL.TEACHER {teacher.name} knows other classes than the data: '
                              f'{", ".join(map(str, teacher.label_names[:3]))} ... where the data has '
                              f'{", ".join(classes[:3])} ...')

    def identity(self) -> dict:
        return {'teacher': self.teacher.identity} if self.teacher is not None else {}

    def build_model(self) -> nn.Module:
        config = self.config
        model = build_model(config)
        log_macs(config, model, self.logger)
        if config.TRAIN.USE_CHECKPOINT:
            model.set_grad_checkpointing(True)
        if config.MODEL.PRETRAINED:
            load_pretrained(model, config.MODEL.PRETRAINED, self.logger)
        return model

    def on_device(self, model: nn.Module) -> None:
        """The kernels of ``model`` and of the teacher (which is then compiled with COMPILE)."""
        config = self.config
        size = (config.DATA.IMG_SIZE,) * 2
        lines = [choose_run_kernels(config, model, size)]
        if self.teacher_logits is not None:
            lines.append(choose_kernels(self.teacher_logits, (config.DATA.IN_CHANS, *size), config.DATA.BATCH_SIZE,
                                        training=False, dtype=amp_dtype(config, self.device),
                                        channels_last=config.CHANNELS_LAST, entry=self.teacher_logits.model,
                                        decisions=kernel_decisions(config)))
            if config.COMPILE:
                self.teacher_logits = torch.compile(self.teacher_logits)
        for line in filter(None, lines):
            self.logger.info(line)

    def loss(self, model: nn.Module, batch):
        samples, targets = self.images_to_device(batch[0]), batch[1].to(self.device, non_blocking=True)
        if self.mixup is not None:
            samples, targets = self.mixup(samples, targets)
        output = model(samples)
        loss = self.criterion(output, targets)
        if self.teacher_logits is None:
            return loss, {}
        distill = distillation_loss(output, self.teacher_logits(samples), self.config.DISTILL.TYPE,
                                    self.config.DISTILL.TAU)
        alpha = self.config.DISTILL.ALPHA
        return (1 - alpha) * loss + alpha * distill, {'loss_cls': loss.detach(), 'loss_distill': distill.detach()}

    def evaluate(self, model: nn.Module, loader) -> Dict[str, float]:
        """Top-1, top-5 (percent), mean loss and the number of images, exact over all processes."""
        criterion = nn.CrossEntropyLoss(reduction='sum')
        totals = torch.zeros(4, dtype=torch.float64, device=self.device)  # loss sum, top-1 hits, top-5 hits, images
        for samples, targets in loader:
            samples, targets = self.images_to_device(samples), targets.to(self.device, non_blocking=True)
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
    """Start from the weights of ``path`` (this project's, the authors', a bare state dict, or a
    ``local-dir:``/``hf-hub:`` folder); a classifier of another class count is re-initialised for
    fine-tuning."""
    state = read_weights(path)
    own = model.state_dict()
    for key in [k for k in state if k.startswith('head.') and k in own and state[k].shape != own[k].shape]:
        logger.info(f'{path}: {key} {tuple(state[key].shape)} does not fit {tuple(own[key].shape)}; '
                    'the classifier is re-initialised for fine-tuning')
        state[key] = own[key]
    load_weights(model, state, path, 'this model (check MODEL.VARIANT and MODEL.FAT)')
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
