"""build_model(config): the training code's single entry point to the network."""
from __future__ import annotations

import torch.nn as nn

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
    arch = config.MODEL.FAT
    return FAT(
        in_chans=config.DATA.IN_CHANS,
        num_classes=config.MODEL.NUM_CLASSES,
        embed_dims=arch.EMBED_DIMS,
        depths=arch.DEPTHS,
        num_heads=arch.NUM_HEADS,
        kernel_sizes=arch.KERNEL_SIZES,
        window_sizes=arch.WINDOW_SIZES,
        mlp_kernel_sizes=arch.MLP_KERNEL_SIZES,
        mlp_ratios=arch.MLP_RATIOS,
        drop_rate=config.MODEL.DROP_RATE,
        drop_path_rate=config.MODEL.DROP_PATH_RATE,
        dwconv_impl=config.MODEL.DWCONV_IMPL,
    )
