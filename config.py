"""yacs defaults for every run, and the merge of a yaml file, --opts and command-line flags.

Key names follow the Swin Transformer / FAT codebases so their users' habits carry over. Each
yaml may name `BASE: ['other.yaml']` files that it builds on.
"""
from __future__ import annotations

import argparse
import os
from typing import Optional

import yaml
from yacs.config import CfgNode as CN

_C = CN()
_C.BASE = ['']  # yaml files this one builds on, relative to it

# -----------------------------------------------------------------------------------------------
# Data
# -----------------------------------------------------------------------------------------------
_C.DATA = CN()
_C.DATA.BATCH_SIZE = 128  # images per GPU (per process) per step
_C.DATA.DATA_PATH = ''  # ImageFolder root holding train/ and val/
_C.DATA.DATASET = 'imagenet'  # 'imagenet' (any ImageFolder) or 'digits' (made from scikit-learn when DATA_PATH is empty)
_C.DATA.IMG_SIZE = 224  # training and test resolution
_C.DATA.IN_CHANS = 3  # image channels fed to the model
_C.DATA.INTERPOLATION = 'bicubic'  # resize interpolation: random, bilinear, bicubic
_C.DATA.PIN_MEMORY = True  # page-locked host memory for faster host-to-GPU copies
_C.DATA.NUM_WORKERS = 8  # data-loading worker processes per training process
_C.DATA.PREFETCH_FACTOR = 4  # batches each worker loads ahead
_C.DATA.SKIP_CORRUPT = False  # replace unreadable images by the next readable one (and count them) instead of stopping

# -----------------------------------------------------------------------------------------------
# Model
# -----------------------------------------------------------------------------------------------
_C.MODEL = CN()
_C.MODEL.TYPE = 'fat'  # model family built by models.build_model
_C.MODEL.NAME = 'fat_b0'  # run name: the output folder is OUTPUT/NAME/TAG
_C.MODEL.PRETRAINED = ''  # weights to fine-tune from (this project's, the authors' or a bare state dict)
_C.MODEL.RESUME = ''  # checkpoint to resume training from, or to evaluate with --eval
_C.MODEL.NUM_CLASSES = 1000  # classifier outputs; follows the data set's class folders when they differ
_C.MODEL.DROP_RATE = 0.0  # dropout before the classifier
_C.MODEL.DROP_PATH_RATE = 0.05  # stochastic depth, linear from 0 over all blocks
_C.MODEL.LABEL_SMOOTHING = 0.1  # label smoothing when Mixup/CutMix are off
_C.MODEL.DWCONV_IMPL = 'auto'  # depthwise convs: auto (our CUDA kernel where usable and faster), torch, cuda

_C.MODEL.FAT = CN()  # architecture (paper, Table 1); defaults are FAT-B0
_C.MODEL.FAT.EMBED_DIMS = [32, 80, 160, 256]  # width of each stage
_C.MODEL.FAT.DEPTHS = [2, 2, 6, 2]  # blocks per stage
_C.MODEL.FAT.NUM_HEADS = [2, 5, 10, 16]  # attention heads per stage
_C.MODEL.FAT.KERNEL_SIZES = [3, 5, 7, 9]  # kernel of the positional encoding and FASA's local branch
_C.MODEL.FAT.WINDOW_SIZES = [8, 4, 2, 1]  # pooling factor of FASA's keys/values (1 = none)
_C.MODEL.FAT.MLP_KERNEL_SIZES = [5, 5, 5, 5]  # depthwise kernel inside the ConvFFN
_C.MODEL.FAT.MLP_RATIOS = [4, 4, 4, 4]  # ConvFFN expansion

_C.MODEL.EMA = CN()
_C.MODEL.EMA.ENABLE = False  # keep an exponential moving average of the weights (validated too)
_C.MODEL.EMA.DECAY = 0.9998  # EMA decay per step

