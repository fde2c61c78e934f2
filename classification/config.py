"""Image classification's config section, added to the keys every run has (``config.base_config``)."""
from __future__ import annotations

import argparse
import os
from typing import Optional

from yacs.config import CfgNode as CN

from config import base_config, merge_file, update_config
from utils import ConfigError


def add_classification_config(config: CN) -> CN:
    """Image classification's keys (main.py), added to ``config``: its data (folders, shards, DALI,
    the digits), its regularisation, augmentation, distillation and evaluation transform, and its
    tools (--throughput, --export, --reparam)."""
    config.defrost()
    config.DATA.DATASET = 'imagenet'  # 'imagenet' (any ImageFolder) or 'digits' (made from scikit-learn when DATA_PATH is empty)
    config.DATA.FORMAT = 'auto'  # 'folder', 'shards' (written by python -m data.shards) or 'auto' (shards where index.json is)
    config.DATA.LOADER = 'torch'  # 'torch' (DataLoader workers, PIL) or 'dali' (NVIDIA DALI: GPU decoding, CPU on --device cpu)
    config.DATA.SHARD_CACHE = ''  # local folder for shards read from a URL or pipe: (default ~/.cache/fat/shards)
    config.DATA.FETCH_RETRIES = 4  # a failed fetch of a remote file (5xx, reset, pipe: command failed) is tried again this often
    config.DATA.FETCH_TIMEOUT = 900.0  # seconds one remote file may take in all; no data for 60 s (or this, if less) also fails
    config.DATA.IMG_SIZE = 224  # training and test resolution
    config.DATA.INTERPOLATION = 'bicubic'  # resize interpolation: random, bilinear, bicubic
    config.DATA.SKIP_CORRUPT = False  # replace unreadable images by the next readable one (and count them) instead of stopping
    config.MODEL.DROP_RATE = 0.0  # dropout before the classifier
    config.MODEL.LABEL_SMOOTHING = 0.1  # label smoothing when Mixup/CutMix are off

    config.AUG = CN()  # augmentation (timm)
    config.AUG.COLOR_JITTER = 0.4  # colour jitter strength; 0 disables
    config.AUG.AUTO_AUGMENT = 'rand-m9-mstd0.5-inc1'  # RandAugment policy; 'none' disables
    config.AUG.REPROB = 0.25  # random erasing probability
    config.AUG.REMODE = 'pixel'  # random erasing fill
    config.AUG.RECOUNT = 1  # random erasing count
    config.AUG.SCALE = (0.08, 1.0)  # RandomResizedCrop area range
    config.AUG.HFLIP = 0.5  # horizontal flip probability
    config.AUG.MIXUP = 0.8  # Mixup alpha; 0 disables
    config.AUG.CUTMIX = 1.0  # CutMix alpha; 0 disables
    config.AUG.CUTMIX_MINMAX = None  # CutMix box ratio range (overrides alpha when set)
    config.AUG.MIXUP_PROB = 1.0  # probability of applying Mixup or CutMix to a batch
    config.AUG.MIXUP_SWITCH_PROB = 0.5  # probability of CutMix rather than Mixup when both are on
    config.AUG.MIXUP_MODE = 'batch'  # batch, pair or elem

    config.DISTILL = CN()  # knowledge distillation (DeiT's, from the logits of a frozen teacher)
    config.DISTILL.TYPE = 'none'  # none (TEACHER unused), soft (KL divergence at temperature TAU) or hard (cross-entropy with its top class)
    config.DISTILL.TEACHER = ''  # a timm model name, a local-dir:DIR / hf-hub:ORG/NAME folder, or a checkpoint of this project
    config.DISTILL.TEACHER_WEIGHTS = ''  # weights file of a teacher named by timm name (else timm's own pretrained weights)
    config.DISTILL.ALPHA = 0.5  # loss = (1 - ALPHA) x classification + ALPHA x distillation
    config.DISTILL.TAU = 1.0  # soft distillation's temperature

    config.TEST = CN()  # evaluation transform
    config.TEST.CROP = True  # resize to IMG_SIZE / CROP_PCT, then centre-crop; else resize to IMG_SIZE
    config.TEST.CROP_PCT = 0.875  # centre-crop ratio (224 / 256)

    config.REPARAM = False  # --eval and --throughput's inference run the deploy form: BatchNorms folded into convs
    config.THROUGHPUT_MODE = False  # only measure training and inference throughput (synthetic batches, no data)
    config.EXPORT = ''  # only write the model (MODEL.RESUME's weights, else fresh), checked: a .onnx or .pt2 file, or a
    # folder (no suffix) in the Hugging Face Hub form that timm loads (config.json, model.safetensors, README.md)
    return config


CLASSIFICATION_CHOICES = {
    'DATA.DATASET': ('imagenet', 'digits'),
    'DATA.FORMAT': ('auto', 'folder', 'shards'),
    'DATA.LOADER': ('torch', 'dali'),
    'DATA.INTERPOLATION': ('random', 'nearest', 'bilinear', 'bicubic', 'box', 'hamming', 'lanczos'),
    'AUG.MIXUP_MODE': ('batch', 'pair', 'elem'),
    'DISTILL.TYPE': ('none', 'soft', 'hard'),
}


def classification_defaults() -> CN:
    """main.py's config: the base keys and classification's."""
    return add_classification_config(base_config())


def get_config(args: Optional[argparse.Namespace] = None) -> CN:
    """The classification defaults merged with ``args`` (yaml, --opts, flags); a frozen copy."""
    config = classification_defaults()
    if args is not None:
        update_config(config, args, CLASSIFICATION_CHOICES, check_config)
    return config


def recipe_defaults(variant: str) -> CN:
    """The config a run of ``variant`` starts from: the defaults and ``configs/VARIANT_224.yaml``
    when the project has one (what a model card's recipe is told against)."""
    config = classification_defaults()
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs', f'{variant}_224.yaml')
    if os.path.isfile(path):
        merge_file(config, path, CLASSIFICATION_CHOICES)
    return config


def check_config(config: CN) -> None:
    """What classification's keys may not combine to (ConfigError): --reparam in training, a
    distillation without a teacher or with ALPHA, TAU out of range, settings DATA.LOADER dali cannot
    follow."""
    if config.REPARAM and not (config.EVAL_MODE or config.THROUGHPUT_MODE or config.EXPORT):
        raise ConfigError('REPARAM (--reparam) folds the BatchNorms for --eval, --export or --throughput; '
                          'a training run cannot use it')
    distill = config.DISTILL
    if distill.TYPE != 'none' and not distill.TEACHER:
        raise ConfigError(f'DISTILL.TYPE {distill.TYPE} needs DISTILL.TEACHER (a timm model name, local-dir:DIR, '
                          'hf-hub:ORG/NAME or a checkpoint of this project)')
    if not 0 <= distill.ALPHA <= 1 or distill.TAU <= 0:
        raise ConfigError(f'DISTILL.ALPHA is {distill.ALPHA} and DISTILL.TAU {distill.TAU}: ALPHA lies in [0, 1] '
                          'and TAU is positive')
    if config.DATA.LOADER == 'dali':
        from .dali import check_settings  # they need no DALI installed
        check_settings(config)
