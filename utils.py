"""Ground floor of the training code: errors, processes, precision, random states and checkpoint files.

It imports no other module of the project, so benchmarks and tools can use it without the training
stack (``models``, ``data`` and ``config`` build on it, not the other way round).
"""
from __future__ import annotations

import ctypes
import datetime
import errno
import fcntl
import logging
import os
import random
import re
import resource
import secrets
import signal
import socket
import sys
import threading
from contextlib import nullcontext
from typing import BinaryIO, Callable, List, Optional, Tuple, TypeVar

import numpy as np
import torch
import torch.distributed as dist

import slurm

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
    :class:`ReportedError` prints one ``error:`` line and exits with 2: once per run when every process
    met it (``every_rank``), else by the process that met it, naming its rank and host; ``--debug``
    shows the traceback instead. A process whose collective failed because another process ended
    says so in one line and exits with 1 (the other's error is the one to read). The process group is
    destroyed where every process got as far (a gloo group left to the interpreter's shutdown can
    abort the process)."""
    code, together = 0, True
    try:
        entry()
    except Preempted as stopped:
        if _reporter():
            print(stopped.args[0], file=sys.stderr, flush=True)
        code = 128 + stopped.args[1]
    except ReportedError as error:
        if '--debug' in sys.argv:
            raise
        if error.every_rank:
            if _reporter():
                print(f'error: {one_line(error)}', file=sys.stderr, flush=True)
        else:
            print(f'error: {one_line(error)}{where_suffix()}', file=sys.stderr, flush=True)
        code, together = 2, error.every_rank
    except RuntimeError as error:
        if '--debug' in sys.argv or not (is_distributed() and _PEER_GONE.search(str(error))):
            raise
        print(f'{where()}: stopping, another process of the run ended ({_PEER_GONE.search(str(error)).group(0)}); '
              'its own message says why', file=sys.stderr, flush=True)
        code, together = 1, False
    if together and is_distributed():
        leave_process_group()
    if code:
        sys.exit(code)


def _reporter() -> bool:
    """Whether this process prints what every process met: rank 0, or Slurm's task 0 under srun before
    the engine has set RANK from it."""
    return int(os.environ.get('RANK', os.environ.get('SLURM_PROCID', 0))) == 0


# What gloo says in a collective when another process of the run has exited.
_PEER_GONE = re.compile(r'Connection closed by peer|Connection reset by peer')


# --- processes ------------------------------------------------------------------------------------

def init_distributed(device_name: str, timeout_minutes: float = 30.0) -> Tuple[int, int, torch.device]:
    """(rank, world size, device). Under torchrun (single or multi node) joins the process group,
    NCCL on CUDA and gloo on CPU, whose collectives fail after ``timeout_minutes`` of waiting for the
    slowest process; a plain ``python main.py`` runs as one process without one."""
    use_cuda = device_name == 'cuda' or (not device_name and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise UserInputError('DEVICE (--device) is cuda but no CUDA device is visible; use --device cpu')
    device = torch.device('cuda', _local_gpu()) if use_cuda else torch.device('cpu')
    if use_cuda:
        torch.cuda.set_device(device)
    if 'RANK' in os.environ and int(os.environ.get('WORLD_SIZE', 1)) > 1:
        global _timeout
        _timeout = datetime.timedelta(minutes=timeout_minutes)
        dist.init_process_group('nccl' if use_cuda else 'gloo', device_id=device if use_cuda else None,
                                timeout=_timeout)
    return *rank_world(), device


def _local_gpu() -> int:
    """This process's GPU: the LOCAL_RANK-th, or the only one it sees (Slurm's --gpus-per-task gives
    each task its own)."""
    local_rank, visible = int(os.environ.get('LOCAL_RANK', 0)), torch.cuda.device_count()
    if visible == 1:
        return 0
    if local_rank >= visible:
        shown = os.environ.get('CUDA_VISIBLE_DEVICES')
        raise UserInputError(f'local rank {local_rank}, but this process sees {visible} GPUs'
                             f'{f" (CUDA_VISIBLE_DEVICES={shown})" if shown else ""}: start one process per GPU')
    return local_rank


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank_world() -> Tuple[int, int]:
    """(this process's rank, number of processes); (0, 1) outside a process group."""
    return (dist.get_rank(), dist.get_world_size()) if is_distributed() else (0, 1)


def where() -> str:
    """'rank R on HOST': which process of the run this is, for messages."""
    return f'rank {rank_world()[0]} on {socket.gethostname()}'


def where_suffix() -> str:
    """' (rank R on HOST)' in a run of several processes, else ''."""
    return f' ({where()})' if rank_world()[1] > 1 else ''


_cpu_group = None
_timeout: Optional[datetime.timedelta] = None  # the process group's, for the groups made from it


def leave_process_group() -> None:
    """Destroy the process group (and the CPU group made from it)."""
    global _cpu_group
    dist.destroy_process_group()
    _cpu_group = None


def cpu_group():
    """A gloo group of all processes, for small CPU-side agreements that must not touch the device
    (the world group itself on gloo runs); made once, by every process at the same point."""
    global _cpu_group
    if _cpu_group is None:
        _cpu_group = dist.group.WORLD if dist.get_backend() == 'gloo' else dist.new_group(backend='gloo',
                                                                                          timeout=_timeout)
    return _cpu_group


def all_reduce(tensor: torch.Tensor, op: str = 'sum', group=None) -> torch.Tensor:
    """``tensor`` reduced (``'sum'``, ``'max'`` or ``'min'``) over all processes, in place."""
    if is_distributed():
        dist.all_reduce(tensor, op={'sum': dist.ReduceOp.SUM, 'max': dist.ReduceOp.MAX,
                                    'min': dist.ReduceOp.MIN}[op], group=group)
    return tensor


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s ``obj`` on every process (picklable objects)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj, group=None) -> list:
    """Every process's ``obj``, in rank order, on every process."""
    if not is_distributed():
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj, group=group)
    return gathered


