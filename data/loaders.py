"""The loading every task shares: samplers, per-sample seeding, and the builders of its training
loader (an ``engine.TrainLoader``, resumable at a batch) and its evaluation loader."""
from __future__ import annotations

import atexit
import multiprocessing
import random
import signal
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, get_worker_info

from utils import STOP_SIGNALS, DataError, rank_world


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