# -----------------------------------------------------------------------------------------------
# Training
# -----------------------------------------------------------------------------------------------
_C.TRAIN = CN()
_C.TRAIN.START_EPOCH = 0  # first epoch (set by resume)
_C.TRAIN.EPOCHS = 300  # total epochs
_C.TRAIN.WARMUP_EPOCHS = 20  # linear warm-up epochs
_C.TRAIN.WARMUP_STEPS = 0  # linear warm-up in optimizer steps instead, when > 0 (detection's 500 iterations)
_C.TRAIN.WEIGHT_DECAY = 0.05  # AdamW weight decay (not on norms, biases, no_weight_decay())
_C.TRAIN.BASE_LR = 5e-4  # peak LR for a total batch of LR_BASE_BATCH, scaled linearly with the real one
_C.TRAIN.WARMUP_LR = 5e-7  # LR at the start of warm-up (scaled likewise)
_C.TRAIN.MIN_LR = 5e-6  # LR at the end of the cosine (scaled likewise)
_C.TRAIN.LR_BASE_BATCH = 512  # total batch the three LRs above are given for
_C.TRAIN.CLIP_GRAD = 5.0  # gradient norm clipping; 0 disables
_C.TRAIN.AUTO_RESUME = True  # resume from the newest checkpoint in the output folder
_C.TRAIN.ACCUMULATION_STEPS = 1  # micro-batches per optimizer step
_C.TRAIN.USE_CHECKPOINT = False  # activation (gradient) checkpointing to save memory
_C.TRAIN.MAX_NONFINITE_STEPS = 0  # optimizer steps with a non-finite loss or gradient to skip before stopping

_C.TRAIN.LR_SCHEDULER = CN()
_C.TRAIN.LR_SCHEDULER.NAME = 'cosine'  # cosine, linear, poly, step or multistep; updated every step
_C.TRAIN.LR_SCHEDULER.WARMUP_PREFIX = True  # cosine starts after warm-up rather than under it
_C.TRAIN.LR_SCHEDULER.DECAY_EPOCHS = 30  # step: epochs between decays
_C.TRAIN.LR_SCHEDULER.DECAY_RATE = 0.1  # step, multistep: LR factor at each decay
_C.TRAIN.LR_SCHEDULER.MILESTONES = [8, 11]  # multistep: epochs after which the LR decays (1x detection schedule)
_C.TRAIN.LR_SCHEDULER.POWER = 0.9  # poly: exponent of the decay (segmentation's schedule)

_C.TRAIN.OPTIMIZER = CN()
_C.TRAIN.OPTIMIZER.NAME = 'adamw'  # adamw or sgd
_C.TRAIN.OPTIMIZER.EPS = 1e-8  # AdamW epsilon
_C.TRAIN.OPTIMIZER.BETAS = (0.9, 0.999)  # AdamW betas
_C.TRAIN.OPTIMIZER.MOMENTUM = 0.9  # SGD momentum

# -----------------------------------------------------------------------------------------------
# Augmentation (timm)
# -----------------------------------------------------------------------------------------------
_C.AUG = CN()
_C.AUG.COLOR_JITTER = 0.4  # colour jitter strength; 0 disables
_C.AUG.AUTO_AUGMENT = 'rand-m9-mstd0.5-inc1'  # RandAugment policy; 'none' disables
_C.AUG.REPROB = 0.25  # random erasing probability
_C.AUG.REMODE = 'pixel'  # random erasing fill
_C.AUG.RECOUNT = 1  # random erasing count
_C.AUG.SCALE = (0.08, 1.0)  # RandomResizedCrop area range
_C.AUG.HFLIP = 0.5  # horizontal flip probability
_C.AUG.MIXUP = 0.8  # Mixup alpha; 0 disables
_C.AUG.CUTMIX = 1.0  # CutMix alpha; 0 disables
_C.AUG.CUTMIX_MINMAX = None  # CutMix box ratio range (overrides alpha when set)
_C.AUG.MIXUP_PROB = 1.0  # probability of applying Mixup or CutMix to a batch
_C.AUG.MIXUP_SWITCH_PROB = 0.5  # probability of CutMix rather than Mixup when both are on
_C.AUG.MIXUP_MODE = 'batch'  # batch, pair or elem

