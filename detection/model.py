"""torchvision's RetinaNet and Mask R-CNN on a FAT backbone with a feature pyramid network."""
from __future__ import annotations

from collections import OrderedDict
from functools import partial
from typing import Dict, Sequence

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision.models.detection import MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.ops.feature_pyramid_network import (ExtraFPNBlock, FeaturePyramidNetwork, LastLevelMaxPool,
                                                     LastLevelP6P7)

from models import FATBackbone, build_backbone

ASPECT_RATIOS = (0.5, 1.0, 2.0)


class FATFPN(nn.Module):
    """FAT's normalised pyramid maps through torchvision's FPN: an ordered dict of maps keyed by
    stage index ('0'..'3') and then the extra levels, all ``out_channels`` wide."""

    def __init__(self, backbone: FATBackbone, out_channels: int, extra_blocks: ExtraFPNBlock):
        super().__init__()
        self.backbone = backbone
        self.fpn = FeaturePyramidNetwork(backbone.out_channels, out_channels, extra_blocks=extra_blocks)
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        maps = self.backbone(x)
        return self.fpn(OrderedDict((str(i), m) for i, m in zip(self.backbone.out_indices, maps)))


def _anchors(sizes: Sequence[int], per_octave: int) -> AnchorGenerator:
    """``per_octave`` scales per level starting at each of ``sizes``, three aspect ratios."""
    scales = tuple(tuple(int(size * 2 ** (k / per_octave)) for k in range(per_octave)) for size in sizes)
    return AnchorGenerator(scales, (ASPECT_RATIOS,) * len(sizes))


def build_detector(config, num_classes: int) -> nn.Module:
    """DET.ARCH on FAT: 'retinanet' (FPN on strides 8-32 plus P6/P7 from P5; GroupNorm heads and GIoU
    box loss as in torchvision's RetinaNet v2) or 'maskrcnn' (FPN on strides 4-32 plus a max-pooled P6).
    ``num_classes`` counts the background (COCO: 91, the largest category id + 1)."""
    det = config.DET
    common = dict(num_classes=num_classes, min_size=det.MIN_SIZE, max_size=det.MAX_SIZE,
                  image_mean=list(IMAGENET_DEFAULT_MEAN), image_std=list(IMAGENET_DEFAULT_STD))
    if len(det.ANCHOR_SIZES) != 5:
        raise ValueError(f'DET.ANCHOR_SIZES needs one base size per pyramid level (5), got {det.ANCHOR_SIZES}')
    if det.ARCH == 'retinanet':
        body = FATFPN(build_backbone(config, out_indices=(1, 2, 3)), det.FPN_CHANNELS,
                      LastLevelP6P7(det.FPN_CHANNELS, det.FPN_CHANNELS))
        anchors = _anchors(det.ANCHOR_SIZES, per_octave=3)
        head = RetinaNetHead(det.FPN_CHANNELS, anchors.num_anchors_per_location()[0], num_classes,
                             norm_layer=partial(nn.GroupNorm, 32))
        head.regression_head._loss_type = 'giou'
        return RetinaNet(body, anchor_generator=anchors, head=head, score_thresh=det.SCORE_THRESH,
                         detections_per_img=det.DETECTIONS_PER_IMAGE, **common)
    if det.ARCH == 'maskrcnn':
        body = FATFPN(build_backbone(config), det.FPN_CHANNELS, LastLevelMaxPool())
        return MaskRCNN(body, rpn_anchor_generator=_anchors(det.ANCHOR_SIZES, per_octave=1),
                        box_score_thresh=det.SCORE_THRESH, box_detections_per_img=det.DETECTIONS_PER_IMAGE, **common)
    raise ValueError(f"unknown DET.ARCH {det.ARCH!r}; choose 'retinanet' or 'maskrcnn'")