def agree(problem: Optional[ReportedError]) -> None:
    """Every process says which reported error it met (None: none). If any met one, every process
    raises the first of them (by rank), naming the processes that met it: rank 0 reports it once and
    all stop together, however few met it (one node's unwritable folder, one node's failed fetch)."""
    if not is_distributed():
        if problem is not None:
            raise problem
        return
    statement = None if problem is None else (type(problem), one_line(problem), socket.gethostname())
    met = [(rank, found) for rank, found in enumerate(gather_objects(statement, group=cpu_group())) if found]
    if not met:
        return
    kind, message, _ = met[0][1]
    places = ', '.join(f'rank {rank} on {host}' for rank, (_, _, host) in met[:4]) + (' ...' if len(met) > 4 else '')
    agreed = kind(f'{message} (on {len(met)} of {dist.get_world_size()} processes: {places})')
    agreed.every_rank = True
    raise agreed from problem


T = TypeVar('T')
PREPARE_REPORT_SECONDS = 30.0  # how often rank 0 says who is still preparing data
_progress_note = ['']  # the newest note of a long preparation (shared by the threads of this process)


def note_progress(text: str) -> None:
    """Say how a long preparation (a data fetch) is going; :func:`prepare_together` shows it while
    the other processes wait."""
    _progress_note[0] = text


def prepare_together(prepare: Callable[[], T], device: torch.device, logger: logging.Logger,
                     poll_seconds: float = 1.0) -> T:
    """``prepare()`` on every process, however long it takes on some of them (a node with a cold data
    cache fetches for an hour while the others have theirs). It runs in a thread on ``device``, and
    must not use the process group; meanwhile the processes exchange one small all-reduce every
    ``poll_seconds``, so no collective ever waits long, and rank 0 logs every ``PREPARE_REPORT_SECONDS`` who
    is still preparing and their latest :func:`note_progress`. Errors are agreed (:func:`agree`)."""
    outcome: dict = {}

    def run() -> None:
        if device.type == 'cuda':
            torch.cuda.set_device(device)  # the current device is per thread
        try:
            outcome['value'] = prepare()
        except ReportedError as error:
            outcome['problem'] = error
        except BaseException as error:  # noqa: B036 -- re-raised in the calling thread
            outcome['crash'] = error

    worker = threading.Thread(target=run, name='prepare', daemon=True)
    worker.start()
    if is_distributed():
        report_every = max(1, round(PREPARE_REPORT_SECONDS / poll_seconds))  # polls: the same on every process
        polls = 0
        while True:
            worker.join(poll_seconds)
            done = torch.tensor([int(not worker.is_alive())], dtype=torch.int32)
            if all_reduce(done, 'min', group=cpu_group()).item():
                break
            polls += 1
            if polls % report_every == 0:
                states = gather_objects((not worker.is_alive(), socket.gethostname(), _progress_note[0]),
                                        group=cpu_group())
                waiting = [f'rank {rank} on {host}' + (f' ({note})' if note else '')
                           for rank, (finished, host, note) in enumerate(states) if not finished]
                logger.info(f'waiting for {len(waiting)} process(es) to prepare their data: {"; ".join(waiting[:4])}')
    worker.join()
    if 'crash' in outcome:
        raise outcome['crash']
    agree(outcome.get('problem'))
    return outcome['value']


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


