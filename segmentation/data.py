"""Image / mask folders (ADE20K's layout) for semantic segmentation.

``DATA_PATH/<DATA.TRAIN_IMAGES>/name.jpg|png`` pairs with ``DATA_PATH/<DATA.TRAIN_MASKS>/name.png``,
a single-channel PNG of class indices. With DATA.REDUCE_ZERO_LABEL (ADE20K) index 0 ("other") is
ignored and 1..N become 0..N-1. Ignored pixels are 255. With DATA.DATASET 'digit_canvases' and no
DATA_PATH, the generated digit canvases are used (background 0, digit d is 1 + d).
"""
from __future__ import annotations

import math
import os
import random
from typing import Tuple

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import Dataset

from data import build_eval_loader, build_train_loader
from data.digit_canvases import dense_data_root
from utils import DataError, SampleError

IGNORE_INDEX = 255
IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png')


class SegmentationFolder(Dataset):
    """Pairs of images and class-index masks matched by file stem. Training samples are randomly
    rescaled (short side BASE_SIZE x SCALE_RANGE), cropped to CROP_SIZE (padding ignored) and flipped;
    evaluation samples are resized to short side BASE_SIZE (0: kept) with the mask at full size."""

    def __init__(self, image_dir: str, mask_dir: str, config, train: bool):
        for path in (image_dir, mask_dir):
            if not os.path.isdir(path):
                raise DataError(f'segmentation folder not found: {path} '
                                '(check --data-path and DATA.*_IMAGES / DATA.*_MASKS)')
        masks = {os.path.splitext(n)[0]: n for n in os.listdir(mask_dir) if n.endswith('.png')}
        images = sorted(n for n in os.listdir(image_dir) if n.lower().endswith(IMAGE_SUFFIXES))
        unmatched = [n for n in images if os.path.splitext(n)[0] not in masks]
        if unmatched:
            raise DataError(f'{len(unmatched)} image(s) in {image_dir} have no mask in {mask_dir}, e.g. {unmatched[0]}')
        if not images:
            raise DataError(f'no images ({", ".join(IMAGE_SUFFIXES)}) in {image_dir}')
        self.samples = [(os.path.join(image_dir, n), os.path.join(mask_dir, masks[os.path.splitext(n)[0]]))
                        for n in images]
        self.train = train
        self.reduce_zero_label = config.DATA.REDUCE_ZERO_LABEL
        self.num_classes = config.MODEL.NUM_CLASSES
        self.base_size, self.crop_size = config.DATA.BASE_SIZE, config.DATA.CROP_SIZE
        self.scale_range, self.hflip = config.DATA.SCALE_RANGE, config.DATA.HFLIP
        self.mean = np.array(IMAGENET_DEFAULT_MEAN, np.float32) * 255
        self.std = np.array(IMAGENET_DEFAULT_STD, np.float32) * 255

    def __len__(self) -> int:
        return len(self.samples)

    def _read(self, index: int) -> Tuple[np.ndarray, np.ndarray]:
        image_path, mask_path = self.samples[index]
        image = cv2.imread(image_path, cv2.IMREAD_COLOR)
        mask = cv2.imread(mask_path, cv2.IMREAD_UNCHANGED)
        if image is None or mask is None:
            raise SampleError(f'cannot read {image_path if image is None else mask_path}')
        if mask.ndim != 2 or mask.shape != image.shape[:2]:
            raise SampleError(f'{mask_path} must be a single-channel mask of its image\'s size {image.shape[:2]}, '
                            f'got shape {mask.shape}')
        mask = mask.astype(np.int64)
        if self.reduce_zero_label:
            mask = np.where(mask == 0, IGNORE_INDEX, mask - 1)
        if ((mask >= self.num_classes) & (mask != IGNORE_INDEX)).any():
            raise SampleError(f'{mask_path} holds class {int(mask[mask != IGNORE_INDEX].max())} but MODEL.NUM_CLASSES is '
                            f'{self.num_classes}')
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB), mask

    @staticmethod
    def _resize(image: np.ndarray, short_side: float) -> np.ndarray:
        height, width = image.shape[:2]
        scale = short_side / min(height, width)
        return cv2.resize(image, (max(1, round(width * scale)), max(1, round(height * scale))),
                          interpolation=cv2.INTER_LINEAR)

    def _augment(self, image: np.ndarray, mask: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        short_side = self.base_size * random.uniform(*self.scale_range)
        image = self._resize(image, short_side)
        mask = cv2.resize(mask.astype(np.uint8), image.shape[1::-1], interpolation=cv2.INTER_NEAREST).astype(np.int64)
        pad_h, pad_w = max(self.crop_size - image.shape[0], 0), max(self.crop_size - image.shape[1], 0)
        if pad_h or pad_w:
            image = cv2.copyMakeBorder(image, 0, pad_h, 0, pad_w, cv2.BORDER_CONSTANT, value=self.mean.tolist())
            mask = np.pad(mask, ((0, pad_h), (0, pad_w)), constant_values=IGNORE_INDEX)
        top = random.randint(0, image.shape[0] - self.crop_size)
        left = random.randint(0, image.shape[1] - self.crop_size)
        image = image[top:top + self.crop_size, left:left + self.crop_size]
        mask = mask[top:top + self.crop_size, left:left + self.crop_size]
        if random.random() < self.hflip:
            image, mask = image[:, ::-1], mask[:, ::-1]
        return image, mask

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        image, mask = self._read(index)
        if self.train:
            image, mask = self._augment(image, mask)
        elif self.base_size:
            image = self._resize(image, self.base_size)
        image = (image.astype(np.float32) - self.mean) / self.std
        return torch.from_numpy(image.transpose(2, 0, 1).copy()), torch.from_numpy(np.ascontiguousarray(mask))


def pad_to_multiple(images: torch.Tensor, multiple: int = 32) -> torch.Tensor:
    """Zero-pad (B, C, H, W) on the bottom and right to multiples of ``multiple`` (smp's decoders need it)."""
    height, width = images.shape[-2:]
    pad_w, pad_h = math.ceil(width / multiple) * multiple - width, math.ceil(height / multiple) * multiple - height
    return F.pad(images, (0, pad_w, 0, pad_h))


def build_segmentation_data(config):
    """(training set, training loader of fixed-size crops, evaluation loader of whole images, one per batch)."""
    root = dense_data_root(config, 'the ADE20K root (ADEChallengeData2016)')
    dataset_train = SegmentationFolder(os.path.join(root, config.DATA.TRAIN_IMAGES),
                                       os.path.join(root, config.DATA.TRAIN_MASKS), config, train=True)
    dataset_val = SegmentationFolder(os.path.join(root, config.DATA.VAL_IMAGES),
                                     os.path.join(root, config.DATA.VAL_MASKS), config, train=False)
    return dataset_train, build_train_loader(dataset_train, config), build_eval_loader(dataset_val, config, batch_size=1)


def confusion_matrix(prediction: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(num_classes, num_classes) counts of (true class, predicted class) over non-ignored pixels."""
    valid = target != IGNORE_INDEX
    index = target[valid] * num_classes + prediction[valid]
    return torch.bincount(index, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def segmentation_metrics(confusion: torch.Tensor) -> dict:
    """mIoU, mean class accuracy and pixel accuracy (fractions) from a confusion matrix; classes absent
    from both the labels and the predictions are left out of the means, as mmseg does."""
    confusion = confusion.double()
    true_positive = confusion.diag()
    labelled, predicted = confusion.sum(1), confusion.sum(0)
    union = labelled + predicted - true_positive
    present = union > 0
    iou = true_positive[present] / union[present]
    accuracy = true_positive[labelled > 0] / labelled[labelled > 0]
    return {'mIoU': iou.mean().item(), 'mAcc': accuracy.mean().item(),
            'aAcc': (true_positive.sum() / confusion.sum().clamp(min=1)).item()}

