"""Checkpoints, distributed set-up and reductions, and small helpers for the entry points."""
from __future__ import annotations

import ctypes
import glob
import logging
import os
import random
import resource
import signal
import sys
from contextlib import nullcontext
from typing import Callable, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from config import ConfigError, output_dir
from data import DataError
from models import checkpoint_filter_fn

CHECKPOINT_LAST = 'ckpt_last.pth'
CHECKPOINT_BEST = 'ckpt_best.pth'
CHECKPOINT_KEYS = ('model', 'optimizer', 'lr_scheduler', 'scaler', 'epoch', 'step', 'rng')


class UserInputError(Exception):
    """A problem with what the user gave (paths, config, data, checkpoints): reported as one line."""


class NonFiniteLossError(Exception):
    """The loss or gradients stopped being finite (TRAIN.MAX_NONFINITE_STEPS exceeded)."""


class Preempted(Exception):
    """SIGTERM / SIGINT arrived; the run saved a resumable checkpoint."""


class StopSignal:
    """Turns the first SIGTERM or SIGINT into a request to stop after the current step."""

    def __init__(self, logger: logging.Logger):
        self.signum = 0
        self.logger = logger
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._handle)

    def _handle(self, signum, frame) -> None:
        if not self.signum:
            self.signum = signum
            self.logger.info(f'received {signal.Signals(signum).name}: stopping after this step to save a checkpoint')

    def agreed(self, device: torch.device) -> int:
        """The signal if any process was signalled (all processes agree; one collective), else 0."""
        if not is_distributed():
            return self.signum
        flag = torch.tensor([self.signum], device=device)
        return (self.signum or signal.SIGTERM) if all_reduce_sum(flag).item() > 0 else 0


def one_line(error: BaseException) -> str:
    """The message of an input error on one line (errors raised in data-loader workers arrive with
    the worker's traceback in their text; keep its last line)."""
    last = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
    return last.split(f'{type(error).__name__}: ', 1)[-1]


def run_entry_point(entry: Callable[[], None]) -> None:
    """Run a command-line entry point: a stop signal exits with 128 + the signal after its message;
    an input error prints one ``error:`` line and exits with 2 (``--debug`` shows the traceback)."""
    try:
        entry()
    except Preempted as stopped:
        print(stopped.args[0], file=sys.stderr, flush=True)
        sys.exit(128 + stopped.args[1])
    except (ConfigError, DataError, UserInputError, NonFiniteLossError) as error:
        if '--debug' in sys.argv:
            raise
        print(f'error: {one_line(error)}', file=sys.stderr, flush=True)
        sys.exit(2)


# --- distributed -------------------------------------------------------------------------------