# The signals that stop a run with a save: SIGTERM and SIGINT, and Slurm's warning ahead of a job's
# time limit (slurm.TIME_LIMIT_SIGNAL, SIGUSR1, sent by slurm/train.sbatch's --signal).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, slurm.TIME_LIMIT_SIGNAL)


class StopSignal:
    """Turns the first of the :data:`STOP_SIGNALS` into a request to stop at an optimizer-step boundary
    (``earlier()``: one that came before, recorded elsewhere, asked once the handlers are in place).

    ``requested()`` is called once per optimizer step by every process. Alone, it answers from this
    process's flag. With several processes they must stop at the same step: each call starts an
    all-reduce of the flags over a gloo (CPU) group and answers with the one started by the previous
    call, so it never synchronises the device or waits on the network, and every process stops at
    the same step, at most two optimizer steps after a signal reaches any of them.
    """

    def __init__(self, logger: logging.Logger, earlier: Callable[[], int] = lambda: 0):
        self.signum = 0
        self.logger = logger
        self._previous = {signum: signal.signal(signum, self._handle) for signum in STOP_SIGNALS}
        self._group = cpu_group() if is_distributed() else None
        self._pending: Optional[Tuple[object, torch.Tensor]] = None
        self.agreed = 0  # the signal the processes stop for (the highest number any received)
        signum = earlier()
        if signum:
            self._handle(signum, None)

    def _handle(self, signum, frame) -> None:
        if not self.signum:
            self.signum = signum
            why = ' (Slurm: the time limit is near)' if signum == slurm.TIME_LIMIT_SIGNAL else ''
            self.logger.info(f'received {signal.Signals(signum).name}{why}: stopping at the next step to save a '
                             'checkpoint')

    def requested(self) -> int:
        """The signal number once this process (or, with several, any process) was signalled, else 0."""
        if self._group is None:
            self.agreed = self.signum
            return self.agreed
        if self._pending is not None:
            work, flags = self._pending
            work.wait()
            self.agreed = int(flags[0])
        flags = torch.tensor([self.signum], dtype=torch.int32)
        self._pending = dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self._group, async_op=True), flags
        return self.agreed

    def close(self) -> None:
        """Finish the all-reduce in flight and let go of the process group, so that destroying it really
        frees it (gloo work still alive while the interpreter shuts down aborts the process). Put the
        previous signal handlers back, unless a signal came: a stopping process must not die of the
        next one (Slurm signals a requeued job again) before it has said why it stopped."""
        if self._pending is not None:
            self._pending[0].wait()
        self._pending = self._group = None
        if not self.signum:
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


# --- files ----------------------------------------------------------------------------------------

_TEMPORARY = '.tmp'  # write_atomically writes NAME.tmpPID-RANDOM first
_TEMPORARY_NAME = re.compile(rf'(.+){re.escape(_TEMPORARY)}\d+(-[0-9a-f]{{8}})?')


