"""Train and evaluate RetinaNet / Mask R-CNN with a FAT backbone on COCO-format data.

    torchrun --nproc_per_node 8 -m detection.train --cfg detection/configs/coco_retinanet_fat_b0_1x.yaml \\
        --data-path /data/coco --pretrained fat_b0_imagenet.pth
    python -m detection.train --cfg detection/configs/coco_retinanet_fat_b0_1x.yaml --data-path /data/coco \\
        --eval --resume output/retinanet_fat_b0_coco/default/ckpt_best.pth

Detection is a task of the one run engine (``engine.py``), which trains, evaluates and checkpoints.
"""
from __future__ import annotations

from typing import Dict

import torch.nn as nn
from yacs.config import CfgNode as CN

import engine
from config import dense_defaults
from models import check_architecture, choose_run_kernels

from .data import build_detection_data
from .evaluate import evaluate_coco
from .model import build_detector


def defaults() -> CN:
    """The project's defaults for dense tasks plus the detection keys."""
    config = dense_defaults()
    config.DATA.DATASET = 'coco'  # 'coco' (any COCO-format data under DATA_PATH) or 'digit_canvases' (generated)
    config.DATA.TRAIN_IMAGES = 'train2017'  # training image folder, relative to DATA_PATH
    config.DATA.TRAIN_ANNOTATIONS = 'annotations/instances_train2017.json'  # its COCO annotations
    config.DATA.VAL_IMAGES = 'val2017'  # evaluation image folder, relative to DATA_PATH
    config.DATA.VAL_ANNOTATIONS = 'annotations/instances_val2017.json'  # its COCO annotations
    config.DATA.HFLIP = 0.5  # horizontal flip probability in training
    config.DATA.BATCH_SIZE = 2  # images per GPU (per process)
    config.DET = CN()
    config.DET.ARCH = 'retinanet'  # retinanet or maskrcnn (torchvision)
    config.DET.MIN_SIZE = 800  # images are resized so the short side is MIN_SIZE ...
    config.DET.MAX_SIZE = 1333  # ... and the long side at most MAX_SIZE
    config.DET.FPN_CHANNELS = 256  # width of the feature pyramid and the heads
    config.DET.ANCHOR_SIZES = [32, 64, 128, 256, 512]  # base anchor size on each of the 5 pyramid levels
    config.DET.SCORE_THRESH = 0.05  # detections below this score are dropped
    config.DET.DETECTIONS_PER_IMAGE = 100  # at most this many detections per image (COCO's limit)
    return config


CHOICES = {'DATA.DATASET': ('coco', 'digit_canvases'), 'DET.ARCH': ('retinanet', 'maskrcnn')}


class DetectionTask(engine.Task):
    """COCO-format detection: torchvision's RetinaNet or Mask R-CNN on FAT, scored by COCOeval."""

    primary_metric = 'bbox_AP'
    identity_sections = ('MODEL.', 'DATA.', 'DET.')

    def build_data(self) -> engine.TaskData:
        dataset_train, loader_train, loader_val, self.coco_val, self.num_classes = build_detection_data(
            self.config, masks=self.config.DET.ARCH == 'maskrcnn')
        categories = sorted(dataset_train.dataset.coco.getCatIds())
        return engine.TaskData(
            loader_train, loader_val, identity={'categories': categories, 'train_images': len(dataset_train)},
            description=f'{len(dataset_train)} training images with objects, {len(self.coco_val.imgs)} evaluation '
                        f'images, {len(categories)} categories')

    def build_model(self) -> nn.Module:
        return build_detector(self.config, self.num_classes)

    def check_config(self) -> None:
        check_architecture(self.config)

    def on_device(self, model: nn.Module) -> None:
        size = self.config.DET.MIN_SIZE
        line = choose_run_kernels(self.config, model, (size, size), entry=model.backbone)
        if line:
            self.logger.info(line)

    def loss(self, model: nn.Module, batch):
        images, targets = batch
        images = [image.to(self.device, non_blocking=True) for image in images]
        targets = [{k: v.to(self.device, non_blocking=True) for k, v in t.items() if k != 'image_id'} for t in targets]
        parts = model(images, targets)
        return sum(parts.values()), {name: value.detach() for name, value in parts.items()}

    def evaluate(self, model: nn.Module, loader) -> Dict[str, float]:
        return evaluate_coco(model, loader, self.coco_val, self.device)


if __name__ == '__main__':
    engine.main(DetectionTask, 'FAT detection training and evaluation', defaults(), CHOICES)
