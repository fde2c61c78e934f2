"""Samplers, per-sample seeding and the one DataLoader builder that every task uses, plus the
ImageFolder data of image classification (timm transforms, Mixup/CutMix)."""
from __future__ import annotations

import logging
import os
import random
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

import numpy as np
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, Mixup, create_transform
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from torchvision import datasets

from utils import DataError, SampleError, is_distributed, rank_world

from .digits import materialize_digits

logger = logging.getLogger(__name__)


class ResumableSampler(DistributedSampler):
    """Shuffling DistributedSampler (``drop_last``) that yields ``(epoch, index)`` pairs and can start
    part-way into an epoch.

    The epoch travels with each index so that :class:`SeededSamples` can seed every sample's
    augmentation from (seed, epoch, index) alone, in whichever worker it lands; ``skip`` leaves out
    the samples this rank already trained on before a resume."""

    def __init__(self, dataset, num_replicas: int, rank: int, seed: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Shuffle for ``epoch`` and leave out its first ``skip`` samples of this rank (already trained on)."""
        super().set_epoch(epoch)
        self.skip = skip

    def __iter__(self):
        return ((self.epoch, index) for index in list(super().__iter__())[self.skip:])

    def __len__(self) -> int:
        return self.num_samples - self.skip


class ShardSampler(Sampler[int]):
    """Every rank takes indices rank, rank + world, ...: each sample is seen exactly once in total,
    so all-reduced sums give exact evaluation metrics (DistributedSampler pads with repeats)."""

    def __init__(self, dataset_len: int, rank: int, world_size: int):
        self.indices = range(rank, dataset_len, world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


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


class SeededSamples(Dataset):
    """``dataset`` indexed by :class:`ResumableSampler`'s ``(epoch, index)``: its random augmentation
    depends only on (seed, epoch, index), so a resumed run sees the very samples an uninterrupted one
    would."""

    def __init__(self, dataset, seed: int):
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, index = key
        with _seeded(hash((self.seed, epoch, index)) % 2 ** 32):
            return self.dataset[index]


def loader_kwargs(config) -> dict:
    """The DataLoader arguments every loader of a run shares."""
    workers = config.DATA.NUM_WORKERS
    return dict(num_workers=workers, persistent_workers=workers > 0,
                prefetch_factor=config.DATA.PREFETCH_FACTOR if workers else None,
                pin_memory=config.DATA.PIN_MEMORY and config.DEVICE != 'cpu' and torch.cuda.is_available(),
                # A private generator: creating loader iterators must not draw from the global RNG
                # that a resumed run restores (it drives drop path and Mixup).
                generator=torch.Generator().manual_seed(config.SEED))


def build_train_loader(dataset, config, collate_fn: Optional[Callable] = None) -> DataLoader:
    """This process's shuffled, per-sample-seeded, resumable training batches of ``dataset``
    (``loader.sampler.set_epoch(epoch, skip)`` picks the epoch and where in it to start)."""
    rank, world_size = rank_world()
    if len(dataset) // world_size < config.DATA.BATCH_SIZE:
        raise DataError(f'DATA.BATCH_SIZE {config.DATA.BATCH_SIZE} per process x {world_size} process(es) is larger '
                        f'than the {len(dataset)} training images: lower --batch-size')
    sampler = ResumableSampler(dataset, num_replicas=world_size, rank=rank, seed=config.SEED)
    return DataLoader(SeededSamples(dataset, config.SEED), sampler=sampler, batch_size=config.DATA.BATCH_SIZE,
                      drop_last=True, collate_fn=collate_fn, **loader_kwargs(config))


def build_eval_loader(dataset, config, batch_size: Optional[int] = None,
                      collate_fn: Optional[Callable] = None) -> DataLoader:
    """This process's share of ``dataset`` for evaluation: every sample once over all processes."""
    rank, world_size = rank_world()
    return DataLoader(dataset, sampler=ShardSampler(len(dataset), rank, world_size),
                      batch_size=batch_size or config.DATA.BATCH_SIZE, collate_fn=collate_fn, **loader_kwargs(config))


# --- image classification -------------------------------------------------------------------------

class ImageFolder(datasets.ImageFolder):
    """torchvision's ImageFolder whose errors name the folder or file: an unreadable image raises
    :class:`SampleError`, or with ``skip_corrupt`` is replaced by the next readable one and
    counted."""

    def __init__(self, root: str, transform, skip_corrupt: bool = False):
        try:
            super().__init__(root, transform=transform)
        except FileNotFoundError as error:  # no class folders, or a class folder without images
            raise DataError(f'{root}: {error}') from error
        self.skip_corrupt = skip_corrupt
        self.skipped = 0

    def _load(self, index: int):
        path = self.samples[index][0]
        try:
            return self.loader(path)
        except (OSError, ValueError) as error:
            raise SampleError(f'cannot read image {path}: {error}') from error

    def __getitem__(self, index: int):
        for attempt in range(len(self.samples)):
            position = (index + attempt) % len(self.samples)
            try:
                image = self._load(position)
            except SampleError as error:
                if not self.skip_corrupt:
                    raise
                self.skipped += 1
                logger.warning(f'{error}; skipped (DATA.SKIP_CORRUPT), {self.skipped} so far in this worker')
                continue
            return self.transform(image), self.targets[position]
        raise SampleError(f'{self.root}: none of its {len(self.samples)} images can be read '
                                    '(DATA.SKIP_CORRUPT skipped every one)')


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
        if rank_world()[0] == 0:
            materialize_digits()
        if is_distributed():
            torch.distributed.barrier()
        return str(materialize_digits())
    raise DataError('no data: set DATA.DATA_PATH (or --data-path) to an ImageFolder root with train/ and val/')


def build_dataset(split: str, root: str, config) -> ImageFolder:
    """The ImageFolder ``root/split`` with the transform for that split."""
    folder = os.path.join(root, split)
    if not os.path.isdir(folder):
        raise DataError(f'data folder not found: {folder} (DATA.DATA_PATH must hold train/ and val/ ImageFolders)')
    return ImageFolder(folder, build_transform(split == 'train', config), skip_corrupt=config.DATA.SKIP_CORRUPT)


def build_mixup(config, num_classes: int) -> Optional[Mixup]:
    """timm Mixup/CutMix with label smoothing, or None when both are off."""
    if config.AUG.MIXUP <= 0 and config.AUG.CUTMIX <= 0 and config.AUG.CUTMIX_MINMAX is None:
        return None
    return Mixup(mixup_alpha=config.AUG.MIXUP, cutmix_alpha=config.AUG.CUTMIX, cutmix_minmax=config.AUG.CUTMIX_MINMAX,
                 prob=config.AUG.MIXUP_PROB, switch_prob=config.AUG.MIXUP_SWITCH_PROB, mode=config.AUG.MIXUP_MODE,
                 label_smoothing=config.MODEL.LABEL_SMOOTHING, num_classes=num_classes)


def build_loader(config):
    """(train set, val set, train loader, val loader) of an ImageFolder root for this process."""
    root = resolve_data_path(config)
    dataset_train = build_dataset('train', root, config)
    dataset_val = build_dataset('val', root, config)
    if dataset_val.classes != dataset_train.classes:
        raise DataError(f'{root}: train/ and val/ have different class folders')
    return dataset_train, dataset_val, build_train_loader(dataset_train, config), build_eval_loader(dataset_val, config)
