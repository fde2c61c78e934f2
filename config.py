"""yacs defaults for every run, and the command line: a yaml file, --opts and flags merged into them.

Key names follow the Swin Transformer / FAT codebases so their users' habits carry over. A yaml may
name ``BASE: ['other.yaml']`` files that it builds on, relative to itself. Only yaml is read: yacs
would execute a ``.py`` config, so those are refused.
"""
from __future__ import annotations

import argparse
import os
import re
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import yaml
from yacs.config import CfgNode as CN

from utils import ConfigError

_C = CN()
_C.BASE = ['']  # yaml files this one builds on, relative to it

# -----------------------------------------------------------------------------------------------
# Data
# -----------------------------------------------------------------------------------------------
_C.DATA = CN()
_C.DATA.BATCH_SIZE = 128  # images per GPU (per process) per step
_C.DATA.DATA_PATH = ''  # data root: an ImageFolder root (train/ and val/) or shards (index.json); a path or URL
_C.DATA.IN_CHANS = 3  # image channels fed to the model
_C.DATA.PIN_MEMORY = True  # page-locked host memory for faster host-to-GPU copies (CUDA runs only)
_C.DATA.NUM_WORKERS = 8  # data-loading worker processes per training process
_C.DATA.PREFETCH_FACTOR = 4  # batches each worker loads ahead

# -----------------------------------------------------------------------------------------------
# Model
# -----------------------------------------------------------------------------------------------
_C.MODEL = CN()
_C.MODEL.VARIANT = 'fat_b0'  # the registered architecture: fat_b0, fat_b1, fat_b2 or fat_b3 (models/fat.py)
_C.MODEL.NAME = 'fat_b0'  # run name: the output folder is OUTPUT/NAME/TAG
_C.MODEL.PRETRAINED = ''  # weights to fine-tune from (this project's, the authors' or a bare state dict)
_C.MODEL.RESUME = ''  # checkpoint to resume training from, or to evaluate with --eval
_C.MODEL.NUM_CLASSES = 1000  # classifier outputs; follows the data set's class folders when they differ
_C.MODEL.DROP_PATH_RATE = 0.05  # stochastic depth, linear from 0 over all blocks
_C.MODEL.DWCONV_IMPL = 'auto'  # depthwise convs: auto (our kernels where usable and faster), torch, cuda

_C.MODEL.FAT = CN()  # overrides of the variant's architecture; an empty list keeps the variant's value
_C.MODEL.FAT.EMBED_DIMS = []  # width of each stage
_C.MODEL.FAT.DEPTHS = []  # blocks per stage
_C.MODEL.FAT.NUM_HEADS = []  # attention heads per stage
_C.MODEL.FAT.KERNEL_SIZES = []  # kernel of the positional encoding and FASA's local branch
_C.MODEL.FAT.WINDOW_SIZES = []  # pooling factor of FASA's keys/values (1 = none)
_C.MODEL.FAT.MLP_KERNEL_SIZES = []  # depthwise kernel inside the ConvFFN
_C.MODEL.FAT.MLP_RATIOS = []  # ConvFFN expansion

_C.MODEL.EMA = CN()
_C.MODEL.EMA.ENABLE = False  # keep an exponential moving average of the weights (evaluated too)
_C.MODEL.EMA.DECAY = 0.9998  # EMA decay per optimizer step

