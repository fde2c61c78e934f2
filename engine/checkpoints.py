"""Checkpoints of a run folder: which one a run resumes, reading it on every process, writing them.

A training checkpoint holds the trainer's state (``Trainer.state_dict``) plus the run's identity:
the architecture (a hash of the state dict's keys and shapes) and the data set (the task's
``TaskData.identity``). A run folder holds one experiment; a run of another identity is refused.
Each checkpoint also counts the saves of its run (``saves``), so that pruning keeps the ones
written last. Nothing a user has is overwritten: checkpoints that cannot be read are set aside or
the run is refused.
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
from dataclasses import MISSING, dataclass, field, fields
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import yaml

import utils
from utils import (CHECKPOINT_BEST, CHECKPOINT_LAST, CheckpointError, atomic_save, checkpoint_files,
                   agree, epoch_checkpoint_name, epoch_of_checkpoint_name, load_checkpoint_file)

# The layout of the training checkpoints this code writes; it reads those up to it. 0: the checkpoints
# written before the layout was numbered (the same entries as 1, without ``format``).
FORMAT_VERSION = 1


@dataclass
class RunState:
    """What a training checkpoint holds: plain data only, so that it loads with
    ``torch.load(..., weights_only=True)``. The entries without a default make a checkpoint resumable
    (``CHECKPOINT_KEYS``); those with one were added later and take it when missing."""
    model: dict
    optimizer: dict
    optimizer_params: List[str]  # the parameter name of each optimizer index
    scaler: dict
    epoch: int  # the epoch in progress (or just finished)
    step: int  # micro-batches of it done
    steps_per_epoch: int  # micro-batches per epoch
    samples_per_step: int  # images per micro-batch over all processes
    best_metric: float
    nonfinite_steps: int
    rng: list  # each process's random states, by rank
    config: str  # the run's config (yaml)
    identity: dict  # what the run trains: architecture, data and the task's entries
    ema: Optional[dict] = None
    metrics: Dict[str, float] = field(default_factory=dict)  # the last evaluation
    first_nonfinite: int = -1
    loader: Optional[list] = None  # each process's data-loader position, for loaders that keep one
    saves: int = 0  # checkpoints written by the run so far
    format: int = 0

    def to_dict(self) -> dict:
        """The checkpoint's entries (no copies of the tensors)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


_ENTRIES = {f.name for f in fields(RunState)}
# What a training checkpoint must hold to be resumed.
CHECKPOINT_KEYS = tuple(f.name for f in fields(RunState) if f.default is MISSING and f.default_factory is MISSING)


def format_problem(checkpoint: dict) -> Optional[str]:
    """Why this code cannot resume ``checkpoint`` (a mapping read from a file), or None."""
    missing = [key for key in CHECKPOINT_KEYS if key not in checkpoint]
    if missing:
        return f'not a training checkpoint of this project (no {", ".join(missing)})'
    version = checkpoint.get('format', 0)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        return (f'written by a newer version of this project (checkpoint format {version!r}; this one reads up to '
                f'{FORMAT_VERSION}): update the code to resume it')
    return None
# The engine's keys that say how a run is launched, not what it trains: never reported as changed on
# resume (a task adds its own: ``Task.launch_keys``).
LAUNCH_KEYS = ('MODEL.RESUME', 'EVAL_MODE', 'OUTPUT', 'DATA.DATA_PATH', 'DATA.NUM_WORKERS', 'DATA.PREFETCH_FACTOR',
               'DATA.PIN_MEMORY', 'DEVICE', 'DIST_TIMEOUT')


# Identity entries an explicit MODEL.RESUME may differ in: the weights' fit is checked as they load,
# and other data is warned of (continuing as asked).
_CHECKED_WHEN_LOADED = ('architecture', 'data')


def load_weights(model: nn.Module, state: dict, path: str) -> None:
    """Load a checkpoint's ``state`` into ``model``, or name the keys that keep it from fitting."""
    utils.load_weights(model, state, path, 'this model (another MODEL.VARIANT, MODEL.FAT or class count?)')


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


