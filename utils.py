"""Ground floor of the training code: errors, processes, precision, random states and checkpoint files.

It imports no other module of the project, so benchmarks and tools can use it without the training
stack (``models``, ``data`` and ``config`` build on it, not the other way round).
"""
from __future__ import annotations

import ctypes
import glob
import logging
import os
import random
import re
import resource
import signal
import sys
from contextlib import nullcontext
from typing import Callable, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist

# --- errors ---------------------------------------------------------------------------------------


class ReportedError(Exception):
    """A reason to stop a run that the user can act on: reported as one ``error:`` line, exit code 2.

    ``every_rank``: every process of a run meets it alike (config, data layout, agreed checks), so only
    rank 0 reports it; an error that one process meets alone is reported by that process.
    """
    every_rank = True


class UserInputError(ReportedError):
    """A path, flag or file the user gave is wrong."""


class ConfigError(ReportedError):
    """A config file, key or value is wrong."""


class DataError(ReportedError):
    """The data is missing or malformed (folders, classes, annotations)."""


class SampleError(DataError):
    """One sample cannot be read or is malformed; only the process that drew it knows."""
    every_rank = False


class CheckpointError(ReportedError):
    """A checkpoint cannot be read, does not fit, or belongs to another run."""


class ExportError(ReportedError):
    """An exported model does not reproduce the PyTorch model."""


class NonFiniteLossError(ReportedError):
    """The loss or gradients stopped being finite more often than TRAIN.MAX_NONFINITE_STEPS allows."""


class Preempted(Exception):
    """SIGTERM / SIGINT arrived and the run saved a resumable checkpoint: ``(message, signal number)``."""


def one_line(error: BaseException) -> str:
    """The message of a reported error on one line (errors raised in data-loader workers arrive with
    the worker's traceback in their text; keep its last line)."""
    last = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
    return last.split(f'{type(error).__name__}: ', 1)[-1]


def run_entry_point(entry: Callable[[], None]) -> None:
    """Run a command-line entry point. A stop signal exits with 128 + the signal after its message; a
    :class:`ReportedError` prints one ``error:`` line (once per run, see ``every_rank``) and exits with 2;
    ``--debug`` shows the traceback instead. The process group is destroyed where every process got
    as far (a gloo group left to the interpreter's shutdown can abort the process)."""
    reporter = int(os.environ.get('RANK', 0)) == 0
    code, together = 0, True
    try:
        entry()
    except Preempted as stopped:
        if reporter:
            print(stopped.args[0], file=sys.stderr, flush=True)
        code = 128 + stopped.args[1]
    except ReportedError as error:
        if '--debug' in sys.argv:
            raise
        if reporter or not error.every_rank:
            print(f'error: {one_line(error)}', file=sys.stderr, flush=True)
        code, together = 2, error.every_rank
    if together and is_distributed():
        dist.destroy_process_group()
    if code:
        sys.exit(code)


# --- processes ------------------------------------------------------------------------------------

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
    return *rank_world(), device


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank_world() -> Tuple[int, int]:
    """(this process's rank, number of processes); (0, 1) outside a process group."""
    return (dist.get_rank(), dist.get_world_size()) if is_distributed() else (0, 1)


def all_reduce(tensor: torch.Tensor, op: str = 'sum') -> torch.Tensor:
    """``tensor`` reduced (``'sum'``, ``'max'`` or ``'min'``) over all processes, in place."""
    if is_distributed():
        dist.all_reduce(tensor, op={'sum': dist.ReduceOp.SUM, 'max': dist.ReduceOp.MAX,
                                    'min': dist.ReduceOp.MIN}[op])
    return tensor


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s ``obj`` on every process (picklable objects)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj) -> list:
    """Every process's ``obj``, in rank order, on every process."""
    if not is_distributed():
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def fit_cpu_threads(processes_on_this_machine: int) -> Optional[Tuple[int, int]]:
    """Lower torch's threads per process so that all processes on this machine fit its cores (those
    this job may use, ``os.sched_getaffinity``): oversubscribed, a step runs several times slower.
    Returns (before, after) when it lowered them."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1
    before = torch.get_num_threads()
    after = max(1, cores // max(processes_on_this_machine, 1))
    if before <= after:
        return None
    torch.set_num_threads(after)
    return before, after


class StopSignal:
    """Turns the first SIGTERM or SIGINT into a request to stop at an optimizer-step boundary.

    ``requested()`` is called once per optimizer step by every process. Alone, it answers from this
    process's flag. With several processes they must stop at the same step: each call starts an
    all-reduce of the flags over a gloo (CPU) group and answers with the one started by the previous
    call, so it never synchronises the device or waits on the network, and every process stops at
    the same step, at most two optimizer steps after a signal reaches any of them.
    """

    def __init__(self, logger: logging.Logger):
        self.signum = 0
        self.logger = logger
        self._previous = {signum: signal.signal(signum, self._handle) for signum in (signal.SIGTERM, signal.SIGINT)}
        self._group = None
        if is_distributed():
            self._group = dist.group.WORLD if dist.get_backend() == 'gloo' else dist.new_group(backend='gloo')
        self._pending: Optional[Tuple[object, torch.Tensor]] = None

    def _handle(self, signum, frame) -> None:
        if not self.signum:
            self.signum = signum
            self.logger.info(f'received {signal.Signals(signum).name}: stopping at the next step to save a checkpoint')

    def requested(self) -> int:
        """The signal number once this process (or, with several, any process) was signalled, else 0."""
        if self._group is None:
            return self.signum
        agreed = 0
        if self._pending is not None:
            work, flags = self._pending
            work.wait()
            agreed = int(flags[0])
        flags = torch.tensor([self.signum], dtype=torch.int32)
        self._pending = dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self._group, async_op=True), flags
        return agreed

    def close(self) -> None:
        """Finish the all-reduce in flight, put the previous signal handlers back and let go of the process
        group, so that destroying it really frees it (gloo work still alive while the interpreter shuts
        down aborts the process)."""
        if self._pending is not None:
            self._pending[0].wait()
        self._pending = self._group = None
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


# --- precision and memory -------------------------------------------------------------------------

def amp_dtype(config, device: torch.device) -> Optional[torch.dtype]:
    """The autocast type: AMP_DTYPE on CUDA, bf16 on CPU when AMP_CPU; None runs in fp32."""
    if not config.AMP_ENABLE or (device.type == 'cpu' and not config.AMP_CPU):
        return None
    return torch.float16 if device.type == 'cuda' and config.AMP_DTYPE == 'fp16' else torch.bfloat16


def autocast(config, device: torch.device):
    """torch.amp autocast to ``amp_dtype``, or nothing in fp32."""
    dtype = amp_dtype(config, device)
    return nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def memory_used_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated, or the process's peak resident memory on CPU, in MB."""
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


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