# -----------------------------------------------------------------------------------------------
# Training
# -----------------------------------------------------------------------------------------------
_C.TRAIN = CN()
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
_C.TRAIN.LR_SCHEDULER.NAME = 'cosine'  # cosine, linear, poly, step or multistep; updated every optimizer step
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
# Run
# -----------------------------------------------------------------------------------------------
_C.DEVICE = ''  # cuda or cpu; empty picks cuda when available
_C.AMP_ENABLE = True  # mixed precision with torch.amp on CUDA (AMP_DTYPE); on CPU only with AMP_CPU
_C.AMP_DTYPE = 'bf16'  # CUDA autocast type: bf16 (no loss scaling) or fp16 (with GradScaler)
_C.AMP_CPU = False  # with AMP_ENABLE, bf16 autocast on CPU too (off: slower than fp32 for FAT on the CPUs measured)
_C.COMPILE = False  # torch.compile the model (--eval and --throughput's inference on CPU: with inductor's freezing)
_C.CHANNELS_LAST = False  # channels_last memory format for model and inputs
_C.OUTPUT = 'output'  # root of run folders: OUTPUT/MODEL.NAME/TAG
_C.TAG = 'default'  # run tag
_C.SAVE_FREQ = 1  # write a ckpt_epoch_N.pth every SAVE_FREQ epochs (ckpt_last.pth is always written)
_C.SAVE_KEEP = 3  # keep the newest SAVE_KEEP ckpt_epoch_N.pth (0 keeps all); ckpt_last / ckpt_best always stay
_C.PRINT_FREQ = 10  # micro-batches between log lines
_C.SEED = 0  # random seed (offset by rank)
_C.DIST_TIMEOUT = 30.0  # minutes a collective waits for the slowest process before the run fails (process group)
_C.EVAL_MODE = False  # only evaluate MODEL.RESUME


# Keys that take one of a few words; checked after every merge so a typo is named before any work. A
# task adds its own (``update_config``'s ``choices``).
_CHOICES = {
    'DEVICE': ('', 'cuda', 'cpu'),
    'AMP_DTYPE': ('bf16', 'fp16'),
    'MODEL.DWCONV_IMPL': ('auto', 'torch', 'cuda'),
    'TRAIN.OPTIMIZER.NAME': ('adamw', 'sgd'),
    'TRAIN.LR_SCHEDULER.NAME': ('cosine', 'linear', 'poly', 'step', 'multistep'),
}
# Integer keys with a lower bound (where the config has them).
_MINIMA = {'DATA.BATCH_SIZE': 1, 'TRAIN.ACCUMULATION_STEPS': 1, 'PRINT_FREQ': 1, 'SAVE_FREQ': 0, 'SAVE_KEEP': 0,
           'TRAIN.EPOCHS': 1, 'TRAIN.MAX_NONFINITE_STEPS': 0, 'DATA.FETCH_RETRIES': 0, 'DATA.FETCH_TIMEOUT': 1,
           'DIST_TIMEOUT': 0.01}

# Command-line flags: flag -> (config key, value set by the switch or None when the flag takes one, help).
_FLAGS: Dict[str, Tuple[str, object, str]] = {
    '--batch-size': ('DATA.BATCH_SIZE', None, 'images per process per step'),
    '--data-path': ('DATA.DATA_PATH', None, 'data root (train/ and val/ for classification, or their shards: '
                                            'a folder, URL or pipe:)'),
    '--pretrained': ('MODEL.PRETRAINED', None, 'weights to start from (the classifier is re-initialised)'),
    '--resume': ('MODEL.RESUME', None, 'checkpoint to resume, or to evaluate with --eval'),
    '--accumulation-steps': ('TRAIN.ACCUMULATION_STEPS', None, 'micro-batches per optimizer step'),
    '--use-checkpoint': ('TRAIN.USE_CHECKPOINT', True, 'activation checkpointing'),
    '--disable-amp': ('AMP_ENABLE', False, 'run in fp32 on CUDA too'),
    '--amp-dtype': ('AMP_DTYPE', None, 'mixed-precision type on CUDA: bf16 or fp16'),
    '--output': ('OUTPUT', None, 'root of run folders'),
    '--tag': ('TAG', None, 'run tag (a separate run folder)'),
    '--eval': ('EVAL_MODE', True, 'only evaluate --resume'),
    '--throughput': ('THROUGHPUT_MODE', True, 'only measure training and inference img/s (no data needed)'),
    '--device': ('DEVICE', None, 'cuda or cpu (default: cuda when available)'),
    '--compile': ('COMPILE', True, 'torch.compile the model'),
    '--channels-last': ('CHANNELS_LAST', True, 'channels_last model and inputs'),
    '--reparam': ('REPARAM', True, '--eval, --export, --throughput\'s inference: fold BatchNorms into convs '
                  '(same logits)'),
    '--export': ('EXPORT', None, 'write the model (weights of --resume) to this .onnx or .pt2 file, or to this folder '
                 'in the Hugging Face Hub form timm loads, and check it'),
    '--seed': ('SEED', None, 'random seed'),
}


