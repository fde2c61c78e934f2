"""build_model(config): the training code's single entry point to the network."""
from __future__ import annotations

from typing import Sequence

import torch.nn as nn

from .backbone import FATBackbone
from .fat import FAT


def build_model(config) -> nn.Module:
    """Build the network the yacs ``config`` describes.

    ``MODEL.TYPE`` picks the family (``fat``); its section (``MODEL.FAT``) gives the architecture,
    and ``MODEL.NUM_CLASSES``, ``MODEL.DROP_RATE``, ``MODEL.DROP_PATH_RATE``,
    ``MODEL.DWCONV_IMPL`` and ``DATA.IN_CHANS`` the rest. BatchNorm stays plain: converting it to
    SyncBatchNorm is the training script's job.
    """
    model_type = config.MODEL.TYPE
    if model_type != 'fat':
        raise ValueError(f"unknown MODEL.TYPE {model_type!r}; this codebase builds 'fat'")
    return FAT(num_classes=config.MODEL.NUM_CLASSES, drop_rate=config.MODEL.DROP_RATE, **fat_arch_kwargs(config))


def fat_arch_kwargs(config) -> dict:
    """FAT's constructor arguments from MODEL.FAT, MODEL.DROP_PATH_RATE, MODEL.DWCONV_IMPL and DATA.IN_CHANS."""
    arch = config.MODEL.FAT
    return dict(
        in_chans=config.DATA.IN_CHANS, embed_dims=arch.EMBED_DIMS, depths=arch.DEPTHS, num_heads=arch.NUM_HEADS,
        kernel_sizes=arch.KERNEL_SIZES, window_sizes=arch.WINDOW_SIZES, mlp_kernel_sizes=arch.MLP_KERNEL_SIZES,
        mlp_ratios=arch.MLP_RATIOS, drop_path_rate=config.MODEL.DROP_PATH_RATE, dwconv_impl=config.MODEL.DWCONV_IMPL)


def build_backbone(config, out_indices: Sequence[int] = (0, 1, 2, 3)) -> FATBackbone:
    """The dense-prediction backbone returning the maps of stages ``out_indices``: MODEL.FAT's
    architecture, MODEL.BACKBONE's freezing, TRAIN.USE_CHECKPOINT, and MODEL.PRETRAINED's ImageNet
    weights when given."""
    if config.MODEL.TYPE != 'fat':
        raise ValueError(f"unknown MODEL.TYPE {config.MODEL.TYPE!r}; this codebase builds 'fat'")
    backbone = FATBackbone(out_indices=out_indices, frozen_stages=config.MODEL.BACKBONE.FROZEN_STAGES,
                           freeze_bn=config.MODEL.BACKBONE.FREEZE_BN, **fat_arch_kwargs(config))
    backbone.body.set_grad_checkpointing(config.TRAIN.USE_CHECKPOINT)
    if config.MODEL.PRETRAINED:
        backbone.load_pretrained(config.MODEL.PRETRAINED)
    return backbone
