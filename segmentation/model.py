"""segmentation-models-pytorch decoders on FAT: smp's timm universal encoder ``tu-<MODEL.VARIANT>``
with its timm feature extractor replaced by the project's FATBackbone (normalised maps, ImageNet
weights, frozen stages / BatchNorm)."""
from __future__ import annotations

import segmentation_models_pytorch as smp
import torch.nn as nn

from models import arch_overrides, build_backbone

ARCHS = ('fpn', 'upernet')


def build_segmenter(config) -> nn.Module:
    """SEG.ARCH ('fpn': Semantic FPN, 'upernet': UPerNet) from smp, MODEL.NUM_CLASSES outputs at input resolution."""
    seg = config.SEG
    if seg.ARCH == 'fpn':
        decoder = dict(decoder_pyramid_channels=seg.DECODER_CHANNELS,
                       decoder_segmentation_channels=seg.DECODER_CHANNELS // 2, decoder_dropout=seg.DECODER_DROPOUT)
    elif seg.ARCH == 'upernet':
        decoder = dict(decoder_channels=seg.DECODER_CHANNELS)
    else:
        raise ValueError(f'unknown SEG.ARCH {seg.ARCH!r}; choose one of {", ".join(ARCHS)}')
    # smp builds its encoder from timm's registry with our architecture (so its channel bookkeeping
    # matches), then the extractor inside is swapped for the backbone with the per-map norms.
    model = smp.create_model(seg.ARCH, encoder_name=f'tu-{config.MODEL.VARIANT}', encoder_weights=None,
                             in_channels=config.DATA.IN_CHANS, classes=config.MODEL.NUM_CLASSES, **decoder,
                             **arch_overrides(config))
    backbone = build_backbone(config)
    if list(model.encoder.out_channels[2:]) != backbone.out_channels:
        raise AssertionError('smp encoder channels disagree with the FAT backbone')
    model.encoder.model = backbone
    return model
