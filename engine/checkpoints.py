"""Checkpoints of a run folder: which one a run resumes, reading it on every process, writing them.

A training checkpoint holds the trainer's state (``Trainer.state_dict``) plus the run's identity:
the architecture (a hash of the state dict's keys and shapes) and the data set (the task's
``TaskData.identity``). A run folder holds one experiment; a run of another identity is refused.
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
from typing import Dict, List, Optional

import torch.nn as nn
import yaml

from utils import (CHECKPOINT_BEST, CHECKPOINT_LAST, CheckpointError, atomic_save, checkpoint_files,
                   epoch_checkpoint_name, gather_objects, load_checkpoint_file, prune_epoch_checkpoints,
                   state_dict_mismatch)

# What a training checkpoint holds beyond the weights; a file without them cannot be resumed.
CHECKPOINT_KEYS = ('model', 'optimizer', 'optimizer_params', 'scaler', 'epoch', 'step', 'steps_per_epoch',
                   'samples_per_step', 'best_metric', 'nonfinite_steps', 'rng', 'config', 'identity')
# Keys that say how a run is launched, not what it trains: never reported as changed on resume.
# Folders and their shards hold the same samples in the same order (data/shards.py).
_LAUNCH_KEYS = ('MODEL.RESUME', 'EVAL_MODE', 'THROUGHPUT_MODE', 'OUTPUT', 'DATA.DATA_PATH', 'DATA.FORMAT',
                'DATA.SHARD_CACHE', 'DATA.NUM_WORKERS', 'DATA.PREFETCH_FACTOR', 'DATA.PIN_MEMORY', 'DEVICE')


def load_weights(model: nn.Module, state: dict, path: str) -> None:
    """Load ``state`` into ``model``, or name the keys that keep it from fitting."""
    report = state_dict_mismatch(model.state_dict(), state)
    if report:
        raise CheckpointError(f'{path} does not fit this model (another MODEL.VARIANT, MODEL.FAT or class count?): '
                              f'{report}')
    model.load_state_dict(state)


def architecture_signature(model: nn.Module) -> str:
    """A short hash of the state dict's keys and shapes: equal for models that take each other's weights."""
    layout = ';'.join(f'{k}:{tuple(v.shape)}' for k, v in sorted(model.state_dict().items()))
    return hashlib.sha256(layout.encode()).hexdigest()[:16]


def _flatten(node: dict, prefix: str = '') -> Dict[str, object]:
    flat = {}
    for key, value in node.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f'{prefix}{key}.'))
        else:
            flat[f'{prefix}{key}'] = value
    return flat


def config_changes(saved_yaml: str, config) -> List[str]:
    """``KEY old -> new`` for every key whose value differs from a checkpoint's config."""
    old, new = _flatten(yaml.safe_load(saved_yaml) or {}), _flatten(yaml.safe_load(config.dump()))
    return [f'{key} {old.get(key)!r} -> {new.get(key)!r}' for key in sorted(set(old) | set(new))
            if old.get(key) != new.get(key) and key not in _LAUNCH_KEYS]


def _foreign(out_dir: str, path: str, checkpoint: dict, identity: dict, config) -> str:
    what = 'architecture' if checkpoint['identity']['architecture'] != identity['architecture'] else 'data'
    changed = [c for c in config_changes(checkpoint['config'], config) if c.startswith(('MODEL.', 'DATA.', 'DET.',
                                                                                        'SEG.'))]
    return (f'{out_dir} holds a run with another {what} ({path}' + (f': {"; ".join(changed[:4])}' if changed else '')
            + '); start a separate run with --tag NAME (or another --output) instead of resuming it')