def base_config() -> CN:
    """A mutable copy of the keys every run has (the engine's: data loading, the model, training, the
    run), for a task to add its own to."""
    config = _C.clone()
    config.defrost()
    return config


def dense_defaults() -> CN:
    """The base keys plus the backbone's freezing, for detection and segmentation to add theirs to."""
    config = base_config()
    config.MODEL.BACKBONE = CN()
    config.MODEL.BACKBONE.FROZEN_STAGES = -1  # -1 trains all; 0 freezes the stem; k freezes the stem and stages 0..k-1
    config.MODEL.BACKBONE.FREEZE_BN = False  # freeze every backbone BatchNorm (statistics and affine)
    return config


def _lookup(config: CN, key: str):
    node = config
    for part in key.split('.'):
        if not isinstance(node, CN) or part not in node:
            return None
        node = node[part]
    return node


def _widen_ints(config: CN, data: dict, prefix: str = '') -> dict:
    """``data`` (a yaml mapping) with whole numbers given for float keys as floats (``BASE_LR: 1``,
    ``DIST_TIMEOUT: 60``): yacs would refuse them as a type mismatch."""
    widened = {}
    for key, value in data.items():
        full = f'{prefix}{key}'
        if isinstance(value, dict):
            value = _widen_ints(config, value, f'{full}.')
        elif isinstance(value, int) and not isinstance(value, bool) and isinstance(_lookup(config, full), float):
            value = float(value)
        widened[key] = value
    return widened


def _widen_int_opts(config: CN, opts: Sequence[str]) -> List[str]:
    """--opts KEY VALUE pairs with a whole number given for a float key written as a float."""
    pairs = list(opts)
    for i in range(0, len(pairs) - 1, 2):
        if isinstance(_lookup(config, pairs[i]), float) and re.fullmatch(r'\s*[+-]?\d+\s*', str(pairs[i + 1])):
            pairs[i + 1] = str(float(pairs[i + 1]))
    return pairs


def _has(config: CN, key: str) -> bool:
    return _lookup(config, key) is not None


def _load_yaml(path: str) -> dict:
    if not path.endswith(('.yaml', '.yml')):
        raise ConfigError(f'{path}: configs are yaml files (.yaml or .yml); other files are not read')
    if not os.path.isfile(path):
        raise ConfigError(f'config file not found: {path}')
    with open(path) as f:
        try:
            data = yaml.safe_load(f) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f'{path} is not valid YAML: {error}') from error
    if not isinstance(data, dict):
        raise ConfigError(f'{path} must hold a mapping of config keys, not {type(data).__name__}')
    return data


def _merge_file(config: CN, path: str, choices: dict, including: Tuple[str, ...] = ()) -> None:
    """Merge the yaml ``path`` into ``config``, its BASE files (relative to it) first."""
    real = os.path.realpath(path)
    if real in including:
        raise ConfigError(f'{path}: BASE files include each other in a cycle')
    data = _load_yaml(path)
    bases = data.get('BASE', [''])
    if not isinstance(bases, list) or not all(isinstance(base, str) for base in bases):
        raise ConfigError(f"{path}: BASE is {bases!r}; it must be a list of yaml files, e.g. BASE: ['base.yaml']")
    for base in bases:
        if base:
            _merge_file(config, os.path.join(os.path.dirname(path), base), choices, including + (real,))
    config.defrost()
    try:
        config.merge_from_other_cfg(CN(_widen_ints(config, data)))
    except (KeyError, ValueError, AssertionError) as error:
        raise ConfigError(f'{path}: {_yacs_message(error)}') from error
    _check(config, path, choices)


def _yacs_message(error: Exception) -> str:
    message = error.args[0] if error.args else str(error)
    if 'Non-existent' in message:
        return (f'{message} (a misspelt key? every key is listed with its meaning in config.py and in the '
                'task\'s config section: classification/config.py, detection/ or segmentation/train.py)')
    return message


