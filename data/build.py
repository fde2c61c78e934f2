"""ImageFolder data sets with timm transforms, distributed samplers and Mixup/CutMix."""
from __future__ import annotations

import logging
import os
from typing import Iterator, Optional, Tuple

import torch
import torch.distributed as dist
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, Mixup, create_transform
from torch.utils.data import DataLoader, DistributedSampler, Sampler
from torchvision import datasets

from .digits import materialize_digits

logger = logging.getLogger(__name__)


class ShardSampler(Sampler[int]):
    """Every rank takes indices rank, rank + world, ...: each sample is seen exactly once in total,
    so all-reduced sums give exact validation metrics (DistributedSampler pads with repeats)."""

    def __init__(self, dataset_len: int, rank: int, world_size: int):
        self.indices = range(rank, dataset_len, world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def _rank_world() -> Tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def build_transform(is_train: bool, config):
    """timm's ImageNet transforms: RandAugment, colour jitter, random erasing for training; resize
    (and centre crop when TEST.CROP) for evaluation."""
    mean, std = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    if is_train:
        return create_transform(
            input_size=config.DATA.IMG_SIZE, is_training=True, scale=tuple(config.AUG.SCALE),
            hflip=config.AUG.HFLIP, color_jitter=config.AUG.COLOR_JITTER or None,
            auto_augment=None if config.AUG.AUTO_AUGMENT == 'none' else config.AUG.AUTO_AUGMENT,
            re_prob=config.AUG.REPROB, re_mode=config.AUG.REMODE, re_count=config.AUG.RECOUNT,
            interpolation=config.DATA.INTERPOLATION, mean=mean, std=std)
    return create_transform(
        input_size=config.DATA.IMG_SIZE, is_training=False, interpolation=config.DATA.INTERPOLATION,
        crop_pct=config.TEST.CROP_PCT if config.TEST.CROP else 1.0, mean=mean, std=std)


def resolve_data_path(config) -> str:
    """DATA.DATA_PATH, or for DATA.DATASET 'digits' without one, the digits made on first use."""
    if config.DATA.DATA_PATH:
        return config.DATA.DATA_PATH
    if config.DATA.DATASET == 'digits':
        rank, _ = _rank_world()
        if rank == 0:
            materialize_digits()
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
        return str(materialize_digits())
    raise ValueError('no data: set DATA.DATA_PATH (or --data-path) to an ImageFolder root with train/ and val/')


def build_dataset(split: str, root: str, config) -> datasets.ImageFolder:
    """The ImageFolder ``root/split`` with the transform for that split."""
    folder = os.path.join(root, split)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f'data folder not found: {folder} (DATA.DATA_PATH must hold train/ and val/)')
    return datasets.ImageFolder(folder, transform=build_transform(split == 'train', config))


def build_mixup(config, num_classes: int) -> Optional[Mixup]:
    """timm Mixup/CutMix with label smoothing, or None when both are off."""
    if config.AUG.MIXUP <= 0 and config.AUG.CUTMIX <= 0 and config.AUG.CUTMIX_MINMAX is None:
        return None
    return Mixup(mixup_alpha=config.AUG.MIXUP, cutmix_alpha=config.AUG.CUTMIX, cutmix_minmax=config.AUG.CUTMIX_MINMAX,
                 prob=config.AUG.MIXUP_PROB, switch_prob=config.AUG.MIXUP_SWITCH_PROB, mode=config.AUG.MIXUP_MODE,
                 label_smoothing=config.MODEL.LABEL_SMOOTHING, num_classes=num_classes)


def _loader(dataset, sampler, config, drop_last: bool, batch_size: int) -> DataLoader:
    workers = config.DATA.NUM_WORKERS
    return DataLoader(dataset, sampler=sampler, batch_size=batch_size, num_workers=workers,
                      pin_memory=config.DATA.PIN_MEMORY and torch.cuda.is_available(), drop_last=drop_last,
                      persistent_workers=workers > 0, prefetch_factor=config.DATA.PREFETCH_FACTOR if workers else None)


def build_loader(config):
    """(train set, val set, train loader, val loader, mixup_fn) for this process's rank."""
    root = resolve_data_path(config)
    dataset_train = build_dataset('train', root, config)
    dataset_val = build_dataset('val', root, config)
    if dataset_val.classes != dataset_train.classes:
        raise ValueError(f'{root}: train/ and val/ have different class folders')
    rank, world_size = _rank_world()
    sampler_train = DistributedSampler(dataset_train, num_replicas=world_size, rank=rank, shuffle=True,
                                       seed=config.SEED, drop_last=True)
    loader_train = _loader(dataset_train, sampler_train, config, drop_last=True, batch_size=config.DATA.BATCH_SIZE)
    loader_val = _loader(dataset_val, ShardSampler(len(dataset_val), rank, world_size), config, drop_last=False,
                         batch_size=config.DATA.BATCH_SIZE)
    mixup_fn = build_mixup(config, len(dataset_train.classes))
    return dataset_train, dataset_val, loader_train, loader_val, mixup_fn
