"""ImageFolder data sets with timm transforms, distributed samplers and Mixup/CutMix."""
from __future__ import annotations

import logging
import os
import random
from contextlib import contextmanager
from typing import Iterator, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, Mixup, create_transform
from torch.utils.data import DataLoader, DistributedSampler, Sampler
from torchvision import datasets

from .digits import materialize_digits

logger = logging.getLogger(__name__)


class DataError(Exception):
    """Bad input data (missing folders, empty classes, unreadable images): reported as one line."""


class SkippingSampler(DistributedSampler):
    """Shuffling DistributedSampler (``drop_last``) that can start part-way into an epoch: after a
    resume, the samples this rank already trained on in that epoch are left out."""

    def __init__(self, dataset, num_replicas: int, rank: int, seed: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Shuffle for ``epoch`` and leave out its first ``skip`` samples of this rank (already trained on)."""
        super().set_epoch(epoch)
        self.skip = skip

    def __iter__(self):
        return iter(list(super().__iter__())[self.skip:])

    def __len__(self) -> int:
        return self.num_samples - self.skip


class ResumableSampler(SkippingSampler):
    """SkippingSampler that yields ``(epoch, index)`` pairs.

    The epoch travels with each index so that :class:`SeededImageFolder` can seed every sample's
    augmentation from (seed, epoch, index) alone, in whichever worker process it lands."""

    def __iter__(self):
        return ((self.epoch, index) for index in super().__iter__())


@contextmanager
def _seeded(seed: int):
    """Seed python, numpy and torch for one sample, then put their previous states back (loading
    in the main process must not disturb the training RNG)."""
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])


class SeededImageFolder(datasets.ImageFolder):
    """ImageFolder whose random augmentation depends only on (seed, epoch, index), so a resumed run
    sees the very images an uninterrupted one would; unreadable images raise :class:`DataError` naming
    the file, or with ``skip_corrupt`` are replaced by the next readable image and counted."""

    def __init__(self, root: str, transform, seed: int = 0, skip_corrupt: bool = False):
        try:
            super().__init__(root, transform=transform)
        except FileNotFoundError as error:  # no class folders, or a class folder without images
            raise DataError(f'{root}: {error}') from error
        self.seed = seed
        self.skip_corrupt = skip_corrupt
        self.skipped = 0

    def _load(self, index: int):
        path = self.samples[index][0]
        try:
            return self.loader(path)
        except (OSError, ValueError) as error:
            raise DataError(f'cannot read image {path}: {error}') from error

    def __getitem__(self, key):
        epoch, index = key if isinstance(key, tuple) else (0, key)
        with _seeded(hash((self.seed, epoch, index)) % 2 ** 32):
            return self._get(index)

    def _get(self, index: int):
        for attempt in range(len(self.samples)):
            try:
                image = self._load((index + attempt) % len(self.samples))
                break
            except DataError as error:
                if not self.skip_corrupt:
                    raise
                self.skipped += 1
                logger.warning(f'{error}; skipped (DATA.SKIP_CORRUPT), {self.skipped} so far in this worker')
        target = self.targets[(index + attempt) % len(self.samples)]
        return self.transform(image), target


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
    raise DataError('no data: set DATA.DATA_PATH (or --data-path) to an ImageFolder root with train/ and val/')


def build_dataset(split: str, root: str, config) -> SeededImageFolder:
    """The ImageFolder ``root/split`` with the transform for that split."""
    folder = os.path.join(root, split)
    if not os.path.isdir(folder):
        raise DataError(f'data folder not found: {folder} (DATA.DATA_PATH must hold train/ and val/ ImageFolders)')
    return SeededImageFolder(folder, build_transform(split == 'train', config), seed=config.SEED,
                             skip_corrupt=config.DATA.SKIP_CORRUPT)


def build_mixup(config, num_classes: int) -> Optional[Mixup]:
    """timm Mixup/CutMix with label smoothing, or None when both are off."""
    if config.AUG.MIXUP <= 0 and config.AUG.CUTMIX <= 0 and config.AUG.CUTMIX_MINMAX is None:
        return None
    return Mixup(mixup_alpha=config.AUG.MIXUP, cutmix_alpha=config.AUG.CUTMIX, cutmix_minmax=config.AUG.CUTMIX_MINMAX,
                 prob=config.AUG.MIXUP_PROB, switch_prob=config.AUG.MIXUP_SWITCH_PROB, mode=config.AUG.MIXUP_MODE,
                 label_smoothing=config.MODEL.LABEL_SMOOTHING, num_classes=num_classes)


def _loader(dataset, sampler, config, drop_last: bool, batch_size: int) -> DataLoader:
    workers = config.DATA.NUM_WORKERS
    # A private generator: creating loader iterators must not draw from the global RNG that a
    # resumed run restores (it drives drop path and Mixup).
    return DataLoader(dataset, sampler=sampler, batch_size=batch_size, num_workers=workers,
                      pin_memory=config.DATA.PIN_MEMORY and torch.cuda.is_available(), drop_last=drop_last,
                      persistent_workers=workers > 0, prefetch_factor=config.DATA.PREFETCH_FACTOR if workers else None,
                      generator=torch.Generator().manual_seed(config.SEED))


def build_loader(config):
    """(train set, val set, train loader, val loader, mixup_fn) for this process's rank."""
    root = resolve_data_path(config)
    dataset_train = build_dataset('train', root, config)
    dataset_val = build_dataset('val', root, config)
    if dataset_val.classes != dataset_train.classes:
        raise DataError(f'{root}: train/ and val/ have different class folders')
    rank, world_size = _rank_world()
    if len(dataset_train) // world_size < config.DATA.BATCH_SIZE:
        raise DataError(f'DATA.BATCH_SIZE {config.DATA.BATCH_SIZE} per process x {world_size} process(es) is larger '
                        f'than the {len(dataset_train)} training images in {root}/train: lower --batch-size')
    sampler_train = ResumableSampler(dataset_train, num_replicas=world_size, rank=rank, seed=config.SEED)
    loader_train = _loader(dataset_train, sampler_train, config, drop_last=True, batch_size=config.DATA.BATCH_SIZE)
    loader_val = _loader(dataset_val, ShardSampler(len(dataset_val), rank, world_size), config, drop_last=False,
                         batch_size=config.DATA.BATCH_SIZE)
    mixup_fn = build_mixup(config, len(dataset_train.classes))
    return dataset_train, dataset_val, loader_train, loader_val, mixup_fn
