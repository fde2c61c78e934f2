"""Training survives kills, preemption, non-finite losses, cluster quirks and bad input (CPU, through
main.py; several processes: 2 gloo processes under torchrun)."""
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_training import ROOT, TINY_OPTS, make_image_folder, run_main, train_args  # noqa: E402

# Random augmentation (RandAugment, random erasing), Mixup/CutMix, drop path and EMA all on: an exact
# resume must restore every random state and every sample's augmentation.
EXACT_OPTS = ['TRAIN.EPOCHS', '3', 'PRINT_FREQ', '1', 'DATA.NUM_WORKERS', '1', 'AUG.AUTO_AUGMENT',
              'rand-m9-mstd0.5-inc1', 'AUG.REPROB', '0.25', 'AUG.MIXUP', '0.8', 'AUG.CUTMIX', '1.0',
              'MODEL.DROP_PATH_RATE', '0.1', 'MODEL.EMA.ENABLE', 'True', 'SAVE_FREQ', '1']
# Two processes, two micro-batches per optimizer step, a log line every other micro-batch: the
# combination whose stop request used to be checked never (log lines fell on non-update steps).
ACCUMULATION_OPTS = ['TRAIN.EPOCHS', '2', 'TRAIN.ACCUMULATION_STEPS', '2', 'PRINT_FREQ', '2',
                     'AUG.MIXUP', '0.8', 'MODEL.DROP_PATH_RATE', '0.1']


@pytest.fixture(scope='module')
def data(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp('data'), classes=3, train_per_class=8, val_per_class=3)


@pytest.fixture(scope='module')
def data48(tmp_path_factory) -> Path:
    """Twelve batches of 2 per process and epoch with 2 processes."""
    return make_image_folder(tmp_path_factory.mktemp('data48'), classes=3, train_per_class=16, val_per_class=3)


