"""Image classification's data: ImageFolders or their shards (``data/shards``), timm's transforms and
Mixup/CutMix, and the loader (``data.build_train_loader``'s, or NVIDIA DALI's in ``dali.py``)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Iterable, List, Optional

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, Mixup, create_transform
from torchvision import datasets
from torchvision.datasets.folder import find_classes

from data import build_eval_loader, build_train_loader
from data.digits import materialize_digits
from data.fetch import is_remote
from data.shards import (UNREADABLE_IMAGE, ShardDataset, ShardSet, SkippingReader, check_same_classes,
                         is_shard_location)
from utils import DataError, SampleError


class ImageFolder(SkippingReader, datasets.ImageFolder):
    """torchvision's ImageFolder whose errors name the folder or file: an unreadable image raises
    :class:`SampleError`, or with ``skip_corrupt`` is replaced by the next readable one and
    counted."""

    def __init__(self, root: str, transform, skip_corrupt: bool = False):
        try:
            datasets.ImageFolder.__init__(self, root, transform=transform)
        except FileNotFoundError as error:  # no class folders, or a class folder without images
            raise DataError(f'{root}: {error}') from error
        self.skip_corrupt = skip_corrupt

    def describe(self) -> str:
        return self.root

    def _load(self, position: int):
        path, target = self.samples[position]
        try:
            return self.loader(path), target
        except UNREADABLE_IMAGE as error:
            raise SampleError(f'cannot read image {path}: {error}') from error


def preprocessing(config) -> dict:
    """What the model expects of its input, in timm's data-config keys: the normalisation of every
    loader, and evaluation's size, resize interpolation and centre-crop ratio. Exports and teachers
    are checked against it."""
    return {'input_size': (config.DATA.IN_CHANS, config.DATA.IMG_SIZE, config.DATA.IMG_SIZE),
            'interpolation': config.DATA.INTERPOLATION, 'crop_pct': config.TEST.CROP_PCT if config.TEST.CROP else 1.0,
            'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD}


def build_transform(is_train: bool, config):
    """timm's ImageNet transforms: RandAugment, colour jitter, random erasing for training; resize
    (and centre crop when TEST.CROP) for evaluation."""
    form = preprocessing(config)
    if is_train:
        return create_transform(
            input_size=config.DATA.IMG_SIZE, is_training=True, scale=tuple(config.AUG.SCALE),
            hflip=config.AUG.HFLIP, color_jitter=config.AUG.COLOR_JITTER or None,
            auto_augment=None if config.AUG.AUTO_AUGMENT == 'none' else config.AUG.AUTO_AUGMENT,
            re_prob=config.AUG.REPROB, re_mode=config.AUG.REMODE, re_count=config.AUG.RECOUNT,
            interpolation=form['interpolation'], mean=form['mean'], std=form['std'])
    return create_transform(input_size=config.DATA.IMG_SIZE, is_training=False, interpolation=form['interpolation'],
                            crop_pct=form['crop_pct'], mean=form['mean'], std=form['std'])


def resolve_data_path(config) -> str:
    """DATA.DATA_PATH, or for DATA.DATASET 'digits' without one, the digits made on first use."""
    if config.DATA.DATA_PATH:
        return config.DATA.DATA_PATH
    if config.DATA.DATASET == 'digits':
        return str(materialize_digits())  # several processes at once: the first to finish is kept
    raise DataError('no data: set DATA.DATA_PATH (or --data-path) to an ImageFolder root with train/ and val/, '
                    'or to shards written by python -m data.shards')


def reads_shards(root: str, config) -> bool:
    """Whether the data at ``root`` are shards: DATA.FORMAT says so, or with 'auto' an index.json is there."""
    if config.DATA.FORMAT == 'auto':
        return is_shard_location(root)
    if config.DATA.FORMAT == 'folder' and is_remote(root):
        raise DataError(f'{root}: DATA.FORMAT folder reads local folders only; a URL or pipe: location holds shards')
    return config.DATA.FORMAT == 'shards'


def folder_of(root: str, split: str) -> str:
    folder = os.path.join(root, split)
    if not os.path.isdir(folder):
        raise DataError(f'data folder not found: {folder} (DATA.DATA_PATH must hold train/ and val/ ImageFolders, '
                        'or shards written by python -m data.shards)')
    return folder


def build_dataset(split: str, root: str, config, shards: Optional[ShardSet] = None):
    """Split ``split`` of the ImageFolder ``root`` (or of ``shards``) with the transform for that split."""
    transform = build_transform(split == 'train', config)
    if shards is not None:
        return ShardDataset(shards, split, transform, skip_corrupt=config.DATA.SKIP_CORRUPT)
    return ImageFolder(folder_of(root, split), transform, skip_corrupt=config.DATA.SKIP_CORRUPT)


def build_mixup(config, num_classes: int) -> Optional[Mixup]:
    """timm Mixup/CutMix with label smoothing, or None when both are off."""
    if config.AUG.MIXUP <= 0 and config.AUG.CUTMIX <= 0 and config.AUG.CUTMIX_MINMAX is None:
        return None
    return Mixup(mixup_alpha=config.AUG.MIXUP, cutmix_alpha=config.AUG.CUTMIX, cutmix_minmax=config.AUG.CUTMIX_MINMAX,
                 prob=config.AUG.MIXUP_PROB, switch_prob=config.AUG.MIXUP_SWITCH_PROB, mode=config.AUG.MIXUP_MODE,
                 label_smoothing=config.MODEL.LABEL_SMOOTHING, num_classes=num_classes)


@dataclass
class ClassificationData:
    """A classification data set's two splits for this process."""
    classes: List[str]
    train_images: int
    val_images: int
    train: Iterable  # build_train_loader's (or the DALI loader's) resumable training batches
    val: Iterable  # every validation sample once over all processes


