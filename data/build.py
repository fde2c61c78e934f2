"""Samplers, per-sample seeding and the one DataLoader builder that every task uses, plus the data of
image classification: ImageFolders or their shards (data/shards/), timm transforms, Mixup/CutMix,
and the choice of loader (PyTorch's, or NVIDIA DALI's in data/dali.py)."""
from __future__ import annotations

import atexit
import multiprocessing
import os
import random
import signal
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, List, Optional

import numpy as np
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, Mixup, create_transform
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, get_worker_info
from torchvision import datasets
from torchvision.datasets.folder import find_classes

from utils import STOP_SIGNALS, DataError, SampleError, rank_world

from .digits import materialize_digits
from .fetch import is_remote
from .shards import (UNREADABLE_IMAGE, ShardDataset, ShardSet, SkippingReader, check_same_classes,
                     is_shard_location)


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


class EvalSampler(Sampler[int]):
    """Every rank takes indices rank, rank + world, ...: each sample is seen exactly once in total,
    so all-reduced sums give exact evaluation metrics (DistributedSampler pads with repeats)."""

    def __init__(self, dataset_len: int, rank: int, world_size: int):
        self.indices = range(rank, dataset_len, world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def _seed_everything(seed: int) -> None:
    """Seed the generators the transforms draw from: python's, numpy's and torch's CPU generator
    (``torch.manual_seed`` would also visit every accelerator's, at ~100 us a sample)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.default_generator.manual_seed(seed)


@contextmanager
def _seeded(seed: int):
    """Seed for one sample. In the main process (DATA.NUM_WORKERS 0) the previous states are put
    back afterwards: loading must not disturb the training RNG. A worker's own states matter to no
    one, so it skips saving them."""
    if get_worker_info() is not None:
        _seed_everything(seed)
        yield
        return
    states = random.getstate(), np.random.get_state(), torch.default_generator.get_state()
    _seed_everything(seed)
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.default_generator.set_state(states[2])


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


def _leave_stop_signals_to_the_main_process(worker_id: int) -> None:
    """A loader worker ignores the stop signals: SIGTERM, SIGINT and Slurm's time-limit SIGUSR1.
    Clusters signal every process of a job (Slurm) or its whole process group (torchrun), workers
    included; a worker that died of it would take the run down before the main process could save.
    The main process decides (utils.StopSignal)."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def _end_loader_workers() -> None:
    """At exit, kill the loader workers that are still alive (a loader kept by a reference cycle):
    multiprocessing's own exit handler would SIGTERM them, which they ignore, and then wait for them
    for ever. PyTorch's SIGCHLD handler, which would report each as killed, is put aside first."""
    workers = [child for child in multiprocessing.active_children() if child.daemon]  # DataLoader's are daemonic
    if workers:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for worker in workers:
        worker.kill()
        worker.join()


_exit_hook = []


def loader_kwargs(config) -> dict:
    """The DataLoader arguments every loader of a run shares."""
    workers = config.DATA.NUM_WORKERS
    if workers and not _exit_hook:
        atexit.register(_end_loader_workers)  # after multiprocessing's, so it runs before it
        _exit_hook.append(True)
    return dict(num_workers=workers, persistent_workers=workers > 0,
                worker_init_fn=_leave_stop_signals_to_the_main_process if workers else None,
                prefetch_factor=config.DATA.PREFETCH_FACTOR if workers else None,
                pin_memory=config.DATA.PIN_MEMORY and config.DEVICE != 'cpu' and torch.cuda.is_available(),
                # A private generator: creating loader iterators must not draw from the global RNG
                # that a resumed run restores (it drives drop path and Mixup).
                generator=torch.Generator().manual_seed(config.SEED))


class ResumableLoader:
    """``engine.TrainLoader`` over a DataLoader of :class:`SeededSamples` drawn by a
    :class:`ResumableSampler`: ``set_epoch(epoch, start_batch)`` tells the sampler to leave out the
    samples of the first ``start_batch`` batches, in the loader's own batch size."""

    def __init__(self, loader: DataLoader):
        self.loader = loader
        self.batches_per_epoch = len(loader)

    def __len__(self) -> int:
        return self.batches_per_epoch

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.loader.sampler.set_epoch(epoch, skip=start_batch * self.loader.batch_size)

    def __iter__(self):
        return iter(self.loader)


def build_train_loader(dataset, config, collate_fn: Optional[Callable] = None) -> ResumableLoader:
    """This process's shuffled, per-sample-seeded, resumable training batches of ``dataset``."""
    rank, world_size = rank_world()
    if len(dataset) // world_size < config.DATA.BATCH_SIZE:
        raise DataError(f'DATA.BATCH_SIZE {config.DATA.BATCH_SIZE} per process x {world_size} process(es) is larger '
                        f'than the {len(dataset)} training images: lower --batch-size')
    sampler = ResumableSampler(dataset, num_replicas=world_size, rank=rank, seed=config.SEED)
    return ResumableLoader(DataLoader(SeededSamples(dataset, config.SEED), sampler=sampler,
                                      batch_size=config.DATA.BATCH_SIZE, drop_last=True, collate_fn=collate_fn,
                                      **loader_kwargs(config)))


def build_eval_loader(dataset, config, batch_size: Optional[int] = None,
                      collate_fn: Optional[Callable] = None) -> DataLoader:
    """This process's share of ``dataset`` for evaluation: every sample once over all processes."""
    rank, world_size = rank_world()
    return DataLoader(dataset, sampler=EvalSampler(len(dataset), rank, world_size),
                      batch_size=batch_size or config.DATA.BATCH_SIZE, collate_fn=collate_fn, **loader_kwargs(config))


# --- image classification -------------------------------------------------------------------------

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