@pytest.fixture(scope='module')
def uninterrupted(data, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp('uninterrupted')
    run_main(*train_args(data, out, *EXACT_OPTS))
    return torch.load(out / 'fat_b0' / 'default' / 'ckpt_last.pth', weights_only=True)


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


# --- exact resume, preemption ----------------------------------------------------------------------

@pytest.fixture(scope='module')
def data_shards(data, tmp_path_factory) -> Path:
    """``data`` converted to shards (python -m data.shards), a few samples per shard."""
    from data.shards import convert
    out = tmp_path_factory.mktemp('shards') / 'shards'
    convert(str(data), str(out), shard_mb=0.01, log=lambda line: None)
    return out


@pytest.mark.parametrize('form', ['folder', 'shards'])
def test_sigkill_mid_epoch_after_a_checkpoint_then_same_command_ends_bitwise_identical(form, data, tmp_path,
                                                                                      uninterrupted, request):
    # From shards, the same samples as from the folder: the uninterrupted folder run is the reference.
    source = request.getfixturevalue('data_shards') if form == 'shards' else data
    args = train_args(source, tmp_path, *EXACT_OPTS)
    log = tmp_path / 'fat_b0' / 'default' / 'log.txt'
    proc = start_main(*args)
    wait_for_log(log, 'Train: [1/3][3/6]', proc)  # epoch 0 is saved; epoch 1 is half done
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    restarted = run_main(*args)
    assert 'resumed from' in restarted.stdout and '(epoch 0, 6 steps done' in restarted.stdout
    assert_same_weights(last_checkpoint(tmp_path), uninterrupted)


def test_sigterm_saves_mid_epoch_and_the_restart_continues_exactly(data, tmp_path, uninterrupted):
    args = train_args(data, tmp_path, *EXACT_OPTS)
    run_dir = tmp_path / 'fat_b0' / 'default'
    proc = start_main(*args)
    wait_for_log(run_dir / 'log.txt', 'Train: [1/3][1/6]', proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM
    assert 'stopped by SIGTERM at epoch 1 step' in stderr and 'Run the same command again' in stderr
    saved = last_checkpoint(tmp_path)
    assert saved['epoch'] == 1 and 0 < saved['step'] < 6

    restarted = run_main(*args)
    assert f"resumed from {run_dir / 'ckpt_last.pth'} (epoch 1, {saved['step']} steps done" in restarted.stdout
    assert f"Train: [1/3][{saved['step']}/6]" in restarted.stdout and 'Train: [1/3][0/6]' not in restarted.stdout
    assert_same_weights(last_checkpoint(tmp_path), uninterrupted)


def test_sigterm_to_two_processes_with_accumulation_stops_within_two_steps_and_resumes_exactly(data48, tmp_path):
    run_main(*train_args(data48, tmp_path / 'reference', *ACCUMULATION_OPTS, batch_size=2), nproc=2)
    args = train_args(data48, tmp_path / 'run', *ACCUMULATION_OPTS, batch_size=2)
    log = tmp_path / 'run' / 'fat_b0' / 'default' / 'log.txt'
    proc = start_main(*args, nproc=2)
    wait_for_log(log, 'Train: [0/2][2/12]', proc)
    os.killpg(proc.pid, signal.SIGTERM)  # as a cluster preempts a job: launcher and workers
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert stderr.count('stopped by SIGTERM at epoch 0 step') == 1, stderr[-3000:]
    signalled_at = max(int(step) for step in re.findall(r'Train: \[0/2\]\[(\d+)/12\]', log.read_text().split(
        'received SIGTERM')[0]))
    saved = last_checkpoint(tmp_path / 'run')
    assert saved['epoch'] == 0 and saved['step'] % 2 == 0, 'at an optimizer-step boundary'
    # the signal lands in the optimizer step after the logged micro-batch; that one and two more finish
    assert signalled_at < saved['step'] <= signalled_at + 2 + 2 * 2, 'within two optimizer steps'

    restarted = run_main(*args, nproc=2)
    assert f"(epoch 0, {saved['step']} steps done" in restarted.stdout
    assert_same_weights(last_checkpoint(tmp_path / 'run'), last_checkpoint(tmp_path / 'reference'))


def test_checkpoint_is_plain_data_with_everything_a_resume_needs(uninterrupted):
    assert {'model', 'optimizer', 'optimizer_params', 'scaler', 'ema', 'epoch', 'step', 'steps_per_epoch',
            'best_metric', 'metrics', 'nonfinite_steps', 'rng', 'config', 'identity'} <= set(uninterrupted)
    assert set(uninterrupted['rng'][0]) == {'python', 'numpy', 'torch', 'cuda'}
    assert 'EMBED_DIMS' in uninterrupted['config']


# --- which checkpoint a run resumes ----------------------------------------------------------------

def test_auto_resume_skips_a_corrupt_newest_checkpoint(data, tmp_path):
    run_main(*train_args(data, tmp_path, 'SAVE_FREQ', '1'))
    run_dir = tmp_path / 'fat_b0' / 'default'
    good = (run_dir / 'ckpt_last.pth').read_bytes()
    (run_dir / 'ckpt_epoch_7.pth').write_bytes(good[: len(good) // 2])  # torn write from elsewhere, newest
    proc = run_main(*train_args(data, tmp_path, 'TRAIN.EPOCHS', '2'))
    assert 'skipping' in proc.stdout and 'ckpt_epoch_7.pth' in proc.stdout
    assert 'resumed from' in proc.stdout and 'Train: [1/2]' in proc.stdout and 'Train: [0/2]' not in proc.stdout
    assert (run_dir / 'ckpt_epoch_7.pth').exists(), 'nothing the user has is deleted'


def test_auto_resume_takes_the_newest_in_training_not_the_newest_on_disk(data, tmp_path):
    run_main(*train_args(data, tmp_path, 'TRAIN.EPOCHS', '3', 'SAVE_FREQ', '1'))
    run_dir = tmp_path / 'fat_b0' / 'default'
    (run_dir / 'ckpt_last.pth').unlink()
    (run_dir / 'ckpt_best.pth').unlink()
    os.utime(run_dir / 'ckpt_epoch_0.pth')  # copied or touched: the newest file, the oldest training state
    proc = run_main(*train_args(data, tmp_path, 'TRAIN.EPOCHS', '4'))
    assert f"resumed from {run_dir / 'ckpt_epoch_2.pth'} (epoch 2" in proc.stdout
    assert 'Train: [3/4]' in proc.stdout and 'Train: [1/4]' not in proc.stdout


def test_ckpt_best_is_only_replaced_by_a_better_metric_than_the_run_has_seen(data, tmp_path):
    run_main(*train_args(data, tmp_path))
    run_dir = tmp_path / 'fat_b0' / 'default'
    best = torch.load(run_dir / 'ckpt_best.pth', weights_only=True)
    torch.save({**best, 'best_metric': 101.0}, run_dir / 'ckpt_best.pth')  # a best no later epoch can beat
    last = torch.load(run_dir / 'ckpt_last.pth', weights_only=True)
    torch.save({**last, 'best_metric': 0.0}, run_dir / 'ckpt_last.pth')  # resumed from a file that saw less
    proc = run_main(*train_args(data, tmp_path, 'TRAIN.EPOCHS', '2'))
    assert 'best acc1: 101.0000' in proc.stdout
    assert torch.load(run_dir / 'ckpt_best.pth', weights_only=True)['epoch'] == 0


# --- resume follows the current config ----------------------------------------------------------

def expected_lr(epochs: int, steps_per_epoch: int, step: int, lr_scale: float) -> float:
    """The LR after ``step`` optimizer steps of a fresh TINY_OPTS schedule of ``epochs`` epochs."""
    from argparse import Namespace

    from config import get_config
    from lr_scheduler import build_scheduler
    config = get_config(Namespace(cfg=None, opts=[*TINY_OPTS, 'TRAIN.EPOCHS', str(epochs)]))
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=5e-4 * lr_scale)
    scheduler = build_scheduler(config, optimizer, steps_per_epoch, 5e-7 * lr_scale, 5e-6 * lr_scale)
    scheduler.step_update(step)
    return optimizer.param_groups[0]['lr']


def first_lr_of_epoch(stdout: str, epoch: int, epochs: int) -> float:
    return float(re.search(rf'Train: \[{epoch}/{epochs}\]\[0/\d+\]\s+eta \S+ lr ([\d.e+-]+)', stdout).group(1))


def test_a_longer_run_continues_the_new_schedule_and_lists_what_changed(data, tmp_path):
    run_main(*train_args(data, tmp_path))  # 1 epoch: its cosine ends at MIN_LR
    first = last_checkpoint(tmp_path)
    proc = run_main(*train_args(data, tmp_path, 'TRAIN.EPOCHS', '2', 'MODEL.EMA.ENABLE', 'True'))
    assert 'TRAIN.EPOCHS 1 -> 2' in proc.stdout and 'MODEL.EMA.ENABLE False -> True' in proc.stdout
    ema = last_checkpoint(tmp_path)['ema']  # decay 0.9998 over 6 steps: still almost where it started
    assert all(torch.allclose(ema[k], v, atol=1e-3) for k, v in first['model'].items() if v.is_floating_point()), \
        'an EMA enabled on resume starts from the resumed weights'
    # batch 4 of 24 images: 6 optimizer steps per epoch; LRs scale by 4 / 512
    assert first_lr_of_epoch(proc.stdout, 1, 2) == pytest.approx(expected_lr(2, 6, 7, 4 / 512), rel=2e-3)
    assert first_lr_of_epoch(proc.stdout, 1, 2) > 2 * expected_lr(1, 6, 6, 4 / 512)


def test_resume_on_more_processes_scales_the_lr_to_the_new_total_batch(data, tmp_path):
    run_main(*train_args(data, tmp_path))
    proc = run_main(*train_args(data, tmp_path, 'TRAIN.EPOCHS', '2'), nproc=2, threads=2)
    if len(os.sched_getaffinity(0)) < 4:  # 2 processes x 2 threads would oversubscribe the cores
        assert 'CPU threads per process (lowered from 2' in proc.stdout
    assert 'LR scaled to the total batch: base 7.813e-06' in proc.stdout  # 4 x 2 / 512 x 5e-4
    assert 'random states are not restored' in proc.stdout
    # 24 images / (2 processes x 4): 3 optimizer steps per epoch
    assert first_lr_of_epoch(proc.stdout, 1, 2) == pytest.approx(expected_lr(2, 3, 4, 8 / 512), rel=2e-3)


def test_another_experiment_in_the_same_run_folder_is_refused(data, tmp_path):
    run_main(*train_args(data, tmp_path))
    config_before = (tmp_path / 'fat_b0' / 'default' / 'config.yaml').read_text()
    wider = run_main(*train_args(data, tmp_path, 'MODEL.FAT.EMBED_DIMS', '[8, 16, 32, 32]'), check=False)
    assert_one_line_error(wider, 'holds a run with another architecture', 'EMBED_DIMS', '--tag')
    other_data = make_image_folder(tmp_path / 'five', classes=5, train_per_class=6, val_per_class=1)
    assert_one_line_error(run_main(*train_args(other_data, tmp_path), check=False),
                          'holds a run with another', '--tag')
    assert (tmp_path / 'fat_b0' / 'default' / 'config.yaml').read_text() == config_before, 'nothing overwritten'
    tagged = run_main('--tag', 'wider', *train_args(data, tmp_path, 'MODEL.FAT.EMBED_DIMS', '[8, 16, 32, 32]'))
    assert 'resumed from' not in tagged.stdout


def test_resume_of_a_weights_only_file_points_to_pretrained(data, tmp_path):
    run_main(*train_args(data, tmp_path / 'first'))
    weights = tmp_path / 'weights.pth'
    torch.save(last_checkpoint(tmp_path / 'first')['model'], weights)
    proc = run_main('--resume', weights, *train_args(data, tmp_path / 'second'), check=False)
    assert_one_line_error(proc, str(weights), 'no training state', f'--pretrained {weights}')


def test_processes_resume_the_file_rank_0_chose(data, tmp_path):
    run_main(*train_args(data, tmp_path / 'first', 'TRAIN.EPOCHS', '2'))
    checkpoint = last_checkpoint(tmp_path / 'first')
    for rank, epoch in ((0, 1), (1, 0)):  # rank 1's folder lags behind, as a stale cache of a shared disk
        folder = tmp_path / 'base' / f'rank{rank}' / 'fat_b0' / 'default'
        folder.mkdir(parents=True)
        torch.save({**checkpoint, 'epoch': epoch}, folder / 'ckpt_last.pth')
    out = driver('resume-follow', tmp_path / 'base', data)
    assert 'rank 0: resumed epoch 2' in out and 'rank 1: resumed epoch 2' in out, out


def test_a_checkpoint_one_process_cannot_read_stops_every_process_naming_it(data, tmp_path):
    run_main(*train_args(data, tmp_path / 'first'))
    good = (tmp_path / 'first' / 'fat_b0' / 'default' / 'ckpt_last.pth').read_bytes()
    for rank, content in ((0, good), (1, good[: len(good) // 3])):  # the other node sees a torn copy
        folder = tmp_path / 'base' / f'rank{rank}' / 'out' / 'fat_b0' / 'default'
        folder.mkdir(parents=True)
        (folder / 'ckpt_last.pth').write_bytes(content)
    out = driver('resume-unreadable', tmp_path / 'base', data)
    for rank in (0, 1):
        assert re.search(rf'rank {rank}: CheckpointError: cannot read checkpoint out/fat_b0/default/ckpt_last.pth.*'
                         r'\(on 1 of 2 processes\)', out), out


def driver(scenario: str, base: Path, data: Path) -> str:
    proc = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2',
                           str(ROOT / 'tests' / 'engine_driver.py'), scenario, str(base), str(data)],
                          cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS='1'), capture_output=True, text=True,
                          timeout=180)
    return proc.stdout + proc.stderr


# --- non-finite steps ---------------------------------------------------------------------------

def test_non_finite_loss_stops_with_epoch_and_step_and_writes_nothing(data, tmp_path):
    proc = run_main(*train_args(data, tmp_path, 'TRAIN.BASE_LR', '1e35', 'TRAIN.CLIP_GRAD', '0.0'), check=False)
    assert_one_line_error(proc, 'non-finite loss or gradients at epoch 0 step', 'MAX_NONFINITE_STEPS')
    assert not list((tmp_path / 'fat_b0' / 'default').glob('ckpt_*.pth'))


def test_skipped_non_finite_steps_leave_no_trace_and_are_counted(data, tmp_path):
    # LR 1e35: the first step blows the weights up, every later forward is non-finite and skipped
    proc = run_main(*train_args(data, tmp_path, 'TRAIN.BASE_LR', '1e35', 'TRAIN.CLIP_GRAD', '0.0',
                                'TRAIN.MAX_NONFINITE_STEPS', '1000'))
    assert proc.returncode == 0
    saved = last_checkpoint(tmp_path)
    assert saved['nonfinite_steps'] == 5 and saved['first_nonfinite'] == 1, '6 steps, all but the first skipped'
    statistics = {k: v for k, v in saved['model'].items() if 'running_' in k}
    assert statistics and all(torch.isfinite(v).all() for v in statistics.values()), \
        'BatchNorm statistics as they were before the skipped steps'


def test_a_non_finite_loss_on_one_process_under_loss_scaling_stops_every_process(data, tmp_path):
    out = driver('nonfinite-fp16', tmp_path, data)
    for rank in (0, 1):
        assert f'rank {rank}: NonFiniteLossError: non-finite loss or gradients at epoch 0 step 1' in out, out


# --- disk --------------------------------------------------------------------------------------------

def test_epoch_checkpoints_are_pruned_and_leftovers_of_killed_saves_removed(data, tmp_path):
    run_dir = tmp_path / 'fat_b0' / 'default'
    run_dir.mkdir(parents=True)
    for name in ('ckpt_last.pth.tmp4242', 'config.yaml.tmp17'):
        (run_dir / name).write_bytes(b'half a checkpoint')
    (run_dir / 'notes.tmp.txt').write_text('mine')
    run_main(*train_args(data, tmp_path, 'TRAIN.EPOCHS', '4', 'SAVE_FREQ', '1', 'SAVE_KEEP', '2'))
    assert sorted(p.name for p in run_dir.iterdir() if 'events' not in p.name) == [
        'ckpt_best.pth', 'ckpt_epoch_2.pth', 'ckpt_epoch_3.pth', 'ckpt_last.pth', 'config.yaml', 'log.txt',
        'notes.tmp.txt']
    assert yaml.safe_load((run_dir / 'config.yaml').read_text())['SAVE_KEEP'] == 2


# --- bad input: one clear line, non-zero exit -----------------------------------------------------

def test_bad_input_under_torchrun_is_one_line_and_a_failed_launch(data, tmp_path):
    proc = run_main(*train_args(data, tmp_path, 'TRAIN.EPOCHZ', '3'), nproc=2, check=False)
    assert proc.returncode == 1, 'torchrun reports its failed workers with exit code 1'
    assert len(error_lines(proc.stderr)) == 1, proc.stderr
    assert 'TRAIN.EPOCHZ' in error_lines(proc.stderr)[0]


def test_missing_data_path(tmp_path):
    proc = run_main(*train_args(tmp_path / 'nowhere', tmp_path), check=False)
    assert_one_line_error(proc, 'data folder not found', 'nowhere')


def test_empty_data_folder(tmp_path):
    (tmp_path / 'data' / 'train').mkdir(parents=True)
    (tmp_path / 'data' / 'val').mkdir(parents=True)
    proc = run_main(*train_args(tmp_path / 'data', tmp_path), check=False)
    assert_one_line_error(proc, str(tmp_path / 'data' / 'train'), 'class folder')


@pytest.mark.parametrize('loader', ['torch', 'dali'])
def test_class_folder_without_images(tmp_path, loader):
    if loader == 'dali':
        pytest.importorskip('nvidia.dali')
    data = make_image_folder(tmp_path / 'data', classes=2, train_per_class=4, val_per_class=2)
    (data / 'train' / 'class_9').mkdir()
    proc = run_main(*train_args(data, tmp_path, 'DATA.LOADER', loader), check=False)
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


def test_skipping_corrupt_images_when_none_is_readable_is_one_line(tmp_path):
    data = make_image_folder(tmp_path / 'data', classes=2, train_per_class=4, val_per_class=2)
    for image in (data / 'train').rglob('*.png'):
        image.write_bytes(b'not a png at all')
    proc = run_main(*train_args(data, tmp_path, 'DATA.SKIP_CORRUPT', 'True', batch_size=2), check=False)
    assert_one_line_error(proc, str(data / 'train'), 'none of its 8 images can be read')


@pytest.mark.parametrize('opts,fragments', [
    (['TRAIN.EPOCHZ', '3'], ['TRAIN.EPOCHZ', 'Non-existent']),
    (['TRAIN.EPOCHS', 'many'], ['TRAIN.EPOCHS', 'Type mismatch']),
    (['MODEL.FAT.NUM_HEADS', '[3, 3, 3, 3]'], ['MODEL', 'not divisible']),
    (['MODEL.VARIANT', 'fat_b9'], ["MODEL.VARIANT is 'fat_b9'", 'fat_b3']),
])
def test_bad_config_key_or_value(data, tmp_path, opts, fragments):
    assert_one_line_error(run_main(*train_args(data, tmp_path, *opts), check=False), *fragments)


def test_architecture_errors_come_before_the_data_is_read(tmp_path):
    proc = run_main(*train_args(tmp_path / 'nowhere', tmp_path, 'MODEL.FAT.NUM_HEADS', '[3, 3, 3, 3]'), check=False)
    assert_one_line_error(proc, 'not divisible')


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
