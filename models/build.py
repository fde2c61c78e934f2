"""build_model(config): the training code's single entry point to the network.

``MODEL.VARIANT`` names a registered variant (``fat_b0`` .. ``fat_b3``, whose architecture is the
table ``MODEL_ARGS`` in ``fat.py``); a non-empty ``MODEL.FAT.*`` list overrides that entry of it.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence, Tuple

import timm
import torch
import torch.nn as nn

from config import output_dir
from utils import amp_dtype

from .backbone import FATBackbone
from .dwconv import choose_kernels
from .fat import MODEL_ARGS

# MODEL.FAT keys -> FAT constructor arguments
_ARCH_KEYS = {'EMBED_DIMS': 'embed_dims', 'DEPTHS': 'depths', 'NUM_HEADS': 'num_heads',
              'KERNEL_SIZES': 'kernel_sizes', 'WINDOW_SIZES': 'window_sizes',
              'MLP_KERNEL_SIZES': 'mlp_kernel_sizes', 'MLP_RATIOS': 'mlp_ratios'}


def arch_overrides(config) -> dict:
    """The FAT constructor arguments that MODEL.FAT overrides (its non-empty lists)."""
    return {arg: list(config.MODEL.FAT[key]) for key, arg in _ARCH_KEYS.items() if config.MODEL.FAT[key]}


def _variant(config) -> str:
    variant = config.MODEL.VARIANT
    if variant not in MODEL_ARGS:
        raise ValueError(f'MODEL.VARIANT is {variant!r}; choose one of {", ".join(MODEL_ARGS)}')
    return variant


def build_model(config) -> nn.Module:
    """The classifier the yacs ``config`` describes: MODEL.VARIANT with MODEL.FAT's overrides,
    MODEL.NUM_CLASSES, MODEL.DROP_RATE, MODEL.DROP_PATH_RATE, MODEL.DWCONV_IMPL and DATA.IN_CHANS.
    BatchNorm stays plain: converting it to SyncBatchNorm is the training engine's job."""
    return timm.create_model(_variant(config), num_classes=config.MODEL.NUM_CLASSES, drop_rate=config.MODEL.DROP_RATE,
                             drop_path_rate=config.MODEL.DROP_PATH_RATE, in_chans=config.DATA.IN_CHANS,
                             dwconv_impl=config.MODEL.DWCONV_IMPL, **arch_overrides(config))


def build_backbone(config, out_indices: Sequence[int] = (0, 1, 2, 3)) -> FATBackbone:
    """The dense-prediction backbone returning the maps of stages ``out_indices``: the architecture as
    for ``build_model``, MODEL.BACKBONE's freezing, TRAIN.USE_CHECKPOINT, and MODEL.PRETRAINED's
    ImageNet weights when given."""
    backbone = FATBackbone.from_variant(
        _variant(config), out_indices=out_indices, frozen_stages=config.MODEL.BACKBONE.FROZEN_STAGES,
        freeze_bn=config.MODEL.BACKBONE.FREEZE_BN, in_chans=config.DATA.IN_CHANS,
        drop_path_rate=config.MODEL.DROP_PATH_RATE, dwconv_impl=config.MODEL.DWCONV_IMPL, **arch_overrides(config))
    backbone.body.set_grad_checkpointing(config.TRAIN.USE_CHECKPOINT)
    if config.MODEL.PRETRAINED:
        backbone.load_pretrained(config.MODEL.PRETRAINED)
    return backbone


def check_architecture(config) -> None:
    """Build the FAT that ``config`` describes on the meta device (no memory, no weights), so that a
    wrong variant or an inconsistent MODEL.FAT raises ValueError before any data is read."""
    try:
        with torch.device('meta'):
            timm.create_model(_variant(config), num_classes=0, in_chans=config.DATA.IN_CHANS,
                              dwconv_impl=config.MODEL.DWCONV_IMPL, **arch_overrides(config))
    except ValueError as error:
        raise ValueError(f'MODEL: {error}') from error


def kernel_decisions(config) -> Optional[str]:
    """Where a run keeps its depthwise-conv decisions: a training run in its own folder (``kernels/``
    in OUTPUT/NAME/TAG, which every node shares), so that its resumes, on whichever node rank 0
    lands, run the kernels it ran; --eval and --throughput in the kernel cache (None)."""
    if config.EVAL_MODE or config.get('THROUGHPUT_MODE'):
        return None
    return os.path.join(output_dir(config), 'kernels')


def choose_run_kernels(config, model: nn.Module, image_size: Tuple[int, int], entry: Optional[nn.Module] = None) -> str:
    """``models.dwconv.choose_kernels`` for a run of ``config``: its DATA.BATCH_SIZE images of
    ``image_size`` (H, W) through ``entry`` (default ``model``), its autocast type and memory format,
    for training unless EVAL_MODE, decisions kept where ``kernel_decisions`` says. The log line it
    returns ('' when nothing was chosen)."""
    device = next(model.parameters()).device
    return choose_kernels(model, (config.DATA.IN_CHANS, *image_size), config.DATA.BATCH_SIZE,
                          training=not config.EVAL_MODE, dtype=amp_dtype(config, device),
                          channels_last=config.CHANNELS_LAST, entry=entry, decisions=kernel_decisions(config))