def config_changes(saved_yaml: str, config, launch_keys: Sequence[str] = LAUNCH_KEYS) -> List[str]:
    """``KEY old -> new`` for every key whose value differs from a checkpoint's config, but for
    ``launch_keys``."""
    old, new = _flatten(yaml.safe_load(saved_yaml) or {}), _flatten(yaml.safe_load(config.dump()))
    return [f'{key} {old.get(key)!r} -> {new.get(key)!r}' for key in sorted(set(old) | set(new))
            if old.get(key) != new.get(key) and key not in launch_keys]


@dataclass(frozen=True)
class RunKeys:
    """What a task says of its config keys: the sections that make what a run trains
    (``Task.identity_sections``), and how it is launched (``LAUNCH_KEYS`` and ``Task.launch_keys``)."""
    identity_sections: Tuple[str, ...]
    launch_keys: Tuple[str, ...]


def _foreign(out_dir: str, path: str, checkpoint: dict, identity: dict, config, keys: RunKeys) -> str:
    return (f'{out_dir} holds a run with {_difference(path, checkpoint, identity, config, keys)}; start a separate '
            'run with --tag NAME (or another --output) instead of resuming it')


def _difference(path: str, checkpoint: dict, identity: dict, config, keys: RunKeys) -> str:
    """'another KEY (PATH: the config keys behind it)' for the first identity entry in which
    ``checkpoint`` differs from ``identity``."""
    theirs = checkpoint['identity']
    what = next(key for key in (*identity, *theirs) if theirs.get(key) != identity.get(key))
    changed = [c for c in config_changes(checkpoint['config'], config, keys.launch_keys)
               if c.startswith(keys.identity_sections)]
    return f'another {what} ({path}' + (f': {"; ".join(changed[:4])}' if changed else '') + ')'


@dataclass
class Survey:
    """One process's look at a run folder's checkpoints."""
    resumable: List[Tuple[tuple, str]] = field(default_factory=list)  # (position, path), newest first
    unusable: List[Tuple[str, str]] = field(default_factory=list)  # (path, why it cannot be resumed)
    best_seen: float = -math.inf  # the best metric any of its checkpoints saw
    saves: int = 0  # the highest save count of its checkpoints
    foreign: str = ''  # why the folder holds a run of another identity

    @property
    def newest(self) -> Optional[Tuple[tuple, str]]:
        """(position, path) of the checkpoint newest in training, ckpt_best.pth left aside."""
        return next((entry for entry in self.resumable if os.path.basename(entry[1]) != CHECKPOINT_BEST), None)


def position(checkpoint: dict) -> tuple:
    """Where in training a checkpoint stands: (epoch, fraction of it done)."""
    return checkpoint['epoch'], checkpoint['step'] / checkpoint['steps_per_epoch']


def describe_position(place: Optional[tuple]) -> str:
    return 'none' if place is None else f'epoch {place[0]}, {100 * place[1]:.0f}% of it done'


def survey(out_dir: str, identity: dict, config, keys: RunKeys) -> Survey:
    """Read the small entries of every checkpoint of ``out_dir``: which can be resumed and where each
    stands in training (by the epoch and step stored inside, whatever the file times say), which
    cannot and why, and whether one belongs to a run of another identity."""
    found = Survey()
    for path in checkpoint_files(out_dir):
        try:
            checkpoint = load_checkpoint_file(path, lazy=True)
        except CheckpointError as error:
            found.unusable.append((path, str(error)))
            continue
        problem = format_problem(checkpoint)
        if problem:
            found.unusable.append((path, problem))
            continue
        if checkpoint['identity'] != identity and not found.foreign:
            found.foreign = _foreign(out_dir, path, checkpoint, identity, config, keys)
        found.best_seen = max(found.best_seen, checkpoint['best_metric'])
        found.saves = max(found.saves, checkpoint.get('saves', 0))
        found.resumable.append((position(checkpoint), path))
    found.resumable.sort(key=lambda entry: entry[0], reverse=True)
    return found