def init_distributed(device_name: str) -> Tuple[int, int, torch.device]:
    """(rank, world size, device). Under torchrun (single or multi node) joins the process group,
    NCCL on CUDA and gloo on CPU; a plain ``python main.py`` runs as one process without one."""
    use_cuda = device_name == 'cuda' or (not device_name and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise UserInputError('DEVICE (--device) is cuda but no CUDA device is visible; use --device cpu')
    local_rank = int(os.environ.get('LOCAL_RANK', 0))
    device = torch.device('cuda', local_rank) if use_cuda else torch.device('cpu')
    if use_cuda:
        torch.cuda.set_device(device)
    if 'RANK' in os.environ and int(os.environ.get('WORLD_SIZE', 1)) > 1:
        dist.init_process_group('nccl' if use_cuda else 'gloo', device_id=device if use_cuda else None)
        return dist.get_rank(), dist.get_world_size(), device
    return 0, 1, device


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all processes (in place, returned)."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module inside DDP and torch.compile wrappers."""
    model = getattr(model, '_orig_mod', model)
    model = getattr(model, 'module', model)
    return getattr(model, '_orig_mod', model)


def memory_used_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated, or the process's peak resident memory on CPU, in MB."""
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --- runs ---------------------------------------------------------------------------------------

def amp_dtype(config, device: torch.device) -> Optional[torch.dtype]:
    """The autocast type: AMP_DTYPE on CUDA, bf16 on CPU when AMP_CPU; None runs in fp32."""
    if not config.AMP_ENABLE or (device.type == 'cpu' and not config.AMP_CPU):
        return None
    return torch.float16 if device.type == 'cuda' and config.AMP_DTYPE == 'fp16' else torch.bfloat16


def autocast(config, device: torch.device):
    """torch.amp autocast to ``amp_dtype``, or nothing in fp32."""
    dtype = amp_dtype(config, device)
    return nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


# glibc mallopt parameters
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def keep_freed_memory(limit_bytes: int = 2 ** 31 - 1) -> bool:
    """CPU runs: serve large blocks from the heap and keep up to ``limit_bytes`` of freed memory there.

    glibc gives every block above 32 MB its own mmap and returns it to the kernel on free, so each
    step pays page faults on its large activations again (a fresh 51 MB map costs about 17 ms). This
    is why PyTorch's CPU tuning guide recommends jemalloc or tcmalloc; two mallopt calls do it
    without either. Process-wide and inherited by forked data-loader workers. Returns False where
    the C library has no mallopt (not glibc); nothing changes then.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, min(limit_bytes, 2 ** 31 - 1)))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def prepare_output(config) -> str:
    """Create the run folder and check that it can be written, before any work is done."""
    out_dir = output_dir(config)
    try:
        os.makedirs(out_dir, exist_ok=True)
        probe = os.path.join(out_dir, f'.write_test{os.getpid()}')
        with open(probe, 'w'):
            pass
        os.remove(probe)
    except OSError as error:
        raise UserInputError(f'cannot write to the output folder {out_dir} (--output / OUTPUT): {error}') from error
    return out_dir


# --- checkpoints -------------------------------------------------------------------------------

def atomic_save(obj: dict, path: str) -> None:
    """torch.save to a temporary file beside ``path``, flushed to disk, then renamed over it: a
    crash leaves either the old file or the new one, never a torn one."""
    tmp = f'{path}.tmp{os.getpid()}'
    try:
        with open(tmp, 'wb') as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    dir_fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_checkpoint(out_dir: str, state: dict, epoch: int, is_best: bool, periodic: bool,
                    logger: logging.Logger) -> None:
    """Write ckpt_epoch_N.pth when ``periodic``, ckpt_best.pth when ``is_best``, and always
    ckpt_last.pth, last, so that it is the newest file."""
    if periodic:
        atomic_save(state, os.path.join(out_dir, f'ckpt_epoch_{epoch}.pth'))
    if is_best:
        atomic_save(state, os.path.join(out_dir, CHECKPOINT_BEST))
    last = os.path.join(out_dir, CHECKPOINT_LAST)
    atomic_save(state, last)
    logger.info(f'saved {last} (epoch {epoch}, step {state["step"]})')


def load_resume_checkpoint(out_dir: str, logger: logging.Logger) -> Tuple[Optional[str], Optional[dict]]:
    """The newest training checkpoint in ``out_dir`` that loads and is complete (ckpt_best.pth aside),
    with its path; an unreadable or incomplete newer file is reported and skipped."""
    candidates = [p for p in glob.glob(os.path.join(out_dir, 'ckpt_*.pth')) if os.path.basename(p) != CHECKPOINT_BEST]
    for path in sorted(candidates, key=os.path.getmtime, reverse=True):
        try:
            checkpoint = load_checkpoint_file(path)
            missing = [key for key in CHECKPOINT_KEYS if key not in checkpoint]
            if missing:
                raise ValueError(f'missing {", ".join(missing)}')
        except Exception as error:  # a torn or foreign file must not stop the resume
            logger.warning(f'skipping checkpoint {path}: it is unreadable or incomplete ({type(error).__name__}: '
                           f'{str(error).splitlines()[0] if str(error) else ""})')
            continue
        return path, checkpoint
    return None, None


def all_finite(state_dict: dict) -> bool:
    """Whether every floating-point tensor of ``state_dict`` is finite."""
    return all(torch.isfinite(t).all() for t in state_dict.values() if torch.is_tensor(t) and t.is_floating_point())


def rng_state() -> dict:
    """The python, numpy, torch and CUDA random states, as plain data."""
    np_state = np.random.get_state()
    return {
        'python': random.getstate(),
        'numpy': {'keys': torch.from_numpy(np_state[1].astype(np.int64)), 'pos': int(np_state[2]),
                  'has_gauss': int(np_state[3]), 'cached_gaussian': float(np_state[4])},
        'torch': torch.get_rng_state(),
        'cuda': torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    """Restore what ``rng_state`` captured."""
    random.setstate(state['python'])
    np_state = state['numpy']
    np.random.set_state(('MT19937', np_state['keys'].numpy().astype(np.uint32), np_state['pos'],
                         np_state['has_gauss'], np_state['cached_gaussian']))
    torch.set_rng_state(state['torch'])
    if state['cuda'] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


def load_checkpoint_file(path: str) -> dict:
    """Load a checkpoint without running code from it (weights_only)."""
    if not os.path.isfile(path):
        raise UserInputError(f'checkpoint not found: {path}')
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserInputError(f'cannot read checkpoint {path} (truncated, corrupt or not a plain-data torch '
                             f'checkpoint): {first_line}') from error


def load_model_weights(model: nn.Module, path: str, logger: logging.Logger, drop_head: bool = False,
                       checkpoint: Optional[dict] = None) -> dict:
    """Load weights from this project's checkpoints, the authors' ({'model': ...} with their keys)
    or a bare state dict. ``drop_head`` re-initialises a classifier of another class count (fine-tuning);
    otherwise any mismatch is an error naming the keys. ``checkpoint``: the file's contents when
    already loaded. Returns the raw checkpoint."""
    checkpoint = load_checkpoint_file(path) if checkpoint is None else checkpoint
    state = checkpoint_filter_fn(checkpoint)
    own = model.state_dict()
    if drop_head:
        for key in [k for k in state if k.startswith('head.') and k in own and state[k].shape != own[k].shape]:
            logger.info(f'{path}: {key} {tuple(state[key].shape)} does not fit {tuple(own[key].shape)}; '
                        'the classifier is re-initialised for fine-tuning')
            state[key] = own[key]
    report = state_dict_mismatch(own, state)
    if report:
        raise UserInputError(f'{path} does not fit this model (check MODEL.FAT and MODEL.NUM_CLASSES): {report}')
    model.load_state_dict(state)
    logger.info(f'loaded weights from {path}')
    return checkpoint


def state_dict_mismatch(own: dict, state: dict) -> str:
    """What keeps ``state`` from loading into a model whose state dict is ``own`` ('' when it fits):
    missing, unexpected and wrongly shaped keys, a few of each."""
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = [f'{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}'
                  for k in sorted(set(own) & set(state)) if own[k].shape != state[k].shape]
    return '; '.join(f'{label}: {", ".join(keys[:8])}{" ..." if len(keys) > 8 else ""}'
                     for label, keys in (('missing', missing), ('unexpected', unexpected),
                                         ('shape mismatch', mismatched)) if keys)