def _same_classes(train: List[str], val: List[str], root: str) -> None:
    check_same_classes(train, val, f'{root}: train and val have different class sets')


def build_loader(config, check_classes: Optional[Callable[[List[str]], None]] = None) -> ClassificationData:
    """The training and validation data of an ImageFolder root or of shards, through PyTorch's
    DataLoader or (DATA.LOADER dali) NVIDIA DALI. ``check_classes`` sees the training classes as soon
    as they are known (a shard index, a folder's class folders), before any image is listed or fetched."""
    root = resolve_data_path(config)
    shards = None
    if reads_shards(root, config):
        shards = ShardSet(root, config.DATA.SHARD_CACHE, config.DATA.FETCH_RETRIES, config.DATA.FETCH_TIMEOUT)
        if check_classes is not None:
            check_classes(shards.classes('train'))
        shards.prefetch(['val'] if config.EVAL_MODE else ['train', 'val'])  # an evaluation reads no train shard
    elif check_classes is not None:
        folder = folder_of(root, 'train')
        try:
            classes = find_classes(folder)[0]
        except OSError as error:  # no class folder in it, or unreadable
            raise DataError(f'{folder}: {error}') from error
        check_classes(classes)
    if config.DATA.LOADER == 'dali':
        return _build_dali(config, root, shards)
    dataset_train = build_dataset('train', root, config, shards)
    dataset_val = build_dataset('val', root, config, shards)
    _same_classes(dataset_train.classes, dataset_val.classes, root)
    return ClassificationData(dataset_train.classes, len(dataset_train), len(dataset_val),
                              build_train_loader(dataset_train, config), build_eval_loader(dataset_val, config))


def _build_dali(config, root: str, shards: Optional[ShardSet]) -> ClassificationData:
    from .dali import FolderSplit, ShardSplit, build_dali_loaders  # DALI is optional

    def split_of(split: str):
        if shards is not None:
            return ShardSplit(tars=[str(p) for p in shards.local_paths(split)],
                              indexes=[str(p) for p in shards.index_paths(split)],
                              samples=shards.split(split)['samples'], classes=shards.classes(split))
        folder = ImageFolder(folder_of(root, split), transform=None)  # its listing errors name the folder
        return FolderSplit(samples=folder.samples, classes=folder.classes)

    train, val = split_of('train'), split_of('val')
    _same_classes(train.classes, val.classes, root)
    train_loader, val_loader = build_dali_loaders(config, train, val)
    return ClassificationData(train.classes, train_loader.num_samples, val_loader.num_samples, train_loader,
                              val_loader)