def choose(found: Survey, out_dir: str, identity: dict, config, logger: logging.Logger,
           keys: RunKeys) -> Tuple[Optional[str], Optional[tuple]]:
    """(the checkpoint to resume, its position) from rank 0's survey: with TRAIN.AUTO_RESUME the run
    folder's newest, unless MODEL.RESUME is further in training (a --resume left on the command line
    never takes a run back); else MODEL.RESUME. A folder whose checkpoints cannot be read, or would
    not be resumed (TRAIN.AUTO_RESUME False without MODEL.RESUME), is refused rather than trained over;
    so is a MODEL.RESUME whose identity differs from ``identity`` in a task's entry (a teacher)."""
    if found.foreign:
        raise CheckpointError(found.foreign)
    requested, newest = config.MODEL.RESUME, found.newest if config.TRAIN.AUTO_RESUME else None
    if not requested and not config.TRAIN.AUTO_RESUME and found.resumable:
        place, path = found.resumable[0]
        raise CheckpointError(f'{out_dir} holds checkpoints ({os.path.basename(path)}: {describe_position(place)}) '
                              'and TRAIN.AUTO_RESUME is False: a new run would write over them. Start a separate run '
                              'with --tag NAME, or continue one with --resume FILE')
    if not requested and newest is None and found.unusable:
        listed = '; '.join(f'{os.path.basename(path)}: {why}' for path, why in found.unusable[:3])
        raise CheckpointError(f'{out_dir} holds checkpoints but none can be resumed ({listed}); a new run would '
                              'overwrite them. Move them elsewhere, or start a separate run with --tag NAME')
    if not requested:
        return (newest[1], newest[0]) if newest else (None, None)
    try:
        checkpoint = load_checkpoint_file(requested, lazy=True)
        requested_at = position(checkpoint)
        theirs = {key: value for key, value in checkpoint['identity'].items() if key not in _CHECKED_WHEN_LOADED}
    except (CheckpointError, KeyError, TypeError, ZeroDivisionError, AttributeError):
        return requested, None  # load_agreed names what is wrong with it
    ours = {key: value for key, value in identity.items() if key not in _CHECKED_WHEN_LOADED}
    if theirs != ours:
        raise CheckpointError(f'--resume {requested} cannot continue this run: it was trained with '
                              f'{_difference(requested, {**checkpoint, "identity": theirs}, ours, config, keys)}; start a '
                              f'new run from its weights with --pretrained {requested} instead')
    if newest is not None and os.path.abspath(newest[1]) != os.path.abspath(requested) and newest[0] >= requested_at:
        logger.info(f'resuming {newest[1]} ({describe_position(newest[0])}), not --resume {requested} '
                    f'({describe_position(requested_at)}): the run folder has got further. Set TRAIN.AUTO_RESUME '
                    'False to go back to it')
        return newest[1], newest[0]
    return requested, requested_at


def set_aside_unusable(found: Survey, first_epoch: int, epochs: int, logger: logging.Logger) -> None:
    """Rename the unreadable checkpoints that this run would write over (ckpt_last.pth, ckpt_best.pth
    and the epoch checkpoints it will reach) to NAME.unreadable: nothing a user has is overwritten."""
    for path, why in found.unusable:
        epoch = epoch_of_checkpoint_name(os.path.basename(path))
        if epoch is not None and not first_epoch <= epoch < epochs:
            continue
        aside, number = f'{path}.unreadable', 1
        while os.path.lexists(aside):
            number += 1
            aside = f'{path}.unreadable{number}'
        os.replace(path, aside)
        logger.warning(f'{path} cannot be resumed ({why}); moved to {os.path.basename(aside)} so that this run does '
                       'not overwrite it')