def _check(config: CN, source: str, choices: dict) -> None:
    for key, allowed in choices.items():
        value = _lookup(config, key)
        if value is not None and value not in allowed:
            raise ConfigError(f'{source}: {key} is {value!r}; choose one of {", ".join(map(repr, allowed))}')
    for key, minimum in _MINIMA.items():
        value = _lookup(config, key)
        if value is not None and value < minimum:
            raise ConfigError(f'{source}: {key} is {value}; it must be at least {minimum}')
    for key in ('MODEL.NAME', 'TAG'):
        value = _lookup(config, key)
        if not value or value in ('.', '..') or '/' in value or '\\' in value or not value.isprintable():
            raise ConfigError(f'{source}: {key} is {value!r}; it names a folder inside OUTPUT, so it must be a '
                              'plain name (printable, no "/", not "." or "..")')


def merge_file(config: CN, path: str, choices: Optional[dict] = None) -> None:
    """Merge the yaml ``path`` (its BASE files first) into ``config``; ``choices`` as for ``update_config``."""
    _merge_file(config, path, {**_CHOICES, **(choices or {})})


def update_config(config: CN, args: argparse.Namespace, choices: Optional[dict] = None,
                  check: Optional[Callable[[CN], None]] = None) -> None:
    """Apply the yaml file, then --opts, then the command-line flags; ``choices`` adds one-of-a-few-words
    keys of the task to the project's, and ``check(config)`` the task's own checks (ConfigError)."""
    choices = {**_CHOICES, **(choices or {})}
    if getattr(args, 'cfg', None):
        _merge_file(config, args.cfg, choices)
    config.defrost()
    opts = getattr(args, 'opts', None)
    if opts:
        if len(opts) % 2:
            raise ConfigError(f'--opts takes KEY VALUE pairs; got an odd number of items: {" ".join(opts)}')
        try:
            config.merge_from_list(_widen_int_opts(config, opts))
        except (KeyError, ValueError, AssertionError) as error:
            raise ConfigError(f'--opts: {_yacs_message(error)}') from error
    for flag, (key, switch_value, _) in _FLAGS.items():
        value = getattr(args, flag[2:].replace('-', '_'), None)
        if value is None or value is False:
            continue
        try:
            config.merge_from_list([key, switch_value if switch_value is not None else value])
        except (KeyError, ValueError, AssertionError) as error:
            raise ConfigError(f'{flag}: {_yacs_message(error)}') from error
    _check(config, 'command line', choices)
    if check is not None:
        check(config)
    config.freeze()


def parse_command_line(description: str, defaults: CN, choices: Optional[dict] = None,
                       check: Optional[Callable[[CN], None]] = None, argv: Optional[Sequence[str]] = None) -> CN:
    """The one command line of every entry point: ``--cfg``, ``--opts`` and the flags whose keys
    ``defaults`` has, merged into a frozen copy of ``defaults`` (and ``choices`` checked)."""
    config = defaults.clone()
    parser = argparse.ArgumentParser(description)
    parser.add_argument('--cfg', type=str, metavar='FILE', help='config yaml')
    parser.add_argument('--opts', nargs='+', default=None, help='override config keys: KEY VALUE ...')
    for flag, (key, switch_value, help_text) in _FLAGS.items():
        if not _has(config, key):
            continue
        default = _lookup(config, key)
        if switch_value is not None:
            parser.add_argument(flag, action='store_true', help=help_text)
        else:
            parser.add_argument(flag, type=type(default), metavar=key.split('.')[-1], help=help_text)
    parser.add_argument('--debug', action='store_true', help='show full tracebacks for reported errors')
    update_config(config, parser.parse_args(argv), choices, check)
    return config


def output_dir(config: CN) -> str:
    """The run folder: OUTPUT/MODEL.NAME/TAG."""
    return os.path.join(config.OUTPUT, config.MODEL.NAME, config.TAG)


def scaled_lrs(config: CN, world_size: int) -> tuple:
    """(base, warm-up, min) LR scaled linearly from LR_BASE_BATCH to the real total batch
    (per-process batch x processes x accumulation steps)."""
    factor = config.DATA.BATCH_SIZE * world_size * config.TRAIN.ACCUMULATION_STEPS / config.TRAIN.LR_BASE_BATCH
    return config.TRAIN.BASE_LR * factor, config.TRAIN.WARMUP_LR * factor, config.TRAIN.MIN_LR * factor