# -----------------------------------------------------------------------------------------------
# Testing
# -----------------------------------------------------------------------------------------------
_C.TEST = CN()
_C.TEST.CROP = True  # resize to IMG_SIZE / CROP_PCT, then centre-crop; else resize to IMG_SIZE
_C.TEST.CROP_PCT = 0.875  # centre-crop ratio (224 / 256)

# -----------------------------------------------------------------------------------------------
# Run
# -----------------------------------------------------------------------------------------------
_C.DEVICE = ''  # cuda or cpu; empty picks cuda when available
_C.AMP_ENABLE = True  # mixed precision with torch.amp on CUDA (AMP_DTYPE); on CPU only with AMP_CPU
_C.AMP_DTYPE = 'bf16'  # CUDA autocast type: bf16 (no loss scaling) or fp16 (with GradScaler)
_C.AMP_CPU = False  # with AMP_ENABLE, bf16 autocast on CPU too (off: slower than fp32 for FAT on the CPUs measured)
_C.COMPILE = False  # torch.compile the model (--eval / --throughput on CPU: with inductor's weight freezing)
_C.REPARAM = False  # --eval / --throughput run the deploy form: BatchNorms folded into convs (same logits)
_C.CHANNELS_LAST = False  # channels_last memory format for model and inputs
_C.OUTPUT = 'output'  # root of run folders: OUTPUT/MODEL.NAME/TAG
_C.TAG = 'default'  # run tag
_C.SAVE_FREQ = 1  # keep a ckpt_epoch_N.pth every SAVE_FREQ epochs (ckpt_last.pth is always written)
_C.PRINT_FREQ = 10  # steps between log lines
_C.SEED = 0  # random seed (offset by rank)
_C.EVAL_MODE = False  # only validate MODEL.RESUME
_C.THROUGHPUT_MODE = False  # only measure inference throughput

# Keys that take one of a few words; checked after every merge so a typo is named before any work.
_CHOICES = {
    'DEVICE': ('', 'cuda', 'cpu'),
    'AMP_DTYPE': ('bf16', 'fp16'),
    'DATA.DATASET': ('imagenet', 'digits'),
    'DATA.INTERPOLATION': ('random', 'nearest', 'bilinear', 'bicubic', 'box', 'hamming', 'lanczos'),
    'TRAIN.OPTIMIZER.NAME': ('adamw', 'sgd'),
    'TRAIN.LR_SCHEDULER.NAME': ('cosine', 'linear', 'poly', 'step', 'multistep'),
    'AUG.MIXUP_MODE': ('batch', 'pair', 'elem'),
}


class ConfigError(Exception):
    """A config file, key or value the user gave is wrong: reported as one line."""


def _load_yaml(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f'config file not found: {path}')
    with open(path) as f:
        try:
            return yaml.safe_load(f) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f'{path} is not valid YAML: {error}') from error


def _update_config_from_file(config: CN, cfg_file: str, choices: dict) -> None:
    """Merge ``cfg_file`` into ``config``, its BASE files first."""
    for base in _load_yaml(cfg_file).get('BASE', ['']):
        if base:
            _update_config_from_file(config, os.path.join(os.path.dirname(cfg_file), base), choices)
    config.defrost()
    try:
        config.merge_from_file(cfg_file)
    except (KeyError, ValueError, AssertionError) as error:
        raise ConfigError(f'{cfg_file}: {_yacs_message(error)}') from error
    _check_choices(config, cfg_file, choices)
    config.freeze()


def _yacs_message(error: Exception) -> str:
    message = error.args[0] if error.args else str(error)
    if 'Non-existent' in message:
        return f'{message} (a misspelt key? every key is listed with its meaning in config.py)'
    return message


