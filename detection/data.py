"""COCO-format detection data through torchvision's CocoDetection and transforms v2.

A data root holds the images of each split in a folder and COCO annotation files (paths relative to
the root: DATA.TRAIN_IMAGES, DATA.TRAIN_ANNOTATIONS, DATA.VAL_IMAGES, DATA.VAL_ANNOTATIONS). With
DATA.DATASET 'digit_canvases' and no DATA_PATH, the digit canvases are written once and used.
"""
from __future__ import annotations

import contextlib
import io
import os
from typing import List, Tuple

import torch
from PIL import Image
from torch.utils.data import Subset
from torchvision import datasets
from torchvision.transforms import v2

from data import build_eval_loader, build_train_loader
from data.digit_canvases import dense_data_root
from data.shards import UNREADABLE_IMAGE
from utils import DataError, SampleError


class _CocoDetection(datasets.CocoDetection):
    """torchvision's CocoDetection, where an image that cannot be read (broken, or so large that it is
    likely a decompression bomb) is one error naming it rather than PIL's traceback."""

    def _load_image(self, id: int) -> Image.Image:
        path = os.path.join(self.root, self.coco.loadImgs(id)[0]['file_name'])
        try:
            with Image.open(path) as image:
                return image.convert('RGB')
        except UNREADABLE_IMAGE as error:
            raise SampleError(f'cannot read image {path}: {error}') from error


def _coco(root: str, images: str, annotations: str, transforms, keys: Tuple[str, ...]):
    image_dir, ann_file = os.path.join(root, images), os.path.join(root, annotations)
    for path, what in ((image_dir, 'image folder'), (ann_file, 'annotation file')):
        if not os.path.exists(path):
            raise DataError(f'COCO {what} not found: {path} (check --data-path and DATA.*_IMAGES / DATA.*_ANNOTATIONS)')
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
            dataset = _CocoDetection(image_dir, ann_file, transforms=transforms)
    except (ValueError, KeyError) as error:
        raise DataError(f'{ann_file} is not a COCO annotation file: {error}') from error
    return datasets.wrap_dataset_for_transforms_v2(dataset, target_keys=keys)


def _with_objects(dataset) -> Subset:
    """Training keeps the images with at least one non-crowd object, as torchvision's references do."""
    coco = dataset.coco
    keep = [i for i, image_id in enumerate(dataset.ids)
            if any(not a.get('iscrowd', 0) for a in coco.imgToAnns.get(image_id, []))]
    if not keep:
        raise DataError('the training annotations hold no objects')
    return Subset(dataset, keep)


def collate(batch: List[Tuple]) -> Tuple[List, List]:
    """Detection batches are lists: images differ in size, targets in object count."""
    images, targets = zip(*batch)
    return list(images), list(targets)


def build_detection_data(config, masks: bool):
    """(training set, training loader, evaluation loader, evaluation COCO object, number of classes
    including the background)."""
    root = dense_data_root(config, 'the COCO root')
    to_tensor = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]
    train_transforms = v2.Compose([v2.RandomHorizontalFlip(config.DATA.HFLIP), *to_tensor,
                                   v2.SanitizeBoundingBoxes()])
    train_keys = ('image_id', 'boxes', 'labels', 'masks') if masks else ('image_id', 'boxes', 'labels')
    dataset_train = _coco(root, config.DATA.TRAIN_IMAGES, config.DATA.TRAIN_ANNOTATIONS, train_transforms, train_keys)
    dataset_val = _coco(root, config.DATA.VAL_IMAGES, config.DATA.VAL_ANNOTATIONS, v2.Compose(to_tensor),
                        ('image_id',))
    category_ids = dataset_train.coco.getCatIds()
    if not category_ids:
        raise DataError(f'{config.DATA.TRAIN_ANNOTATIONS} lists no categories')
    train = _with_objects(dataset_train)
    return (train, build_train_loader(train, config, collate_fn=collate),
            build_eval_loader(dataset_val, config, collate_fn=collate), dataset_val.coco, max(category_ids) + 1)