# --- random states --------------------------------------------------------------------------------

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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


# --- checkpoint files -----------------------------------------------------------------------------

CHECKPOINT_LAST = 'ckpt_last.pth'
CHECKPOINT_BEST = 'ckpt_best.pth'
_EPOCH_CHECKPOINT = re.compile(r'^ckpt_epoch_(\d+)\.pth$')
_TEMPORARY = '.tmp'  # atomic writes go to NAME.tmpPID first


def epoch_checkpoint_name(epoch: int) -> str:
    return f'ckpt_epoch_{epoch}.pth'


def _atomic_write(path: str, write: Callable[[object], None], mode: str) -> None:
    """``write`` to a temporary file beside ``path``, flushed to disk, then renamed over it: a crash
    leaves the old file or the new one, never a torn one."""
    tmp = f'{path}{_TEMPORARY}{os.getpid()}'
    try:
        with open(tmp, mode) as f:
            write(f)
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


def atomic_save(obj: dict, path: str) -> None:
    """torch.save ``obj`` to ``path`` atomically."""
    _atomic_write(path, lambda f: torch.save(obj, f), 'wb')


def atomic_write_text(text: str, path: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    _atomic_write(path, lambda f: f.write(text), 'w')


def remove_leftover_temporaries(out_dir: str) -> List[str]:
    """Delete the temporary files that a save killed midway left in ``out_dir``; returns their names."""
    left = [p for p in glob.glob(os.path.join(out_dir, f'*{_TEMPORARY}*'))
            if re.fullmatch(rf'.+{re.escape(_TEMPORARY)}\d+', os.path.basename(p))]
    for path in left:
        os.remove(path)
    return [os.path.basename(p) for p in left]


def prune_epoch_checkpoints(out_dir: str, keep: int) -> List[str]:
    """Delete all but the ``keep`` newest ckpt_epoch_N.pth of ``out_dir`` (0 keeps all); returns the
    deleted names. ckpt_last.pth and ckpt_best.pth are never touched."""
    numbered = sorted((int(m.group(1)), name) for name in os.listdir(out_dir)
                      if (m := _EPOCH_CHECKPOINT.match(name)))
    doomed = [name for _, name in numbered[:-keep]] if keep > 0 else []
    for name in doomed:
        os.remove(os.path.join(out_dir, name))
    return doomed


def checkpoint_files(out_dir: str) -> List[str]:
    """The checkpoints of a run folder: ckpt_last.pth, ckpt_best.pth and ckpt_epoch_N.pth."""
    names = [CHECKPOINT_LAST, CHECKPOINT_BEST] + [n for n in os.listdir(out_dir) if _EPOCH_CHECKPOINT.match(n)]
    return [os.path.join(out_dir, n) for n in names if os.path.isfile(os.path.join(out_dir, n))]


def load_checkpoint_file(path: str, lazy: bool = False) -> dict:
    """Load a checkpoint without running code from it (``weights_only``). ``lazy`` maps the file
    instead of reading it, for a look at its small entries."""
    if not os.path.isfile(path):
        raise CheckpointError(f'checkpoint not found: {path}')
    try:
        return torch.load(path, map_location='cpu', weights_only=True, mmap=lazy)
    except Exception as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f'cannot read checkpoint {path} (truncated, corrupt or not a plain-data torch '
                              f'checkpoint): {first_line}') from error


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


def all_finite(state_dict: dict) -> bool:
    """Whether every floating-point tensor of ``state_dict`` is finite."""
    return all(bool(torch.isfinite(t).all()) for t in state_dict.values()
               if torch.is_tensor(t) and t.is_floating_point())
