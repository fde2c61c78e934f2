"""Training survives kills, preemption, non-finite losses and bad input (CPU, through main.py)."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_training import ROOT, make_image_folder, run_main, train_args  # noqa: E402

# Random augmentation, Mixup/CutMix and drop path all on: an exact resume must restore every RNG.
EXACT_OPTS = ['TRAIN.EPOCHS', '3', 'PRINT_FREQ', '1', 'DATA.NUM_WORKERS', '1', 'AUG.MIXUP', '0.8', 'AUG.CUTMIX', '1.0',
              'MODEL.DROP_PATH_RATE', '0.1', 'MODEL.EMA.ENABLE', 'True', 'SAVE_FREQ', '1']


@pytest.fixture(scope='module')
def data(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp('data'), classes=3, train_per_class=8, val_per_class=3)


@pytest.fixture(scope='module')
def uninterrupted(data, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp('uninterrupted')
    run_main(*train_args(data, out, *EXACT_OPTS))
    return torch.load(out / 'fat_b0' / 'default' / 'ckpt_last.pth', weights_only=True)


def start_main(*args) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS='1')
    return subprocess.Popen([sys.executable, 'main.py', '--device', 'cpu', *map(str, args)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_log(log: Path, text: str, proc: subprocess.Popen, timeout: float = 120) -> None:
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
    for key in a['ema']:
        assert torch.equal(a['ema'][key], b['ema'][key]), key


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert 'Traceback' not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith('error: ')]
    assert len(errors) == 1, proc.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


# --- exact resume, preemption ----------------------------------------------------------------------

@pytest.mark.parametrize('kill_at', ['Train: [0/3][4/6]', 'Train: [1/3][2/6]', 'EPOCH 1 training takes'])
def test_sigkill_then_same_command_ends_bitwise_identical(data, tmp_path, uninterrupted, kill_at):
    args = train_args(data, tmp_path, *EXACT_OPTS)
    proc = start_main(*args)
    wait_for_log(tmp_path / 'fat_b0' / 'default' / 'log.txt', kill_at, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    run_main(*args)
    assert_same_weights(torch.load(tmp_path / 'fat_b0' / 'default' / 'ckpt_last.pth', weights_only=True), uninterrupted)


def test_sigterm_saves_mid_epoch_and_the_restart_continues_exactly(data, tmp_path, uninterrupted):
    args = train_args(data, tmp_path, *EXACT_OPTS)
    run_dir = tmp_path / 'fat_b0' / 'default'
    proc = start_main(*args)
    wait_for_log(run_dir / 'log.txt', 'Train: [1/3][1/6]', proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM
    assert 'stopped by SIGTERM at epoch 1 step' in stderr and 'Run the same command again' in stderr
    saved = torch.load(run_dir / 'ckpt_last.pth', weights_only=True)
    assert saved['epoch'] == 1 and 0 < saved['step'] < 6

    restarted = run_main(*args)
    assert f"resumed from {run_dir / 'ckpt_last.pth'} (epoch 1, {saved['step']} steps done" in restarted.stdout
    assert f"Train: [1/3][{saved['step']}/6]" in restarted.stdout and 'Train: [1/3][0/6]' not in restarted.stdout
    assert_same_weights(torch.load(run_dir / 'ckpt_last.pth', weights_only=True), uninterrupted)


def test_checkpoint_is_plain_data_with_everything_a_resume_needs(uninterrupted):
    assert {'model', 'optimizer', 'lr_scheduler', 'scaler', 'ema', 'epoch', 'step', 'max_accuracy', 'rng',
            'config'} <= set(uninterrupted)
    assert set(uninterrupted['rng'][0]) == {'python', 'numpy', 'torch', 'cuda'}
    assert 'EMBED_DIMS' in uninterrupted['config']


def test_auto_resume_skips_a_corrupt_newest_checkpoint(data, tmp_path):
    args = train_args(data, tmp_path, 'SAVE_FREQ', '1')
    run_main(*args)
    run_dir = tmp_path / 'fat_b0' / 'default'
    good = (run_dir / 'ckpt_last.pth').read_bytes()
    (run_dir / 'ckpt_epoch_7.pth').write_bytes(good[: len(good) // 2])  # torn write from elsewhere, newest
    proc = run_main(*train_args(data, tmp_path, 'TRAIN.EPOCHS', '2'))
    assert 'skipping checkpoint' in proc.stdout and 'ckpt_epoch_7.pth' in proc.stdout
    assert 'resumed from' in proc.stdout and 'Train: [1/2]' in proc.stdout and 'Train: [0/2]' not in proc.stdout
    assert (run_dir / 'ckpt_epoch_7.pth').exists(), 'nothing the user has is deleted'


# --- non-finite loss ----------------------------------------------------------------------------

def test_non_finite_loss_stops_with_epoch_and_step_and_writes_nothing(data, tmp_path):
    proc = run_main(*train_args(data, tmp_path, 'TRAIN.BASE_LR', '1e35', 'TRAIN.CLIP_GRAD', '0.0'), check=False)
    assert_one_line_error(proc, 'non-finite loss or gradients at epoch 0 step', 'MAX_NONFINITE_STEPS')
    assert not list((tmp_path / 'fat_b0' / 'default').glob('ckpt_*.pth'))


def test_skipping_non_finite_steps_never_saves_non_finite_weights(data, tmp_path):
    proc = run_main(*train_args(data, tmp_path, 'TRAIN.BASE_LR', '1e35', 'TRAIN.CLIP_GRAD', '0.0',
                                'TRAIN.MAX_NONFINITE_STEPS', '1000'), check=False)
    checkpoints = list((tmp_path / 'fat_b0' / 'default').glob('ckpt_*.pth'))
    if proc.returncode == 0:  # the skipped steps kept everything finite: whatever was saved is finite
        state = torch.load(checkpoints[0], weights_only=True)['model']
        assert all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point())
    else:
        assert_one_line_error(proc, 'non-finite', 'not saving them')
        assert not checkpoints


# --- bad input: one clear line, non-zero exit -----------------------------------------------------

def test_missing_data_path(tmp_path):
    proc = run_main(*train_args(tmp_path / 'nowhere', tmp_path), check=False)
    assert_one_line_error(proc, 'data folder not found', 'nowhere')


def test_empty_data_folder(tmp_path):
    (tmp_path / 'data' / 'train').mkdir(parents=True)
    (tmp_path / 'data' / 'val').mkdir(parents=True)
    proc = run_main(*train_args(tmp_path / 'data', tmp_path), check=False)
    assert_one_line_error(proc, str(tmp_path / 'data' / 'train'), 'class folder')


def test_class_folder_without_images(tmp_path):
    data = make_image_folder(tmp_path / 'data', classes=2, train_per_class=4, val_per_class=2)
    (data / 'train' / 'class_9').mkdir()
    proc = run_main(*train_args(data, tmp_path), check=False)
    assert_one_line_error(proc, 'class_9')


def test_corrupt_image_is_named_or_skipped(tmp_path):
    data = make_image_folder(tmp_path / 'data', classes=2, train_per_class=4, val_per_class=2)
    broken = data / 'train' / 'class_1' / '2.png'
    broken.write_bytes(b'not a png at all')
    proc = run_main(*train_args(data, tmp_path, batch_size=2), check=False)
    assert_one_line_error(proc, 'cannot read image', str(broken))
    skipped = run_main(*train_args(data, tmp_path / 'skip', 'DATA.SKIP_CORRUPT', 'True', batch_size=2))
    assert f'cannot read image {broken}' in skipped.stderr + skipped.stdout and 'skipped (DATA.SKIP_CORRUPT)' in \
        skipped.stderr + skipped.stdout


@pytest.mark.parametrize('opts,fragments', [
    (['TRAIN.EPOCHZ', '3'], ['TRAIN.EPOCHZ', 'Non-existent']),
    (['TRAIN.EPOCHS', 'many'], ['TRAIN.EPOCHS', 'Type mismatch']),
    (['MODEL.FAT.NUM_HEADS', '[3, 3, 3, 3]'], ['MODEL', 'not divisible']),
])
def test_bad_config_key_or_value(data, tmp_path, opts, fragments):
    assert_one_line_error(run_main(*train_args(data, tmp_path, *opts), check=False), *fragments)


def test_missing_cfg_file(tmp_path):
    proc = run_main('--cfg', tmp_path / 'nope.yaml', check=False)
    assert_one_line_error(proc, 'config file not found', 'nope.yaml')


def test_checkpoint_of_another_architecture_names_the_keys(data, tmp_path):
    run_main(*train_args(data, tmp_path))
    ckpt = tmp_path / 'fat_b0' / 'default' / 'ckpt_last.pth'
    wider = train_args(data, tmp_path / 'eval', 'MODEL.FAT.EMBED_DIMS', '[8, 16, 32, 32]')
    assert_one_line_error(run_main('--eval', '--resume', ckpt, *wider, check=False),
                          'does not fit this model', 'shape mismatch', 'stages.2')
    more_classes = make_image_folder(tmp_path / 'data5', classes=5, train_per_class=2, val_per_class=1)
    assert_one_line_error(run_main('--eval', '--resume', ckpt, *train_args(more_classes, tmp_path / 'e2'),
                                   check=False), 'head.weight')
    tuned = run_main('--pretrained', ckpt, *train_args(more_classes, tmp_path / 'ft'))
    assert 'the classifier is re-initialised for fine-tuning' in tuned.stdout


def test_corrupt_checkpoint_for_eval_is_named(data, tmp_path):
    bad = tmp_path / 'bad.pth'
    bad.write_bytes(b'\x00' * 100)
    assert_one_line_error(run_main('--eval', '--resume', bad, *train_args(data, tmp_path), check=False),
                          'cannot read checkpoint', str(bad))


def test_batch_larger_than_the_data(data, tmp_path):
    assert_one_line_error(run_main(*train_args(data, tmp_path, batch_size=64), check=False),
                          'DATA.BATCH_SIZE 64', '24 training images')


def test_unwritable_output_folder(data, tmp_path):
    blocker = tmp_path / 'a_file'
    blocker.write_text('')
    assert_one_line_error(run_main(*train_args(data, blocker), check=False), 'cannot write to the output folder')


def test_debug_shows_the_traceback(tmp_path):
    proc = run_main('--debug', '--cfg', tmp_path / 'nope.yaml', check=False)
    assert proc.returncode != 0 and 'Traceback' in proc.stderr
