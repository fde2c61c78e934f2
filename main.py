"""Train, evaluate, benchmark or export FAT on ImageNet-style data.

    torchrun --nproc_per_node 8 main.py --cfg configs/fat_b0_224.yaml --data-path /data/imagenet
    python main.py --cfg configs/fat_b0_224.yaml --data-path /data/imagenet --eval --resume ckpt.pth
    python main.py --cfg configs/fat_b0_224.yaml --throughput
    python main.py --cfg configs/fat_b0_224.yaml --resume ckpt.pth --export fat_b0_in1k   # a timm/Hub folder

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
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from yacs.config import CfgNode

import engine
from config import parse_command_line, recipe_defaults
from data import build_loader, build_mixup, preprocessing
from engine.checkpoints import LAUNCH_KEYS, config_changes
from models import (build_model, check_architecture, checkpoint_filter_fn, choose_kernels, choose_run_kernels,
                    count_macs)
from models.distill import Teacher, TeacherLogits, build_teacher, distillation_loss
from models.export import check_destination, deployable, export as export_model
from models.hub import check_folder_destination, read_weights, write_folder
from utils import (all_reduce, amp_dtype, autocast, ConfigError, data_record, load_checkpoint_file, load_weights,
                   memory_used_mb, run_entry_point, UserInputError)


class Classification(engine.Task):
    """Image classification (ImageFolders or their shards): timm augmentation and Mixup/CutMix,
    cross-entropy (blended with a teacher's logits under DISTILL), top-1 / top-5."""

    primary_metric = 'acc1'
    identity_sections = ('MODEL.', 'DATA.', 'DISTILL.')
    # Folders and their shards hold the same samples in the same order (data/shards.py).
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
                                        channels_last=config.CHANNELS_LAST, entry=self.teacher_logits.model))
            if config.COMPILE:
                self.teacher_logits = torch.compile(self.teacher_logits)
        for line in filter(None, lines):
            self.logger.info(line)

    def _inputs(self, samples: torch.Tensor) -> torch.Tensor:
        samples = samples.to(self.device, non_blocking=True)
        return samples.contiguous(memory_format=torch.channels_last) if self.config.CHANNELS_LAST else samples

    def loss(self, model: nn.Module, batch):
        samples, targets = self._inputs(batch[0]), batch[1].to(self.device, non_blocking=True)
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


# ImageNet-1k's training images: the epoch that --throughput estimates the time of.
IMAGENET_TRAIN_IMAGES = 1_281_167


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
    session.logger.info(choose_run_kernels(session.config, fresh, (session.config.DATA.IMG_SIZE,) * 2))
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


def export(session: engine.Session) -> None:
    """Write the model with MODEL.RESUME's weights (else fresh ones), in deploy form with REPARAM, to
    EXPORT: a .onnx or .pt2 file checked against PyTorch at DATA.IMG_SIZE and a non-square size, or,
    for a path without a suffix, a Hugging Face Hub folder with a model card, checked by loading it
    back through timm."""
    config, logger = session.config, session.logger
    path = Path(config.EXPORT)
    to_folder = not path.suffix or config.EXPORT.endswith('/') or path.is_dir()
    check_folder_destination(path) if to_folder else check_destination(path)
    if session.world_size > 1:
        raise UserInputError('--export runs in one process; start it without torchrun')
    if config.MODEL.DWCONV_IMPL == 'cuda':
        logger.info('--export writes PyTorch depthwise convs: our kernels (MODEL.DWCONV_IMPL cuda) are never exported')
    task = Classification(session)
    engine.check_config(task)
    model = engine.build_model(task)
    checkpoint = load_checkpoint_file(config.MODEL.RESUME) if config.MODEL.RESUME else {}
    if checkpoint:
        engine.load_weights(model, task.weights(checkpoint), config.MODEL.RESUME)
    else:
        logger.info('--export without --resume writes freshly initialised weights')
    model = deploy_form(config, model.eval(), logger)
    if not to_folder:
        export_model(model, path, config.DATA.IMG_SIZE, logger)
        return
    classes = data_record(checkpoint).get('classes') or []
    difference = write_folder(deployable(model), path, preprocessing(config), classes,
                              {'dwconv_impl': 'auto', **({'reparameterized': True} if config.REPARAM else {})},
                              model_card(config, model, checkpoint, path.name), logger)
    logger.info(f'wrote {path}: model.safetensors, config.json ({len(classes) or "no"} class names), README.md; '
                f'timm.create_model("local-dir:{path}", pretrained=True) reproduces the model (max |logit '
                f'difference| {difference:.1e})')


# Keys whose values are local paths: a card names only the file (or folder) at their end.
_PATH_KEYS = ('DISTILL.TEACHER', 'DISTILL.TEACHER_WEIGHTS')


