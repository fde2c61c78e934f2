"""``MODEL.DWCONV_IMPL auto``'s choice, measured: ours or PyTorch's for one depthwise-conv case,
whichever ran faster on this device, as cuDNN's benchmark mode chooses among its algorithms.

A :class:`Case` is (kernel size, stride, dtype, layout, input shape, whether a backward runs). At its
first use both implementations run it on random data (from a private generator: the global RNG is
untouched) and the faster is kept: in the process, and in a JSON file for this device,
``<identity>.json`` in ``$FAT_DWCONV_TUNE_DIR`` (default: the kernels' build folder's ``autotune/``).
The identity covers what the timings depend on: the device's name, torch, CUDA and cuDNN (on CPU: the CPU, torch, our library's
build and the thread count) and our kernels' sources. So later runs on the machine choose the same
kernels without timing. A training run also keeps the decisions it used in its own folder (so its
resumes, on any node, run them), adopting the machine's where they exist and adding its own there
(except a timing that failed: that may be the run's alone). The first decision written
for a case stands: a process that timed it at the same time adopts the file's.

Bounded: at most ``FAT_DWCONV_TUNE_SECONDS`` (default 5) of timing per process and device, about
``CASE_SECONDS`` per case. Cases beyond it take the measured tables (``PREFERRED_CASES``) and are remembered
as such. On CPU only the training case differs (our weight gradient), timed with the batch cut so
that one input holds at most ``CPU_TIMING_VALUES`` values.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import math
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from . import cpu, toolchain
from .build import build_directory
from .trusted import write_replacing

logger = logging.getLogger('kernels.dwconv')

BUDGET_VARIABLE = 'FAT_DWCONV_TUNE_SECONDS'
FOLDER_VARIABLE = 'FAT_DWCONV_TUNE_DIR'  # where the decisions files go (default: the build folder's autotune/)
DEFAULT_BUDGET_SECONDS = 5.0
CASE_SECONDS = 0.05  # timing of one case, once each ran untimed
CPU_TIMING_VALUES = 2 ** 18


@dataclass(frozen=True)
class Case:
    """One depthwise conv as run: ``shape`` is its input's (N, C, H, W); ``backward``: gradients are computed."""
    kernel_size: int
    stride: int
    dtype: torch.dtype
    channels_last: bool
    shape: Tuple[int, int, int, int]
    backward: bool

    def key(self) -> str:
        return (f'k{self.kernel_size}s{self.stride} {str(self.dtype).split(".")[-1]} '
                f'{"channels_last" if self.channels_last else "nchw"} {"x".join(map(str, self.shape))} '
                f'{"forward+backward" if self.backward else "forward"}')


@dataclass
class Stats:
    """What a tuner did in this process: cases timed (and the seconds), and left to the tables."""
    timed: int = 0
    seconds: float = 0.0
    untimed: int = 0


def identity(device: torch.device) -> Dict[str, str]:
    """What the timings on ``device`` depend on."""
    if device.type == 'cuda':
        return {'device': torch.cuda.get_device_name(device), 'torch': torch.__version__,
                'cuda': str(torch.version.cuda), 'cudnn': str(torch.backends.cudnn.version()),
                'kernels': toolchain.source_hash()}
    compiler = cpu._compiler() or 'none'
    return {'device': hashlib.sha1(cpu._cpu_identity().encode()).hexdigest()[:16], 'torch': torch.__version__,
            'library': os.path.basename(os.path.dirname(cpu.library_path('', compiler))),
            'threads': str(torch.get_num_threads())}


def budget_seconds() -> float:
    value = os.environ.get(BUDGET_VARIABLE, '')
    try:
        seconds = float(value) if value else DEFAULT_BUDGET_SECONDS
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:  # also NaN
        logger.warning(f'{BUDGET_VARIABLE}={value!r} is not a number of seconds; using {DEFAULT_BUDGET_SECONDS}')
        return DEFAULT_BUDGET_SECONDS
    return seconds


