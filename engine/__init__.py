"""The one run engine: image classification (``main.py``), detection and segmentation all train and
evaluate through it.

A task supplies its data, model, loss and metric (``task.Task``). The engine owns the rest:
processes and devices, mixed precision and loss scaling, gradient accumulation and clipping, EMA,
non-finite steps, logging, checkpoints, resume and preemption, so that a change to any of them is
made once and holds for every task.

    session = start(config)                     # processes, threads, run folder, log
    train_or_evaluate(MyTask(session))          # --eval: evaluate MODEL.RESUME; else train, resuming

``task.py`` holds the contract, ``trainer.py`` the loop, ``checkpoints.py`` what a checkpoint holds and
which one a run resumes.
"""
from __future__ import annotations

import os
import socket
import tempfile
from typing import Callable, Dict, List, Optional

import torch
import torch.nn as nn

import slurm
from config import output_dir, parse_command_line
from logger import create_logger
from utils import (ConfigError, DataError, FolderLock, UserInputError, agree, amp_dtype, cpu_group,
                   fit_cpu_threads, gather_objects, init_distributed, is_distributed, keep_freed_memory,
                   leftover_temporaries, load_checkpoint_file, prepare_together, run_entry_point,
                   seed_everything)

from .checkpoints import config_changes, load_weights
from .task import Session, StatefulLoader, Task, TaskData, TrainLoader
from .trainer import BatchNormGuard, Trainer, evaluate, sync_batchnorm

__all__ = ['BatchNormGuard', 'Session', 'StatefulLoader', 'Task', 'TaskData', 'TrainLoader', 'Trainer', 'build_model',
           'check_config', 'claim_run_folder', 'config_changes', 'evaluate', 'load_weights', 'main', 'start',
           'sync_batchnorm', 'to_device', 'train_or_evaluate']


RUN_LOCK = 'run.lock'  # held by a training run's rank 0 for the run's lifetime


def _writable_folder(out_dir: str) -> Optional[UserInputError]:
    try:
        os.makedirs(out_dir, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out_dir, prefix='.write-test-')
        os.close(fd)
        os.remove(probe)
    except OSError as error:
        return UserInputError(f'cannot write to the output folder {out_dir} (--output / OUTPUT): {error}')
    return None


def start(config) -> Session:
    """Join the other processes (under torchrun, or as Slurm's tasks under srun), fit the CPU threads,
    make the run folder and the log; before any data is read. A folder that one process cannot write
    stops every process."""
    os.environ.update(slurm.torch_environment())
    slurm.record_time_limit_signal()
    rank, world_size, device = init_distributed(config.DEVICE, config.DIST_TIMEOUT)
    out_dir = output_dir(config)
    agree(_writable_folder(out_dir))
    logger = create_logger(out_dir, rank, name=config.MODEL.NAME)
    lowered = fit_cpu_threads(1 if slurm.task_has_own_cpus() else int(os.environ.get('LOCAL_WORLD_SIZE', 1)))
    heap_reuse = device.type == 'cpu' and keep_freed_memory()
    seed_everything(config.SEED + rank)
    precision = amp_dtype(config, device)
    logger.info(f'{world_size} process(es) on {device}; {torch.get_num_threads()} CPU threads per process'
                + (f' (lowered from {lowered[0]} so that the processes fit the cores this job may use)'
                   if lowered else '')
                + f'; {"autocast " + str(precision).split(".")[-1] if precision else "fp32"}'
                + ('; large blocks kept on the heap for reuse (glibc mallopt)' if heap_reuse else ''))
    job = slurm.job_description()
    if job:
        logger.info(job)
    return Session(config, rank, world_size, device, out_dir, logger)