def write_atomically(path: str, write: Callable[[BinaryIO], None],
                     check: Optional[Callable[[str], None]] = None) -> None:
    """Make ``path`` by ``write(f)`` into a new temporary file beside it, flushed to disk, then
    renamed over it: a crash leaves the old file or the new one, never a torn one, and a failed
    ``write`` or ``check`` leaves the old one untouched. The temporary file is created, never
    followed through a planted link, with the permissions the umask gives; ``f.name`` is its path, for
    writers that take one. ``check(temporary path)`` may refuse the new content by raising."""
    tmp = f'{path}{_TEMPORARY}{os.getpid()}-{secrets.token_hex(4)}'
    def create(name: str, flags: int) -> int:  # a new file, whatever stands at ``name``
        return os.open(name, flags | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666)

    try:
        with open(tmp, 'wb', opener=create) as f:
            try:
                write(f)
            except RuntimeError as error:  # torch.save reports a failed write of a large tensor so
                failed = _os_error_behind(error)
                if failed is None:
                    raise
                raise OSError(failed.errno, failed.strerror, tmp) from error
            f.flush()
            os.fsync(f.fileno())
        if check is not None:
            check(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.remove(tmp)
    dir_fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _os_error_behind(error: BaseException) -> Optional[OSError]:
    """The OSError that ``error`` was raised from or while handling, if any."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def atomic_save(obj: dict, path: str) -> None:
    """torch.save ``obj`` to ``path`` atomically."""
    write_atomically(path, lambda f: torch.save(obj, f))


def atomic_write_text(text: str, path: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    write_atomically(path, lambda f: f.write(text.encode()))


def leftover_temporaries(folder: str) -> List[Tuple[str, str]]:
    """(temporary file, the file it was to become) for every temporary of :func:`write_atomically`
    in ``folder``: leftovers once nobody writes there."""
    found = []
    for name in os.listdir(folder):
        match = _TEMPORARY_NAME.fullmatch(name)
        if match:
            found.append((os.path.join(folder, name), os.path.join(folder, match.group(1))))
    return found


def is_disk_full(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)


class FolderLock:
    """An exclusive lock on ``folder/name`` held by this process while it lives, or None from
    :meth:`try_take` when another process has it. A POSIX record lock (``lockf``): the kernel, or an
    NFS server, ties it to the process itself, so it holds across containers whose processes have
    equal PIDs and across machines on NFS, processes forked from the holder (loader workers, which
    may outlive a killed holder by seconds) do not share it, and it is let go when the holder dies
    however it dies. The holder (host, PID, time, Slurm job) is written into the file for the
    message of whoever is refused."""

    def __init__(self, fd: int, path: str):
        self.fd, self.path = fd, path

    @classmethod
    def try_take(cls, folder: str, name: str) -> Tuple[Optional['FolderLock'], str]:
        """(the lock, '') or (None, what the file says of its holder). Raises OSError where the file
        system has no locks."""
        path = os.path.join(folder, name)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EACCES, errno.EAGAIN):
                os.close(fd)
                raise
            holder = os.pread(fd, 1000, 0).decode(errors='replace').strip()
            os.close(fd)
            return None, holder
        owner = (f'host {socket.gethostname()}, pid {os.getpid()}, since '
                 f'{datetime.datetime.now().isoformat(timespec="seconds")}'
                 + (f', Slurm job {os.environ["SLURM_JOB_ID"]}' if 'SLURM_JOB_ID' in os.environ else ''))
        os.ftruncate(fd, 0)
        os.pwrite(fd, owner.encode() + b'\n', 0)
        return cls(fd, path), ''


# --- checkpoint files -----------------------------------------------------------------------------

CHECKPOINT_LAST = 'ckpt_last.pth'
CHECKPOINT_BEST = 'ckpt_best.pth'
_EPOCH_CHECKPOINT = re.compile(r'^ckpt_epoch_(\d+)\.pth$')


def epoch_checkpoint_name(epoch: int) -> str:
    return f'ckpt_epoch_{epoch}.pth'


def epoch_of_checkpoint_name(name: str) -> Optional[int]:
    """N of ckpt_epoch_N.pth, else None."""
    match = _EPOCH_CHECKPOINT.match(name)
    return int(match.group(1)) if match else None


def checkpoint_files(out_dir: str) -> List[str]:
    """The checkpoints of a run folder: ckpt_last.pth, ckpt_best.pth and ckpt_epoch_N.pth."""
    names = [CHECKPOINT_LAST, CHECKPOINT_BEST] + sorted(n for n in os.listdir(out_dir) if _EPOCH_CHECKPOINT.match(n))
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


def data_record(checkpoint: dict) -> dict:
    """What a training checkpoint of this project records of its run's data (the task's identity of
    it: classes, image count); {} for other weights."""
    identity = checkpoint.get('identity')
    record = identity.get('data') if isinstance(identity, dict) else None
    return record if isinstance(record, dict) else {}


def load_weights(model: torch.nn.Module, state: dict, source: str, target: str = 'this model') -> None:
    """Load ``state`` into ``model``, every key at its shape, or raise one CheckpointError:
    '``source`` does not fit ``target``: what is missing, unexpected or of another shape'. The one
    way weights are loaded: checkpoints, pretrained weights, backbones and teachers."""
    report = state_dict_mismatch(model.state_dict(), state)
    if report:
        raise CheckpointError(f'{source} does not fit {target}: {report}')
    model.load_state_dict(state)


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