def survey(out_dir: str, identity: dict, config, logger: logging.Logger) -> dict:
    """A look at a run folder (by one process): the checkpoint to resume (MODEL.RESUME, or with
    TRAIN.AUTO_RESUME the newest in training by the epoch and step stored inside, whatever the file
    times say), the best metric any of its checkpoints saw, and a refusal when the folder holds a run
    of another identity. Unreadable and incomplete files are reported and passed over."""
    newest, best_seen, foreign = None, -math.inf, None
    for path in checkpoint_files(out_dir):
        try:
            checkpoint = load_checkpoint_file(path, lazy=True)
        except CheckpointError as error:
            logger.warning(f'skipping {path}: {error}')
            continue
        missing = [key for key in CHECKPOINT_KEYS if key not in checkpoint]
        if missing:
            logger.warning(f'skipping {path}: not a training checkpoint (missing {", ".join(missing)})')
            continue
        if checkpoint['identity'] != identity and foreign is None:
            foreign = _foreign(out_dir, path, checkpoint, identity, config)
        best_seen = max(best_seen, checkpoint['best_metric'])
        position = (checkpoint['epoch'], checkpoint['step'] / checkpoint['steps_per_epoch'])
        if os.path.basename(path) != CHECKPOINT_BEST and (newest is None or position > newest[0]):
            newest = (position, path)
    path = config.MODEL.RESUME or (newest[1] if newest and config.TRAIN.AUTO_RESUME else None)
    return {'path': path, 'best_seen': best_seen, 'foreign': foreign}


def load_agreed(path: str, world_size: int) -> dict:
    """Every process reads ``path``; if any cannot, all stop with the same one-line error."""
    try:
        checkpoint, problem = load_checkpoint_file(path), ''
    except CheckpointError as error:
        checkpoint, problem = None, str(error)
    problems = [p for p in gather_objects(problem) if p]
    if problems:
        raise CheckpointError(problems[0] + (f' (on {len(problems)} of {world_size} processes)' if world_size > 1
                                             else ''))
    missing = [key for key in CHECKPOINT_KEYS if key not in checkpoint]
    if missing:
        raise CheckpointError(f'{path} holds no training state (missing {", ".join(missing)}; a bare state dict or '
                              f'the authors\' checkpoint?): to start training from its weights use --pretrained '
                              f'{path}, --resume continues a run of this project')
    return checkpoint


def write(out_dir: str, state: dict, periodic: bool, is_best: bool, keep: int, logger: logging.Logger) -> None:
    """Write ckpt_epoch_N.pth when ``periodic`` (keeping the newest ``keep``), ckpt_best.pth when
    ``is_best``, and always ckpt_last.pth, each atomically."""
    if periodic:
        atomic_save(state, os.path.join(out_dir, epoch_checkpoint_name(state['epoch'])))
        for name in prune_epoch_checkpoints(out_dir, keep):
            logger.info(f'removed {name} (SAVE_KEEP {keep})')
    if is_best:
        atomic_save(state, os.path.join(out_dir, CHECKPOINT_BEST))
    last = os.path.join(out_dir, CHECKPOINT_LAST)
    atomic_save(state, last)
    logger.info(f'saved {last} (epoch {state["epoch"]}, step {state["step"]})')


def resume_position(checkpoint: dict, samples_per_step: int, steps_per_epoch: int, accumulation: int,
                    logger: logging.Logger) -> tuple:
    """(epoch, micro-batches done) to continue from: the checkpoint's, or the nearest step boundary
    when this run's batches per step or epoch differ (not bit-exact then, and said so)."""
    epoch, step = checkpoint['epoch'], checkpoint['step']
    if step >= checkpoint['steps_per_epoch']:
        return epoch, steps_per_epoch
    if checkpoint['samples_per_step'] != samples_per_step or checkpoint['steps_per_epoch'] != steps_per_epoch:
        done = step * checkpoint['samples_per_step'] // samples_per_step
        step = done - done % accumulation
        logger.warning(f'the batches differ from the checkpoint\'s: epoch {epoch} continues at step {step} of '
                       f'{steps_per_epoch}, not bit-exactly')
    return epoch, step


def optimizer_state_by_name(checkpoint: dict, names: List[str]) -> Dict[int, dict]:
    """The checkpoint's optimizer state for parameters ``names`` (this run's order), matched by name."""
    saved_names = checkpoint['optimizer_params']
    saved = {saved_names[index]: value for index, value in checkpoint['optimizer']['state'].items()}
    return {index: saved[name] for index, name in enumerate(names) if name in saved}


def describe_rng(checkpoint: dict, world_size: int) -> Optional[str]:
    """Why the random states cannot be restored, or None when they can."""
    if len(checkpoint['rng']) == world_size:
        return None
    return (f'it was written by {len(checkpoint["rng"])} process(es), this run has {world_size}: random states are '
            'not restored, so the run continues but not bit-exactly')