def _inputs(device: torch.device, case: Case, generator: torch.Generator):
    n, c, h, w = case.shape
    if device.type == 'cpu':
        n = max(1, min(n, CPU_TIMING_VALUES // max(1, c * h * w)))
    k = case.kernel_size
    x = torch.randn((n, c, h, w), device=device, generator=generator).to(case.dtype)
    if case.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn((c, 1, k, k), device=device, generator=generator)
    bias = torch.randn((c,), device=device, generator=generator)
    return [t.requires_grad_(case.backward) for t in (x, weight, bias)]


def candidates(device: torch.device, case: Case, ours: Callable) -> Dict[str, Callable[[], object]]:
    """The two ways to run ``case`` on ``device``, each a call of no arguments: ``ours(x, weight, bias,
    stride)`` and ``F.conv2d`` (the fp32 weight and bias cast to the input's dtype, as autocast
    does), with their gradients in x, weight and bias when ``case.backward``."""
    generator = torch.Generator(device=device).manual_seed(0)
    x, weight, bias = _inputs(device, case, generator)
    k, s = case.kernel_size, case.stride
    out_grad = []

    def theirs(x_, w_, b_, stride):
        return F.conv2d(x_, w_.to(x_.dtype), b_.to(x_.dtype), stride, k // 2, 1, x_.shape[1])

    def run(conv):
        def call():
            with torch.inference_mode(False), torch.set_grad_enabled(case.backward), \
                    torch.autocast(device.type, enabled=False):
                y = conv(x, weight, bias, s)
                if case.backward:
                    if not out_grad:
                        out_grad.append(torch.randn(y.shape, device=device, generator=generator).to(y.dtype))
                    torch.autograd.grad(y, (x, weight, bias), out_grad[0])
        return call

    return {'ours': run(ours), 'torch': run(theirs)}


def measure(calls: Dict[str, Callable[[], object]], device: torch.device, seconds: float) -> Dict[str, float]:
    """The fastest of a few timed runs of each call, in seconds: once each untimed first (first-use
    costs), then alternating, for about ``seconds`` and at least one timed run each."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == 'cuda' else (lambda: None)
    for call in calls.values():
        call()
    best = {name: math.inf for name in calls}
    start = time.perf_counter()
    while True:
        for name, call in calls.items():
            sync()
            began = time.perf_counter()
            call()
            sync()
            best[name] = min(best[name], time.perf_counter() - began)
        if time.perf_counter() - start >= seconds:
            return best


class Tuner:
    """Decisions for one device: in memory, backed by the device's file (None: none kept). A run's
    tuner has the machine's as ``machine``: it adopts the decisions made there, and adds its own."""

    def __init__(self, device: torch.device, path: Optional[str], budget: float, machine: Optional['Tuner'] = None):
        self.device, self.path, self.budget, self.machine = device, path, budget, machine
        self.stats = Stats()
        self._decided: Dict[Case, bool] = {}
        self._lock = threading.RLock()
        self._warned_budget = self._warned_file = False

    def decide(self, case: Case, ours: Callable, usable: Callable[[], bool], table: Callable[[], bool]) -> bool:
        """Whether ``ours`` runs ``case``: as remembered (here, else in ``machine``'s file, then
        copied here), else as timed against PyTorch's (``table()`` once the budget is spent), then
        remembered in both; never where ``usable()`` (our kernels' self-check in this process) fails."""
        with self._lock:
            if case not in self._decided:
                entry = self._read().get(case.key()) or self._adopted_or_new(case, ours, usable, table)
                self._decided[case] = entry is not None and entry['ours'] and usable()
            return self._decided[case]

    def _adopted_or_new(self, case: Case, ours: Callable, usable: Callable[[], bool],
                        table: Callable[[], bool]) -> Optional[dict]:
        """The decision of a case this file lacks, now kept in it: the machine's, else timed (the
        tables' once the budget is spent) and also given to the machine unless the timing failed (that
        may be this run's alone). None, and nothing kept, where our kernels fail the self-check here."""
        key = case.key()
        entry = self.machine._read().get(key) if self.machine else None
        if entry is None:
            if not usable():
                return None
            entry = self._time(case, ours) if self.stats.seconds < self.budget else self._untimed(table())
            if self.machine and not entry.get('failed'):
                entry = self.machine._remember(key, entry)
        return self._remember(key, entry)

    def _time(self, case: Case, ours: Callable) -> dict:
        began = time.perf_counter()
        try:
            best = measure(candidates(self.device, case, ours), self.device, CASE_SECONDS)
        except Exception as error:  # out of memory at the run's batch, a kernel failing on this shape
            logger.warning(f'timing {case.key()} on {self.device} failed ({type(error).__name__}: {error}); '
                           'PyTorch runs it')
            return {'ours': False, 'timed': False, 'failed': f'{type(error).__name__}: {error}'[:200]}
        finally:
            self.stats.seconds += time.perf_counter() - began
        self.stats.timed += 1
        logger.debug(f'{case.key()}: ours {best["ours"] * 1e3:.3f} ms, PyTorch {best["torch"] * 1e3:.3f} ms')
        return {'ours': best['ours'] < best['torch'], 'ours_ms': round(best['ours'] * 1e3, 4),
                'torch_ms': round(best['torch'] * 1e3, 4)}

    def _untimed(self, ours: bool) -> dict:
        self.stats.untimed += 1
        if not self._warned_budget:
            self._warned_budget = True
            files = [path for path in (self.path, self.machine and self.machine.path) if path]
            logger.warning(f'depthwise-conv tuning on {self.device} spent its {self.budget:g} s ({BUDGET_VARIABLE}): '
                           f'this case and later ones take the measured tables'
                           + (f'; delete {" and ".join(files)} to time them in a later run' if files else ''))
        return {'ours': ours, 'timed': False}

    def _read(self) -> Dict[str, dict]:
        """The file's decisions; a file that is not ours (unreadable, malformed) counts as empty."""
        if self.path is None or not os.path.exists(self.path):
            return {}
        try:
            with open(self.path) as f:
                decisions = json.load(f)['decisions']
            if isinstance(decisions, dict) and all(isinstance(v, dict) and isinstance(v.get('ours'), bool)
                                                   for v in decisions.values()):
                return decisions
            problem = 'its decisions are malformed'
        except (OSError, ValueError, KeyError, TypeError) as error:
            problem = f'{type(error).__name__}: {error}'
        if not self._warned_file:
            self._warned_file = True
            logger.warning(f'ignoring the depthwise-conv tuning file {self.path} ({problem}); it will be rewritten')
        return {}

    def _remember(self, key: str, entry: dict) -> dict:
        """Write ``entry`` unless the file already decides ``key``; the entry that stands."""
        if self.path is None:
            return entry
        try:
            with open(self.path + '.lock', 'w') as guard:
                fcntl.flock(guard, fcntl.LOCK_EX)
                decisions = self._read()
                if key in decisions:
                    return decisions[key]
                decisions[key] = entry
                content = json.dumps({'identity': identity(self.device), 'decisions': decisions}, indent=1,
                                     sort_keys=True)
                write_replacing(self.path, lambda tmp: Path(tmp).write_text(content))
        except OSError as error:
            logger.warning(f'cannot keep depthwise-conv tuning decisions in {self.path} ({error}); a later run, a '
                           'resumed one included, may choose other kernels')
            self.path = None
        return entry


_tuners: Dict[Tuple[str, str], Tuner] = {}
_tuners_lock = threading.Lock()


def tuner(device: torch.device, folder: Optional[str] = None) -> Tuner:
    """The process's tuner for ``device`` whose decisions file is in ``folder``, made at first use.
    Without ``folder``: the machine's, in ``$FAT_DWCONV_TUNE_DIR``, else the build folder's
    ``autotune/``. With one (a training run's), backed by the machine's: so two runs on one machine
    run the same kernels, and a run keeps them wherever it resumes."""
    machine = tuner(device) if folder else None
    folder = folder or os.environ.get(FOLDER_VARIABLE) or ''
    with _tuners_lock:
        if (str(device), folder) not in _tuners:
            who = identity(device)
            digest = hashlib.sha1(json.dumps(who, sort_keys=True).encode()).hexdigest()[:16]
            try:
                where = folder or os.path.join(build_directory(), 'autotune')
                os.makedirs(where, mode=0o700, exist_ok=True)
                path: Optional[str] = os.path.join(where, f'{digest}.json')
            except (OSError, RuntimeError) as error:
                kept, risk = (('in the run folder', 'a resume of this run') if machine else
                              ('for this machine', 'another run of the same config'))
                logger.warning(f'depthwise-conv tuning decisions are not kept {kept} ({error}); {risk} may '
                               'choose other kernels')
                path = None
            _tuners[str(device), folder] = Tuner(device, path, budget_seconds(), machine)
        return _tuners[str(device), folder]


def reset() -> None:
    """Forget every tuner of this process (its decisions and budget; the files stay)."""
    with _tuners_lock:
        _tuners.clear()