def _check_choices(config: CN, source: str, choices: dict) -> None:
    for key, allowed in choices.items():
        value = config
        for part in key.split('.'):
            value = value[part]
        if value not in allowed:
            raise ConfigError(f'{source}: {key} is {value!r}; choose one of {", ".join(map(repr, allowed))}')


def update_config(config: CN, args: argparse.Namespace, choices: Optional[dict] = None) -> None:
    """Apply the yaml file, then --opts, then the explicit command-line flags; ``choices`` maps keys
    that take one of a few words to those words (default: the classification keys')."""
    choices = _CHOICES if choices is None else choices
    if args.cfg:
        _update_config_from_file(config, args.cfg, choices)
    config.defrost()
    if args.opts:
        if len(args.opts) % 2:
            raise ConfigError(f'--opts takes KEY VALUE pairs; got an odd number of items: {" ".join(args.opts)}')
        try:
            config.merge_from_list(args.opts)
        except (KeyError, ValueError, AssertionError) as error:
            raise ConfigError(f'--opts: {_yacs_message(error)}') from error
    flags = {
        'batch_size': 'DATA.BATCH_SIZE', 'data_path': 'DATA.DATA_PATH', 'pretrained': 'MODEL.PRETRAINED',
        'resume': 'MODEL.RESUME', 'accumulation_steps': 'TRAIN.ACCUMULATION_STEPS', 'output': 'OUTPUT',
        'tag': 'TAG', 'device': 'DEVICE', 'amp_dtype': 'AMP_DTYPE', 'seed': 'SEED',
    }
    for arg, key in flags.items():
        value = getattr(args, arg, None)
        if value is not None:
            config.merge_from_list([key, value])
    switches = {'use_checkpoint': ('TRAIN.USE_CHECKPOINT', True), 'disable_amp': ('AMP_ENABLE', False),
                'eval': ('EVAL_MODE', True), 'throughput': ('THROUGHPUT_MODE', True),
                'compile': ('COMPILE', True), 'channels_last': ('CHANNELS_LAST', True), 'reparam': ('REPARAM', True)}
    for arg, (key, value) in switches.items():
        if getattr(args, arg, False):
            config.merge_from_list([key, value])
    _check_choices(config, '--opts', choices)
    if config.REPARAM and not (config.EVAL_MODE or config.THROUGHPUT_MODE):
        raise ConfigError('REPARAM (--reparam) folds the BatchNorms for --eval or --throughput; '
                          'a training run cannot use it')
    config.freeze()


def default_config() -> CN:
    """A mutable copy of the defaults, for entry points that extend them (detection/, segmentation/)."""
    config = _C.clone()
    config.defrost()
    return config


def key_choices() -> dict:
    """The keys of the defaults that take one of a few words, and those words."""
    return dict(_CHOICES)


def get_config(args: Optional[argparse.Namespace] = None) -> CN:
    """The defaults merged with ``args`` (yaml, --opts, flags); a frozen copy."""
    config = _C.clone()
    if args is not None:
        update_config(config, args)
    return config


def output_dir(config: CN) -> str:
    """The run folder: OUTPUT/MODEL.NAME/TAG."""
    return os.path.join(config.OUTPUT, config.MODEL.NAME, config.TAG)


def scaled_lrs(config: CN, world_size: int) -> tuple:
    """(base, warm-up, min) LR scaled linearly from LR_BASE_BATCH to the real total batch
    (per-process batch x processes x accumulation steps)."""
    total_batch = config.DATA.BATCH_SIZE * world_size * config.TRAIN.get('ACCUMULATION_STEPS', 1)
    factor = total_batch / config.TRAIN.LR_BASE_BATCH
    return config.TRAIN.BASE_LR * factor, config.TRAIN.WARMUP_LR * factor, config.TRAIN.MIN_LR * factor
