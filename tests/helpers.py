"""What several test modules share: running main.py as users do, tiny data and options, checks of
one-line errors and of bitwise-equal runs, and the authors' seeded test vectors. (pytest.ini puts the
repository root and this folder on the import path.)"""
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]

TINY_OPTS = ['MODEL.FAT.EMBED_DIMS', '[8, 16, 16, 16]', 'MODEL.FAT.DEPTHS', '[1, 1, 1, 1]',
             'MODEL.FAT.NUM_HEADS', '[1, 1, 1, 1]', 'DATA.IMG_SIZE', '32', 'DATA.NUM_WORKERS', '0',
             'TRAIN.EPOCHS', '1', 'TRAIN.WARMUP_EPOCHS', '0', 'PRINT_FREQ', '2', 'AUG.AUTO_AUGMENT', 'none',
             'AUG.MIXUP', '0.0', 'AUG.CUTMIX', '0.0', 'AUG.REPROB', '0.0']

# Random augmentation (RandAugment, random erasing), Mixup/CutMix, drop path and EMA all on: an exact
# resume must restore every random state and every sample's augmentation.
EXACT_OPTS = ['TRAIN.EPOCHS', '3', 'PRINT_FREQ', '1', 'DATA.NUM_WORKERS', '1', 'AUG.AUTO_AUGMENT',
              'rand-m9-mstd0.5-inc1', 'AUG.REPROB', '0.25', 'AUG.MIXUP', '0.8', 'AUG.CUTMIX', '1.0',
              'MODEL.DROP_PATH_RATE', '0.1', 'MODEL.EMA.ENABLE', 'True', 'SAVE_FREQ', '1']


def make_image_folder(root: Path, classes: int, train_per_class: int, val_per_class: int, size: int = 40) -> Path:
    rng = np.random.default_rng(0)
    for split, count in (('train', train_per_class), ('val', val_per_class)):
        for c in range(classes):
            folder = root / split / f'class_{c}'
            folder.mkdir(parents=True)
            for i in range(count):
                image = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
                image[:, :, c % 3] += np.uint8(80 + 40 * (c // 3 % 4))  # classes differ in colour
                cv2.imwrite(str(folder / f'{i}.png'), image)
    return root


def project_env(**variables: str) -> dict:
    """The environment of a Python subprocess that imports the project's modules (as pytest's
    ``pythonpath`` does for the tests), plus ``variables``."""
    return dict(os.environ, PYTHONPATH=str(ROOT), **variables)


def run_main(*args, nproc: int = 1, check: bool = True, threads: int = 1) -> subprocess.CompletedProcess:
    launcher = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', str(nproc)] if nproc > 1 \
        else [sys.executable]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    proc = subprocess.run(launcher + ['main.py', '--device', 'cpu', *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f'main.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}')
    return proc


def train_args(data: Path, output: Path, *extra_opts: str, batch_size: int = 4):
    return ['--data-path', data, '--output', output, '--batch-size', batch_size, '--opts', *TINY_OPTS, *extra_opts]


def start_main(*args, nproc: int = 1, threads: int = 1) -> subprocess.Popen:
    """main.py in the background, in its own process group (a cluster signals the whole job)."""
    launcher = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', str(nproc)] if nproc > 1 \
        else [sys.executable]
    return subprocess.Popen(launcher + ['main.py', '--device', 'cpu', *map(str, args)], cwd=ROOT,
                            env=dict(os.environ, OMP_NUM_THREADS=str(threads)), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def wait_for_log(log: Path, text: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if log.exists() and text in log.read_text():
            return
        if proc.poll() is not None:
            raise AssertionError(f'main.py ended before logging {text!r}: {proc.communicate()}')
        time.sleep(0.02)
    proc.kill()
    raise AssertionError(f'{text!r} never appeared in {log}')


def assert_same_weights(a: dict, b: dict) -> None:
    assert a['epoch'] == b['epoch'] and a['step'] == b['step']
    for key in a['model']:
        assert torch.equal(a['model'][key], b['model'][key]), key
    for key in a['ema'] or {}:
        assert torch.equal(a['ema'][key], b['ema'][key]), key


def error_lines(stderr: str) -> list:
    return [line for line in stderr.splitlines() if line.startswith('error: ')]


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert 'Traceback' not in proc.stderr
    errors = error_lines(proc.stderr)
    assert len(errors) == 1, proc.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def last_checkpoint(out: Path) -> dict:
    return torch.load(out / 'fat_b0' / 'default' / 'ckpt_last.pth', weights_only=True)


VECTORS = json.loads((Path(__file__).parent / 'data' / 'fat_seeded_vectors.json').read_text())
CASES = {case['name']: case for case in VECTORS['cases']}


def authors_state_dict(case: dict) -> dict:
    """The weights the file's rule makes: one generator, the keys in the authors' order."""
    g = torch.Generator().manual_seed(case['weight_seed'])
    state = {}
    for key, shape in case['keys']:
        if key.endswith('num_batches_tracked'):
            state[key] = torch.zeros(shape, dtype=torch.int64)
        elif key.endswith('running_var'):
            state[key] = 0.5 + torch.rand(shape, generator=g)
        elif key.endswith('running_mean'):
            state[key] = 0.1 * torch.randn(shape, generator=g)
        elif len(shape) == 1 and key.endswith('weight'):
            state[key] = 1 + 0.1 * torch.randn(shape, generator=g)
        elif key.endswith('bias'):
            state[key] = 0.1 * torch.randn(shape, generator=g)
        else:
            state[key] = torch.randn(shape, generator=g) / math.sqrt(math.prod(shape[1:]))
    return state