def claim_run_folder(session: Session) -> None:
    """For a training run: rank 0 takes the run folder's lock for the run's lifetime (a second
    training run there is refused with one line) and then removes the temporary files that killed
    saves left, which no live run can be writing any more. --eval, --throughput and --export take
    no lock and remove nothing."""
    problem = None
    if session.rank == 0:
        try:
            lock, holder = FolderLock.try_take(session.out_dir, RUN_LOCK)
        except OSError as error:
            session.logger.warning(f'cannot lock {session.out_dir} ({error.strerror}): this file system has no file '
                                   'locks, so a second training run in this folder would not be refused')
        else:
            if lock is None:
                problem = UserInputError(f'{session.out_dir} is in use by another training run ({holder}); wait for '
                                         'it to end, or start a separate run with --tag NAME (or another --output)')
            else:
                session.run_lock = lock
                for path, _ in leftover_temporaries(session.out_dir):
                    os.remove(path)
                    session.logger.info(f'removed {os.path.basename(path)}, left by a save that was killed')
    agree(problem)


def check_same_data(data: TaskData) -> None:
    """Every process must read the same data set (classes, size): a node whose local copy is incomplete
    or of another version would otherwise train other steps per epoch and leave the rest waiting."""
    if not is_distributed():
        return
    seen = gather_objects((data.identity, socket.gethostname()), group=cpu_group())
    others = [(rank, identity, host) for rank, (identity, host) in enumerate(seen) if identity != seen[0][0]]
    if others:
        rank, identity, host = others[0]
        keys = [key for key in identity if identity[key] != seen[0][0].get(key)]
        raise DataError(f'the processes read different data: rank 0 on {seen[0][1]} has {_summary(seen[0][0], keys)}, '
                        f'rank {rank} on {host} has {_summary(identity, keys)} ({len(others)} of {len(seen)} processes '
                        'differ from rank 0). Every node must read the same data set: check DATA.DATA_PATH on each node')


def _summary(identity: dict, keys: List[str]) -> str:
    """``identity``'s ``keys`` in words: a count, or the number of names and the first few."""
    return ', '.join(f'{key} {identity.get(key)}' if not isinstance(identity.get(key), (list, tuple)) else
                     f'{len(identity[key])} {key} ({", ".join(map(str, identity[key][:3]))} ...)' for key in keys)


def check_config(task: Task) -> None:
    """``task.check_config()``, its ValueError a config error (one line)."""
    try:
        task.check_config()
    except ValueError as error:
        raise ConfigError(str(error)) from error


def build_model(task: Task) -> nn.Module:
    """``task.build_model()`` (on the CPU), its size logged; a bad architecture argument is a config error."""
    try:
        model = task.build_model()
    except ValueError as error:
        raise ConfigError(str(error)) from error
    n_params = sum(p.numel() for p in model.parameters())
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    task.logger.info(f'{task.config.MODEL.NAME}: {n_params:,} parameters ({n_trainable:,} trainable)')
    return model


def to_device(model: nn.Module, session: Session) -> nn.Module:
    """``model`` on the run's device, in the channels_last memory format with CHANNELS_LAST."""
    model.to(session.device)
    if session.config.CHANNELS_LAST:
        model.to(memory_format=torch.channels_last)
    return model


def train_or_evaluate(task: Task) -> Dict[str, float]:
    """With EVAL_MODE evaluate MODEL.RESUME; otherwise train, resuming where the run folder (or
    MODEL.RESUME) left off. Returns the last metrics."""
    session, config = task.session, task.config
    check_config(task)
    if not config.EVAL_MODE:
        claim_run_folder(session)
    data = prepare_together(task.build_data, session.device, session.logger)
    check_same_data(data)
    session.logger.info(data.description)
    model = to_device(build_model(task), session)
    task.on_device(model)
    if not config.EVAL_MODE:
        return Trainer(task, data, model).fit()
    if not config.MODEL.RESUME:
        raise UserInputError('--eval needs a checkpoint: pass --resume CKPT')
    load_weights(model, task.weights(load_checkpoint_file(config.MODEL.RESUME)), config.MODEL.RESUME)
    session.logger.info(f'config:\n{config.dump()}')
    metrics = evaluate(task, task.for_inference(model), data.val)
    session.logger.info(task.summary(metrics))
    return metrics


def main(task_class: Callable[[Session], Task], description: str, defaults, choices: Optional[dict] = None) -> None:
    """A task's command-line entry point: parse, start, then train or evaluate (errors and stop
    signals as ``utils.run_entry_point``)."""
    run_entry_point(lambda: train_or_evaluate(task_class(start(parse_command_line(description, defaults, choices)))))