def _recipe(variant: str, run: CfgNode) -> List[str]:
    """The training keys in which ``run`` differs from ``variant``'s config, as 'KEY default -> run'."""
    recipe = []
    for change in config_changes(recipe_defaults(variant).dump(), run, LAUNCH_KEYS + Classification.launch_keys):
        key = change.split(' ', 1)[0]
        if not key.startswith(('MODEL.', 'DATA.', 'TRAIN.', 'AUG.', 'TEST.', 'DISTILL.', 'AMP_', 'SEED')) or \
                key in ('MODEL.NAME', 'MODEL.PRETRAINED'):
            continue
        if key in _PATH_KEYS:
            change = f'{key} {_without_folders(str(run.DISTILL[key.split(".")[1]]))!r}'
        recipe.append(change)
    return recipe


def _without_folders(value: str) -> str:
    """A local path (or local-dir: id) reduced to its last component; Hub ids and names as they are."""
    if value.startswith('hf-hub:') or '/' not in value:
        return value
    prefix = 'local-dir:' if value.startswith('local-dir:') else ''
    return prefix + value.rstrip('/').rsplit('/', 1)[-1]


def model_card(config, model: nn.Module, checkpoint: dict, name: str) -> str:
    """The README.md of an exported folder: the variant, size and cost, the data set, the recipe (the
    keys in which the run's config differs from its variant's), the final and best metrics, the date."""
    size = config.DATA.IMG_SIZE
    macs = count_macs(model, (config.DATA.IN_CHANS, size, size)) / 1e9
    record = data_record(checkpoint)
    run = CfgNode.load_cfg(checkpoint['config']) if isinstance(checkpoint.get('config'), str) else None
    recipe = _recipe(config.MODEL.VARIANT, run) if run is not None else None
    metrics = checkpoint.get('metrics') or {}
    form = preprocessing(config)
    lines: List[str] = [
        '---', 'library_name: timm', 'tags: [image-classification, timm, fat]', '---', '',
        f'# {name}', '',
        f'FAT ({config.MODEL.VARIANT}), the Fully Adaptive Transformer of "Lightweight Vision Transformer with '
        'Bidirectional Interaction" (NeurIPS 2023, arXiv:2306.00396), trained with the FAT training codebase.', '',
        '| | |', '|---|---|',
        f'| variant | {config.MODEL.VARIANT}' + ''.join(f', {k} {list(v)}' for k, v in config.MODEL.FAT.items() if v)
        + ' |',
        f'| parameters | {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M |',
        f'| GMACs | {macs:.3f} at {size} x {size} |',
        f'| input | {form["input_size"][0]} x {size} x {size}, mean {list(form["mean"])}, std {list(form["std"])}, '
        f'{form["interpolation"]} resize, crop_pct {form["crop_pct"]} |',
        f'| form | {"deploy: BatchNorms and depthwise residuals folded into the convs" if config.REPARAM else "training"} |',
        f'| data | {config.DATA.DATASET}'
        + (f': {record["train_images"]:,} training images, {len(record["classes"])} classes |' if record else
           f', {config.MODEL.NUM_CLASSES} classes (not recorded with these weights) |'),
        f'| exported | {datetime.date.today().isoformat()} |', '',
        '## Metrics', '',
    ]
    if metrics and run is not None:
        epoch, complete = checkpoint['epoch'], checkpoint['step'] >= checkpoint['steps_per_epoch']
        lines += [('' if complete else f'These weights were saved in the middle of epoch {epoch + 1} (a stop); ')
                  + f'evaluated after epoch {epoch + 1 if complete else epoch} of {run.TRAIN.EPOCHS}: top-1 '
                  f'{metrics["acc1"]:.2f}%, top-5 {metrics["acc5"]:.2f}% on {int(metrics["images"]):,} validation '
                  f'images; best top-1 of the run {checkpoint["best_metric"]:.2f}%.']
    else:
        lines += ['Not recorded: these weights came without an evaluation by this project.']
    lines += ['', '## Recipe', '']
    if recipe is None:
        lines += ['Not recorded.']
    else:
        lines += [f'The run\'s config differs from `configs/{config.MODEL.VARIANT}_224.yaml` (and the defaults of '
                  '`config.py`) in:' if recipe else f'`configs/{config.MODEL.VARIANT}_224.yaml`, unchanged.', '']
        lines += [f'- `{change}`' for change in recipe]
    lines += ['', '## Use', '', '```python', 'import models  # the FAT codebase\'s models package registers FAT with timm',
              'import timm', f"model = timm.create_model('local-dir:{name}', pretrained=True).eval()",
              'config = timm.data.resolve_data_config(model=model)',
              'transform = timm.data.create_transform(**config)', '```', '']
    return '\n'.join(lines)


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
