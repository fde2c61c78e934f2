"""Train and evaluate semantic segmentation (smp's Semantic FPN or UPerNet) with a FAT backbone.

    torchrun --nproc_per_node 8 -m segmentation.train --cfg segmentation/configs/ade20k_fpn_fat_b0.yaml \\
        --data-path /data/ADEChallengeData2016 --pretrained fat_b0_imagenet.pth
    python -m segmentation.train --cfg segmentation/configs/ade20k_fpn_fat_b0.yaml \\
        --data-path /data/ADEChallengeData2016 --eval --resume output/fpn_fat_b0_ade20k/default/ckpt_best.pth
"""
from __future__ import annotations

from typing import Dict

import torch
import torch.nn as nn
import torch.nn.functional as F
from segmentation_models_pytorch.losses import DiceLoss
from yacs.config import CfgNode as CN

import engine
from config import dense_defaults
from models import check_architecture, choose_run_kernels
from utils import all_reduce

from .data import IGNORE_INDEX, build_segmentation_data, confusion_matrix, pad_to_multiple, segmentation_metrics
from .model import ARCHS, build_segmenter


def defaults() -> CN:
    """The project's defaults for dense tasks plus the segmentation keys (ADE20K's recipe)."""
    config = dense_defaults()
    config.DATA.DATASET = 'ade20k'  # 'ade20k' (any image/mask folders under DATA_PATH) or 'digit_canvases' (generated)
    config.DATA.TRAIN_IMAGES = 'images/training'  # training images, relative to DATA_PATH
    config.DATA.TRAIN_MASKS = 'annotations/training'  # their class-index PNG masks (same file stems)
    config.DATA.VAL_IMAGES = 'images/validation'  # evaluation images, relative to DATA_PATH
    config.DATA.VAL_MASKS = 'annotations/validation'  # their masks
    config.DATA.REDUCE_ZERO_LABEL = True  # mask value 0 is ignored and 1..N become classes 0..N-1 (ADE20K)
    config.DATA.BASE_SIZE = 512  # short side before the random rescale (training) and for evaluation; 0 keeps the size
    config.DATA.SCALE_RANGE = (0.5, 2.0)  # random rescale of the short side in training, relative to BASE_SIZE
    config.DATA.CROP_SIZE = 512  # training crop (padded with ignored pixels when the image is smaller)
    config.DATA.HFLIP = 0.5  # horizontal flip probability in training
    config.DATA.BATCH_SIZE = 4  # crops per GPU (per process)
    config.MODEL.NUM_CLASSES = 150  # classes predicted (ADE20K: 150)
    config.SEG = CN()
    config.SEG.ARCH = 'fpn'  # fpn (Semantic FPN) or upernet, from segmentation-models-pytorch
    config.SEG.DECODER_CHANNELS = 256  # decoder width
    config.SEG.DECODER_DROPOUT = 0.1  # fpn: dropout before the classifier
    config.SEG.LOSS = 'ce'  # ce (cross-entropy) or ce_dice (plus smp's multi-class Dice loss, for small objects)
    return config


CHOICES = {'DATA.DATASET': ('ade20k', 'digit_canvases'), 'SEG.ARCH': ARCHS, 'SEG.LOSS': ('ce', 'ce_dice')}


class SegmentationTask(engine.Task):
    """Semantic segmentation on image/mask folders, scored by mIoU."""

    primary_metric = 'mIoU'
    identity_sections = ('MODEL.', 'DATA.', 'SEG.')

    def build_data(self) -> engine.TaskData:
        dataset_train, loader_train, loader_val = build_segmentation_data(self.config)
        return engine.TaskData(
            loader_train, loader_val, identity={'classes': self.config.MODEL.NUM_CLASSES, 'train_images': len(dataset_train)},
            description=f'{len(dataset_train)} training and {len(loader_val.dataset)} evaluation images, '
                        f'{self.config.MODEL.NUM_CLASSES} classes')

    def build_model(self) -> nn.Module:
        self.dice = DiceLoss('multiclass', ignore_index=IGNORE_INDEX) if self.config.SEG.LOSS == 'ce_dice' else None
        return build_segmenter(self.config)

    def check_config(self) -> None:
        check_architecture(self.config)

    def on_device(self, model: nn.Module) -> None:
        line = choose_run_kernels(self.config, model, (self.config.DATA.CROP_SIZE,) * 2)
        if line:
            self.logger.info(line)

    def loss(self, model: nn.Module, batch):
        images, masks = self.images_to_device(batch[0]), batch[1].to(self.device, non_blocking=True)
        logits = model(images).float()
        cross_entropy = F.cross_entropy(logits, masks, ignore_index=IGNORE_INDEX)
        if self.dice is None:
            return cross_entropy, {}
        dice = self.dice(logits, masks)
        return cross_entropy + dice, {'ce': cross_entropy.detach(), 'dice': dice.detach()}

    def evaluate(self, model: nn.Module, loader) -> Dict[str, float]:
        """Whole-image inference (padded to a multiple of 32), logits resized to the mask; one confusion
        matrix summed over all processes."""
        num_classes = self.config.MODEL.NUM_CLASSES
        confusion = torch.zeros(num_classes, num_classes, dtype=torch.long, device=self.device)
        for images, masks in loader:
            images, masks = self.images_to_device(images), masks.to(self.device, non_blocking=True)
            logits = model(pad_to_multiple(images))[..., :images.shape[-2], :images.shape[-1]].float()
            logits = F.interpolate(logits, size=masks.shape[-2:], mode='bilinear', align_corners=False)
            confusion += confusion_matrix(logits.argmax(1), masks, num_classes)
        return segmentation_metrics(all_reduce(confusion))


if __name__ == '__main__':
    engine.main(SegmentationTask, 'FAT semantic segmentation training and evaluation', defaults(), CHOICES)