def check_one_folder(found: Survey, rank_0_newest: Optional[tuple], out_dir: str,
                     rank: int) -> Optional[CheckpointError]:
    """Why this process's view of the run folder shows that the folder is not shared: it sees a
    checkpoint further in training than any rank 0 sees (a restart put rank 0 on another node, whose
    local OUTPUT lacks it)."""
    newest = found.newest
    if newest is None or (rank_0_newest is not None and newest[0] <= rank_0_newest):
        return None
    return CheckpointError(f'rank {rank} sees {newest[1]} ({describe_position(newest[0])}) but rank 0 sees no '
                           f'checkpoint that far (its newest: {describe_position(rank_0_newest)}): OUTPUT ({out_dir}) '
                           'is not one folder that every node shares. Put OUTPUT on a shared file system (every node '
                           'must see the same checkpoints)')


def load_agreed(path: str) -> dict:
    """Every process reads ``path``; if any cannot, all stop with the same one-line error."""
    try:
        checkpoint, problem = load_checkpoint_file(path), None
    except CheckpointError as error:
        checkpoint, problem = None, error
    agree(problem)
    missing = [key for key in CHECKPOINT_KEYS if key not in checkpoint]
    if missing:
        raise CheckpointError(f'{path} holds no training state (missing {", ".join(missing)}; a bare state dict or '
                              f'the authors\' checkpoint?): to start training from its weights use --pretrained '
                              f'{path}, --resume continues a run of this project')
    problem = format_problem(checkpoint)
    if problem:
        raise CheckpointError(f'{path}: {problem}')
    return {**RunState(**{k: v for k, v in checkpoint.items() if k in _ENTRIES}).to_dict(), **checkpoint}


def write(out_dir: str, state: dict, periodic: bool, is_best: bool, keep: int, logger: logging.Logger) -> None:
    """Write ckpt_epoch_N.pth when ``periodic`` (keeping the ``keep`` written last), ckpt_best.pth
    when ``is_best``, and always ckpt_last.pth, each atomically."""
    if periodic:
        atomic_save(state, os.path.join(out_dir, epoch_checkpoint_name(state['epoch'])))
        for name in prune_epoch_checkpoints(out_dir, keep):
            logger.info(f'removed {name} (SAVE_KEEP {keep})')
    if is_best:
        atomic_save(state, os.path.join(out_dir, CHECKPOINT_BEST))
    last = os.path.join(out_dir, CHECKPOINT_LAST)
    atomic_save(state, last)
    logger.info(f'saved {last} (epoch {state["epoch"]}, step {state["step"]})')


def prune_epoch_checkpoints(out_dir: str, keep: int) -> List[str]:
    """Delete all but the ``keep`` ckpt_epoch_N.pth written last in training (by the save count
    inside, so a run resumed from an older epoch keeps what it writes rather than the higher N of
    the abandoned future; files without one count as older, by their epoch). 0 keeps all; a file
    that cannot be read is never deleted. Returns the deleted names."""
    if keep <= 0:
        return []
    ranked = []
    for name in os.listdir(out_dir):
        epoch = epoch_of_checkpoint_name(name)
        if epoch is None:
            continue
        try:
            checkpoint = load_checkpoint_file(os.path.join(out_dir, name), lazy=True)
            ranked.append(((1, checkpoint['saves']) if 'saves' in checkpoint else (0, checkpoint['epoch']), name))
        except (CheckpointError, KeyError, TypeError):
            continue
    doomed = [name for _, name in sorted(ranked)[:-keep]]
    for name in doomed:
        os.remove(os.path.join(out_dir, name))
    return doomed


def state_bytes(state) -> int:
    """About how many bytes ``state`` takes on disk (its tensors)."""
    if torch.is_tensor(state):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(state_bytes(value) for value in state.values())
    if isinstance(state, (list, tuple)):
        return sum(state_bytes(value) for value in state)
    return 0


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
