"""Training survives kills, preemption, non-finite losses, cluster quirks and bad input (CPU, through
main.py; several processes: 2 gloo processes under torchrun)."""
import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import yaml

from engine.checkpoints import FORMAT_VERSION
from helpers import (EXACT_OPTS, ROOT, TINY_OPTS, assert_one_line_error, assert_same_weights, error_lines,
                     last_checkpoint, make_image_folder, project_env, run_main, start_main, train_args, wait_for_log)
from utils import FolderLock

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


def process_tree(root: int) -> list:
    """``root`` and every process below it (from /proc)."""
    children = {}
    for entry in os.listdir('/proc'):
        if entry.isdigit():
            try:
                fields = Path(f'/proc/{entry}/stat').read_text().rsplit(')', 1)[1].split()
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def signal_every_process(root: int, signum: int) -> int:
    """Send ``signum`` to ``root`` and all its descendants at once, as Slurm signals a job's processes
    (loader workers included); returns how many were signalled."""
    tree = process_tree(root)
    for pid in tree:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass
    return len(tree)


def test_sigterm_to_every_process_with_loader_workers_saves_mid_epoch_and_the_restart_continues_exactly(
        data, tmp_path, uninterrupted):
    # One process and its loader workers (train and evaluation), all signalled at once. Mutation caught:
    # workers that keep SIGTERM's default (they died; "DataLoader worker exited unexpectedly", no save).
    args = train_args(data, tmp_path, *EXACT_OPTS)
    run_dir = tmp_path / 'fat_b0' / 'default'
    proc = start_main(*args)
    wait_for_log(run_dir / 'log.txt', 'Train: [1/3][1/6]', proc)
    assert signal_every_process(proc.pid, signal.SIGTERM) >= 3, 'main.py and its training and evaluation workers'
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert stderr.count('stopped by SIGTERM at epoch 1 step') == 1 and 'Run the same command again' in stderr
    saved = last_checkpoint(tmp_path)
    assert saved['epoch'] == 1 and 0 < saved['step'] < 6

    restarted = run_main(*args)
    assert f"resumed from {run_dir / 'ckpt_last.pth'} (epoch 1, {saved['step']} steps done" in restarted.stdout
    assert f"Train: [1/3][{saved['step']}/6]" in restarted.stdout and 'Train: [1/3][0/6]' not in restarted.stdout
    assert_same_weights(last_checkpoint(tmp_path), uninterrupted)


def test_a_process_that_exits_with_a_loader_still_alive_ends_at_once(tmp_path):
    # Loader workers ignore SIGTERM, and multiprocessing's exit handler SIGTERMs them and then waits:
    # a loader that a reference cycle keeps alive until exit would hold the process for ever.
    # Mutation caught: no exit hook in data/loaders.py (the process hung).
    script = tmp_path / 'cycle.py'
    script.write_text("""from argparse import Namespace
import torch
from classification import get_config
from data import build_train_loader
config = get_config(Namespace(cfg=None, opts=['DATA.NUM_WORKERS', '2', 'DATA.BATCH_SIZE', '4']))
loader = build_train_loader(torch.utils.data.TensorDataset(torch.zeros(64, 2)), config)
loader.set_epoch(0)
next(iter(loader))
cycle = [loader]
cycle.append(cycle)
""")
    proc = subprocess.run([sys.executable, str(script)], env=project_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and 'Traceback' not in proc.stderr, proc.stderr


# Two processes, two micro-batches per optimizer step, a log line every other micro-batch (the
# combination whose stop request used to be checked never), one loader worker each.
PREEMPT_OPTS = [*ACCUMULATION_OPTS, 'DATA.NUM_WORKERS', '1']


@pytest.fixture(scope='module')
def data48_shards(data48, tmp_path_factory) -> Path:
    from data.shards import convert
    out = tmp_path_factory.mktemp('shards48') / 'shards'
    convert(str(data48), str(out), shard_mb=0.02, log=lambda line: None)
    return out


@pytest.fixture(scope='module')
def two_process_references(data48, tmp_path_factory) -> dict:
    """Uninterrupted 2-process runs: the PyTorch loader's (folders and shards give the same) and DALI's."""
    references = {}
    for loader in ('torch', 'dali'):
        if loader == 'dali' and importlib.util.find_spec('nvidia.dali') is None:
            continue
        out = tmp_path_factory.mktemp(f'reference_{loader}')
        run_main(*train_args(data48, out, *PREEMPT_OPTS, 'DATA.LOADER', loader, batch_size=2), nproc=2)
        references[loader] = last_checkpoint(out)
    return references


@pytest.mark.parametrize('form, delivery', [('folder', 'launcher'), ('shards', 'every process'),
                                            ('dali', 'every process')])
def test_sigterm_under_torchrun_with_loader_workers_stops_within_two_steps_and_resumes_exactly(
        form, delivery, data48, tmp_path, two_process_references, request):
    # 'launcher': torchrun, signalled alone, SIGTERMs each worker's process group (loader workers
    # included); 'every process': SIGTERM to launcher, workers and loader workers at once, as Slurm
    # does. Mutation caught: loader workers keeping SIGTERM's default (no checkpoint; each process
    # failed with "DataLoader worker ... exited unexpectedly").
    loader = 'dali' if form == 'dali' else 'torch'
    if loader not in two_process_references:
        pytest.skip('NVIDIA DALI is not installed')
    source = request.getfixturevalue('data48_shards') if form == 'shards' else data48
    args = train_args(source, tmp_path / 'run', *PREEMPT_OPTS, 'DATA.LOADER', loader, batch_size=2)
    log = tmp_path / 'run' / 'fat_b0' / 'default' / 'log.txt'
    proc = start_main(*args, nproc=2)
    wait_for_log(log, 'Train: [1/2][2/12]', proc)  # epoch 0 evaluated: training and evaluation workers run
    if delivery == 'launcher':
        proc.send_signal(signal.SIGTERM)
    else:
        # launcher, 2 processes, and with the PyTorch loader a training and an evaluation worker each
        assert signal_every_process(proc.pid, signal.SIGTERM) >= (3 if loader == 'dali' else 7)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1, 'torchrun, signalled itself, exits with 1 (its processes with 143)'
    assert 'exited unexpectedly' not in stderr and not re.search(r'\[rank\d\]: Traceback', stderr), stderr[-3000:]
    assert stderr.count('stopped by SIGTERM at epoch 1 step') == 1, stderr[-3000:]
    signalled_at = max(int(step) for step in re.findall(r'Train: \[1/2\]\[(\d+)/12\]', log.read_text().split(
        'received SIGTERM')[0]))
    saved = last_checkpoint(tmp_path / 'run')
    assert saved['epoch'] == 1 and saved['step'] % 2 == 0, 'at an optimizer-step boundary'
    # the signal lands in the optimizer step after the logged micro-batch; that one and two more finish
    assert signalled_at < saved['step'] <= signalled_at + 2 + 2 * 2, 'within two optimizer steps'

    restarted = run_main(*args, nproc=2)
    assert f"(epoch 1, {saved['step']} steps done" in restarted.stdout and 'DALI cannot skip' not in restarted.stdout
    assert_same_weights(last_checkpoint(tmp_path / 'run'), two_process_references[loader])


def test_checkpoint_is_plain_data_with_everything_a_resume_needs(uninterrupted):
    assert {'model', 'optimizer', 'optimizer_params', 'scaler', 'ema', 'epoch', 'step', 'steps_per_epoch',
            'best_metric', 'metrics', 'nonfinite_steps', 'rng', 'config', 'identity'} <= set(uninterrupted)
    assert set(uninterrupted['rng'][0]) == {'python', 'numpy', 'torch', 'cuda'}
    assert 'EMBED_DIMS' in uninterrupted['config']


# --- which checkpoint a run resumes ----------------------------------------------------------------

# Run folders that several tests start from, each trained once: a test copies one (copy_run) and goes
# on from there, as a rerun of the same command would.

@pytest.fixture(scope='module')
def one_epoch(data, tmp_path_factory) -> Path:
    """A run folder after 1 epoch of TINY_OPTS: ckpt_epoch_0.pth, ckpt_last.pth and ckpt_best.pth."""
    out = tmp_path_factory.mktemp('one_epoch')
    run_main(*train_args(data, out))
    return out / 'fat_b0' / 'default'


@pytest.fixture(scope='module')
def four_epochs(data, tmp_path_factory) -> Path:
    """A run folder after 4 epochs of TINY_OPTS with every epoch checkpoint kept (SAVE_KEEP 0)."""
    out = tmp_path_factory.mktemp('four_epochs')
    run_main(*train_args(data, out, 'TRAIN.EPOCHS', '4', 'SAVE_FREQ', '1', 'SAVE_KEEP', '0'))
    return out / 'fat_b0' / 'default'


def copy_run(run_dir: Path, tmp_path: Path) -> Path:
    """``run_dir`` copied to ``tmp_path``'s run folder (OUTPUT tmp_path); returns the copy."""
    copy = tmp_path / 'fat_b0' / 'default'
    shutil.copytree(run_dir, copy)
    return copy


def test_auto_resume_skips_a_corrupt_newest_checkpoint(data, tmp_path, one_epoch):
    run_dir = copy_run(one_epoch, tmp_path)
    good = (run_dir / 'ckpt_last.pth').read_bytes()
    (run_dir / 'ckpt_epoch_7.pth').write_bytes(good[: len(good) // 2])  # torn write from elsewhere, newest
    proc = run_main(*train_args(data, tmp_path, 'TRAIN.EPOCHS', '2'))
    assert 'skipping' in proc.stdout and 'ckpt_epoch_7.pth' in proc.stdout
    assert 'resumed from' in proc.stdout and 'Train: [1/2]' in proc.stdout and 'Train: [0/2]' not in proc.stdout
    assert (run_dir / 'ckpt_epoch_7.pth').exists(), 'nothing the user has is deleted'


def test_auto_resume_takes_the_newest_in_training_not_the_newest_on_disk(data, tmp_path, four_epochs):
    run_dir = copy_run(four_epochs, tmp_path)
    (run_dir / 'ckpt_last.pth').unlink()
    (run_dir / 'ckpt_best.pth').unlink()
    os.utime(run_dir / 'ckpt_epoch_0.pth')  # copied or touched: the newest file, the oldest training state
    proc = run_main(*train_args(data, tmp_path, 'TRAIN.EPOCHS', '5'))
    assert f"resumed from {run_dir / 'ckpt_epoch_3.pth'} (epoch 3" in proc.stdout
    assert 'Train: [4/5]' in proc.stdout and 'Train: [1/5]' not in proc.stdout


def test_ckpt_best_is_only_replaced_by_a_better_metric_than_the_run_has_seen(data, tmp_path, one_epoch):
    run_dir = copy_run(one_epoch, tmp_path)
    best = torch.load(run_dir / 'ckpt_best.pth', weights_only=True)
    torch.save({**best, 'best_metric': 101.0}, run_dir / 'ckpt_best.pth')  # a best no later epoch can beat
    last = torch.load(run_dir / 'ckpt_last.pth', weights_only=True)
    torch.save({**last, 'best_metric': 0.0}, run_dir / 'ckpt_last.pth')  # resumed from a file that saw less
    proc = run_main(*train_args(data, tmp_path, 'TRAIN.EPOCHS', '2'))
    assert 'best acc1: 101.0000' in proc.stdout
    assert torch.load(run_dir / 'ckpt_best.pth', weights_only=True)['epoch'] == 0


# --- nothing a user has is lost ------------------------------------------------------------------

def test_checkpoints_of_a_newer_format_are_refused_and_older_ones_resume(data, tmp_path, one_epoch):
    # Mutations caught: the format version not checked (a newer layout resumed as if it were this
    # one's); a format required of the checkpoints written before it was numbered.
    run_dir = copy_run(one_epoch, tmp_path)
    files = sorted(run_dir.glob('ckpt_*.pth'))
    for path in files:
        state = torch.load(path, weights_only=True)
        assert state['format'] == FORMAT_VERSION
        torch.save({**state, 'format': FORMAT_VERSION + 1}, path)
    refused = run_main(*train_args(data, tmp_path, 'TRAIN.EPOCHS', '2'), check=False)
    assert_one_line_error(refused, 'none can be resumed', f'checkpoint format {FORMAT_VERSION + 1}',
                          'written by a newer version of this project')
    for path in files:
        state = torch.load(path, weights_only=True)
        del state['format']  # as checkpoints were written before the layout was numbered
        torch.save(state, path)
    resumed = run_main(*train_args(data, tmp_path, 'TRAIN.EPOCHS', '2'))
    assert 'resumed from' in resumed.stdout and 'ckpt_last.pth (epoch 0' in resumed.stdout
    assert last_checkpoint(tmp_path)['format'] == FORMAT_VERSION and last_checkpoint(tmp_path)['epoch'] == 1


def test_checkpoints_that_cannot_be_read_are_never_written_over(data, tmp_path, four_epochs):
    # Mutations caught: unreadable files passed over in silence (the run started afresh and wrote over
    # all of them); an unreadable ckpt_last.pth written over once an older checkpoint resumed.
    run_dir = copy_run(four_epochs, tmp_path)
    for name in ('ckpt_last.pth', 'ckpt_epoch_1.pth', 'ckpt_epoch_2.pth', 'ckpt_epoch_3.pth'):
        (run_dir / name).write_bytes((run_dir / name).read_bytes()[:1000])  # torn, or a transient EIO
    torch.save({'weights': torch.zeros(1)}, run_dir / 'ckpt_best.pth')  # a file of another format
    epoch_0 = (run_dir / 'ckpt_epoch_0.pth').read_bytes()
    (run_dir / 'ckpt_epoch_0.pth').write_bytes(epoch_0[:1000])
    before = {p.name: p.read_bytes() for p in run_dir.glob('ckpt_*.pth')}
    refused = run_main(*train_args(data, tmp_path, 'TRAIN.EPOCHS', '6'), check=False)
    assert_one_line_error(refused, 'holds checkpoints but none can be resumed', 'ckpt_last.pth: cannot read checkpoint',
                          'ckpt_best.pth: not a training checkpoint', 'Move them elsewhere', '--tag')
    assert {p.name: p.read_bytes() for p in run_dir.glob('ckpt_*.pth')} == before, 'nothing written over'

    (run_dir / 'ckpt_epoch_0.pth').write_bytes(epoch_0)  # one readable checkpoint, older than the torn last one
    resumed = run_main(*train_args(data, tmp_path, 'TRAIN.EPOCHS', '2'))
    assert 'resumed from' in resumed.stdout and 'ckpt_epoch_0.pth (epoch 0' in resumed.stdout
    assert (run_dir / 'ckpt_last.pth.unreadable').read_bytes() == before['ckpt_last.pth']
    assert (run_dir / 'ckpt_best.pth.unreadable').read_bytes() == before['ckpt_best.pth']
    assert (run_dir / 'ckpt_epoch_1.pth.unreadable').read_bytes() == before['ckpt_epoch_1.pth']
    assert (run_dir / 'ckpt_epoch_3.pth').read_bytes() == before['ckpt_epoch_3.pth'], 'not reached: left alone'
    assert last_checkpoint(tmp_path)['epoch'] == 1


def test_a_run_that_would_not_resume_is_refused_rather_than_trained_over_the_checkpoints(data, tmp_path,
                                                                                         one_epoch):
    # Mutation caught: TRAIN.AUTO_RESUME False without --resume started afresh (ckpt_last.pth written
    # over, the old epoch checkpoints pruned).
    run_dir = copy_run(one_epoch, tmp_path)
    before = {p.name: p.read_bytes() for p in run_dir.glob('ckpt_*.pth')}
    proc = run_main(*train_args(data, tmp_path, 'TRAIN.AUTO_RESUME', 'False'), check=False)
    assert_one_line_error(proc, 'holds checkpoints (ckpt_last.pth: epoch 0, 100% of it done) and TRAIN.AUTO_RESUME '
                                'is False', '--tag NAME', '--resume FILE')
    assert {p.name: p.read_bytes() for p in run_dir.glob('ckpt_*.pth')} == before


def test_resume_on_the_command_line_never_takes_the_run_back(data, tmp_path, four_epochs):
    # A --resume left in the command (or a torchrun restart) must not go back to it once the run
    # folder has got further. Mutation caught: MODEL.RESUME taken over the folder (epoch 1 trained again).
    run_dir = copy_run(four_epochs, tmp_path)
    start = tmp_path / 'start.pth'
    shutil.copy(run_dir / 'ckpt_epoch_0.pth', start)
    proc = run_main('--resume', start, *train_args(data, tmp_path, 'TRAIN.EPOCHS', '5'))
    assert f'not --resume {start}' in proc.stdout and 'the run folder has got further' in proc.stdout
    assert 'Train: [4/5]' in proc.stdout and 'Train: [1/5]' not in proc.stdout
    fresh = run_main('--resume', start, *train_args(data, tmp_path / 'new', 'TRAIN.EPOCHS', '2'))
    assert f'resumed from {start} (epoch 0' in fresh.stdout, 'a new folder starts from --resume'


def test_epoch_checkpoints_are_pruned_by_when_they_were_written_not_by_their_number(data, tmp_path, four_epochs):
    # Going back on purpose (TRAIN.AUTO_RESUME False) to epoch 0 of a folder that reached epoch 3.
    # Mutation caught: pruning by the N in the name (the new ckpt_epoch_1.pth deleted as it was written).
    run_dir = copy_run(four_epochs, tmp_path)
    start = tmp_path / 'start.pth'
    shutil.copy(run_dir / 'ckpt_epoch_0.pth', start)
    run_main('--resume', start, *train_args(data, tmp_path, 'TRAIN.EPOCHS', '2', 'TRAIN.AUTO_RESUME', 'False',
                                            'SAVE_KEEP', '2'))
    assert sorted(p.name for p in run_dir.glob('ckpt_epoch_*.pth')) == ['ckpt_epoch_1.pth', 'ckpt_epoch_3.pth']
    written = torch.load(run_dir / 'ckpt_epoch_1.pth', weights_only=True)
    assert written['saves'] > torch.load(run_dir / 'ckpt_epoch_3.pth', weights_only=True)['saves']
    assert written['saves'] == last_checkpoint(tmp_path)['saves']


def test_the_run_lock_dies_with_its_holder_not_with_the_processes_it_forked(tmp_path):
    # A killed run's loader workers outlive it by seconds; the restart must get the folder at once.
    # Mutation caught: an flock (shared with forked children: the restart was refused).
    script = tmp_path / 'holder.py'
    script.write_text(f"""import os, time
from utils import FolderLock
lock, _ = FolderLock.try_take({str(tmp_path)!r}, 'run.lock')
if os.fork() == 0:
    time.sleep(60)  # a loader worker
    os._exit(0)
print('held', flush=True)
time.sleep(60)
""")
    holder = subprocess.Popen([sys.executable, str(script)], env=project_env(), stdout=subprocess.PIPE, text=True,
                              start_new_session=True)
    try:
        assert holder.stdout.readline() == 'held\n'
        lock, who = FolderLock.try_take(str(tmp_path), 'run.lock')
        assert lock is None and f'pid {holder.pid}' in who, 'refused while its holder lives'
        holder.kill()
        holder.wait()
        forked = subprocess.run(['pgrep', '-s', str(holder.pid)], capture_output=True, text=True).stdout.split()
        assert len(forked) == 1, 'the forked child lives on'
        lock, _ = FolderLock.try_take(str(tmp_path), 'run.lock')
        assert lock is not None, 'taken at once, while the forked child still lives'
    finally:
        os.killpg(holder.pid, signal.SIGKILL)


def test_a_second_training_run_in_the_folder_is_refused_and_tools_leave_its_files(data, tmp_path):
    # Mutations caught: no run lock (the second run trained into the first's folder); leftovers removed
    # by every mode but --eval (--throughput deleted the live run's temporary file).
    args = train_args(data, tmp_path, 'TRAIN.EPOCHS', '200')
    run_dir = tmp_path / 'fat_b0' / 'default'
    first = start_main(*args)
    try:
        wait_for_log(run_dir / 'log.txt', 'Train: [0/200]', first)
        saving = run_dir / 'ckpt_last.pth.tmp12345-0123abcd'  # as the live run's save in progress
        saving.write_bytes(b'half written')
        with ThreadPoolExecutor(2) as pool:  # both at once, while the first run trains
            second = pool.submit(run_main, *args, check=False)
            throughput = pool.submit(run_main, '--throughput', '--batch-size', '2', '--output', tmp_path, '--opts',
                                     *TINY_OPTS)
            second, throughput = second.result(), throughput.result()
        assert_one_line_error(second, f'{run_dir} is in use by another training run', f'pid {first.pid}', '--tag')
        assert 'inference: batch_size 2' in throughput.stdout
        assert saving.read_bytes() == b'half written'
    finally:
        first.kill()
        first.wait()


def test_a_large_tensor_that_fills_the_disk_is_a_disk_full_error_and_the_old_file_stays(tmpfs):
    # torch.save reports a failed write of a large tensor as a RuntimeError (the ENOSPC behind it), which
    # the engine would show as a traceback. Mutation caught: write_atomically not unwrapping it.
    from utils import atomic_save, is_disk_full
    path = tmpfs('64k') / 'ckpt_last.pth'
    path.write_bytes(b'the previous checkpoint')
    with pytest.raises(OSError) as error:
        atomic_save({'weights': torch.zeros(10 ** 6)}, str(path))
    assert is_disk_full(error.value)
    assert path.read_bytes() == b'the previous checkpoint' and [p.name for p in path.parent.iterdir()] == [path.name]


def test_a_full_disk_while_saving_stops_every_process_in_one_line_and_keeps_the_checkpoints(data, tmpfs,
                                                                                          one_epoch):
    # Mutations caught: the OSError of rank 0's write unhandled (a traceback, and the others left in the
    # save's barrier: on NCCL until the timeout); rank 0 stopping alone with the one line (the others
    # lost it: "another process of the run ended").
    disk = tmpfs('4m')
    run_dir = disk / 'fat_b0' / 'default'
    run_dir.mkdir(parents=True)
    shutil.copy(one_epoch / 'ckpt_last.pth', run_dir)
    before = (run_dir / 'ckpt_last.pth').read_bytes()
    room = os.statvfs(disk)
    (disk / 'filler').write_bytes(b'\0' * (room.f_bavail * room.f_frsize - 200_000))  # 200 KB left
    proc = run_main(*train_args(data, disk, 'TRAIN.EPOCHS', '2', 'SAVE_FREQ', '0'), nproc=2, check=False)
    assert proc.returncode == 1 and len(error_lines(proc.stderr)) == 1, proc.stderr[-3000:]
    assert re.search(rf'error: cannot write a checkpoint in {run_dir}: No space left on device \(it needs about '
                     r'\d+ MB, 0 MB are free\); the files written before are kept', proc.stderr), proc.stderr
    assert not re.search(r'\[rank\d\]: Traceback', proc.stderr)
    assert 'another process of the run ended' not in proc.stderr, 'every process stopped on the agreed error'
    assert (run_dir / 'ckpt_last.pth').read_bytes() == before and not list(run_dir.glob('*.tmp*'))


# --- resume follows the current config ----------------------------------------------------------

def expected_lr(epochs: int, steps_per_epoch: int, step: int, lr_scale: float) -> float:
    """The LR after ``step`` optimizer steps of a fresh TINY_OPTS schedule of ``epochs`` epochs."""
    from argparse import Namespace

    from classification import get_config
    from lr_scheduler import build_scheduler
    config = get_config(Namespace(cfg=None, opts=[*TINY_OPTS, 'TRAIN.EPOCHS', str(epochs)]))
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=5e-4 * lr_scale)
    scheduler = build_scheduler(config, optimizer, steps_per_epoch, 5e-7 * lr_scale, 5e-6 * lr_scale)
    scheduler.step_update(step)
    return optimizer.param_groups[0]['lr']


def first_lr_of_epoch(stdout: str, epoch: int, epochs: int) -> float:
    return float(re.search(rf'Train: \[{epoch}/{epochs}\]\[0/\d+\]\s+eta \S+ lr ([\d.e+-]+)', stdout).group(1))


def test_a_longer_run_continues_the_new_schedule_and_lists_what_changed(data, tmp_path, one_epoch):
    copy_run(one_epoch, tmp_path)  # 1 epoch: its cosine ends at MIN_LR
    first = last_checkpoint(tmp_path)
    proc = run_main(*train_args(data, tmp_path, 'TRAIN.EPOCHS', '2', 'MODEL.EMA.ENABLE', 'True'))
    assert 'TRAIN.EPOCHS 1 -> 2' in proc.stdout and 'MODEL.EMA.ENABLE False -> True' in proc.stdout
    ema = last_checkpoint(tmp_path)['ema']  # decay 0.9998 over 6 steps: still almost where it started
    assert all(torch.allclose(ema[k], v, atol=1e-3) for k, v in first['model'].items() if v.is_floating_point()), \
        'an EMA enabled on resume starts from the resumed weights'
    # batch 4 of 24 images: 6 optimizer steps per epoch; LRs scale by 4 / 512
    assert first_lr_of_epoch(proc.stdout, 1, 2) == pytest.approx(expected_lr(2, 6, 7, 4 / 512), rel=2e-3)
    assert first_lr_of_epoch(proc.stdout, 1, 2) > 2 * expected_lr(1, 6, 6, 4 / 512)


def test_resume_on_more_processes_scales_the_lr_to_the_new_total_batch(data, tmp_path, one_epoch):
    copy_run(one_epoch, tmp_path)
    proc = run_main(*train_args(data, tmp_path, 'TRAIN.EPOCHS', '2'), nproc=2, threads=2)
    if len(os.sched_getaffinity(0)) < 4:  # 2 processes x 2 threads would oversubscribe the cores
        assert 'CPU threads per process (lowered from 2' in proc.stdout
    assert 'LR scaled to the total batch: base 7.813e-06' in proc.stdout  # 4 x 2 / 512 x 5e-4
    assert 'random states are not restored' in proc.stdout
    # 24 images / (2 processes x 4): 3 optimizer steps per epoch
    assert first_lr_of_epoch(proc.stdout, 1, 2) == pytest.approx(expected_lr(2, 3, 4, 8 / 512), rel=2e-3)


def test_another_experiment_in_the_same_run_folder_is_refused(data, tmp_path, one_epoch):
    copy_run(one_epoch, tmp_path)
    config_before = (tmp_path / 'fat_b0' / 'default' / 'config.yaml').read_text()
    wider = run_main(*train_args(data, tmp_path, 'MODEL.FAT.EMBED_DIMS', '[8, 16, 32, 32]'), check=False)
    assert_one_line_error(wider, 'holds a run with another architecture', 'EMBED_DIMS', '--tag')
    other_data = make_image_folder(tmp_path / 'five', classes=5, train_per_class=6, val_per_class=1)
    assert_one_line_error(run_main(*train_args(other_data, tmp_path), check=False),
                          'holds a run with another', '--tag')
    assert (tmp_path / 'fat_b0' / 'default' / 'config.yaml').read_text() == config_before, 'nothing overwritten'
    tagged = run_main('--tag', 'wider', *train_args(data, tmp_path, 'MODEL.FAT.EMBED_DIMS', '[8, 16, 32, 32]'))
    assert 'resumed from' not in tagged.stdout


def test_resume_of_a_weights_only_file_points_to_pretrained(data, tmp_path, one_epoch):
    weights = tmp_path / 'weights.pth'
    torch.save(torch.load(one_epoch / 'ckpt_last.pth', weights_only=True)['model'], weights)
    proc = run_main('--resume', weights, *train_args(data, tmp_path / 'second'), check=False)
    assert_one_line_error(proc, str(weights), 'no training state', f'--pretrained {weights}')


def test_processes_resume_the_file_rank_0_chose(data, tmp_path, one_epoch):
    checkpoint = torch.load(one_epoch / 'ckpt_last.pth', weights_only=True)
    for rank, epoch in ((0, 1), (1, 0)):  # rank 1's folder lags behind, as a stale cache of a shared disk
        folder = tmp_path / 'base' / f'rank{rank}' / 'fat_b0' / 'default'
        folder.mkdir(parents=True)
        torch.save({**checkpoint, 'epoch': epoch}, folder / 'ckpt_last.pth')
    out = driver('resume-follow', tmp_path / 'base', data)
    assert 'rank 0: resumed epoch 2' in out and 'rank 1: resumed epoch 2' in out, out


def test_a_checkpoint_one_process_cannot_read_stops_every_process_naming_it(data, tmp_path, one_epoch):
    good = (one_epoch / 'ckpt_last.pth').read_bytes()
    for rank, content in ((0, good), (1, good[: len(good) // 3])):  # the other node sees a torn copy
        folder = tmp_path / 'base' / f'rank{rank}' / 'out' / 'fat_b0' / 'default'
        folder.mkdir(parents=True)
        (folder / 'ckpt_last.pth').write_bytes(content)
    out = driver('resume-unreadable', tmp_path / 'base', data)
    for rank in (0, 1):
        assert re.search(rf'rank {rank}: CheckpointError: cannot read checkpoint out/fat_b0/default/ckpt_last.pth.*'
                         r'\(on 1 of 2 processes: rank 1 on ', out), out


def driver(scenario: str, base: Path, data: Path) -> str:
    proc = run_driver(scenario, base, data)
    return proc.stdout + proc.stderr


def run_driver(scenario: str, base: Path, data: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2',
                           str(ROOT / 'tests' / 'engine_driver.py'), scenario, str(base), str(data)],
                          cwd=ROOT, env=project_env(OMP_NUM_THREADS='1'), capture_output=True,
                          text=True, timeout=180)


def test_a_folder_one_node_cannot_write_stops_every_process_in_one_line_naming_it(data, tmp_path):
    # Mutation caught: the folder check not agreed (rank 1 alone met it: no line at all, rank 0 went
    # on and waited for it in the next collective).
    (tmp_path / 'rank1').write_text('a file where the folder should be')
    proc = run_driver('output-one-rank', tmp_path, data)
    errors = error_lines(proc.stderr)
    assert len(errors) == 1 and proc.returncode == 1, proc.stderr[-3000:]
    assert re.fullmatch(rf'error: cannot write to the output folder {tmp_path}/rank1/fat_b0/default .*'
                        r'\(on 1 of 2 processes: rank 1 on \S+\)', errors[0]), errors[0]
    assert 'finished' not in proc.stdout and not re.search(r'\[rank\d\]: Traceback', proc.stderr)


def test_nodes_that_read_different_data_stop_in_one_line_naming_them(data, tmp_path):
    # One node's local copy lacks an image. Mutation caught: no agreement on the data (the ranks trained
    # different numbers of steps per epoch and the run failed in a collective, without a word why).
    for rank in (0, 1):
        shutil.copytree(data, tmp_path / 'data' / f'rank{rank}')
    next((tmp_path / 'data' / 'rank1' / 'train').rglob('*.png')).unlink()
    proc = run_driver('data-per-rank', tmp_path / 'base', tmp_path / 'data')
    errors = error_lines(proc.stderr)
    assert len(errors) == 1 and proc.returncode == 1, proc.stderr[-3000:]
    assert re.fullmatch(r'error: the processes read different data: rank 0 on \S+ has train_images 24, rank 1 on \S+ '
                        r'has train_images 23 \(1 of 2 processes differ from rank 0\)\. Every node must read the same '
                        r'data set: check DATA.DATA_PATH on each node', errors[0]), errors[0]


def test_a_slow_data_preparation_outlasts_dist_timeout_and_a_late_collective_does_not(data, tmp_path):
    # Mutations caught: build_data called directly in the engine (rank 0 timed out in the first
    # collective while rank 1 prepared); DIST_TIMEOUT not passed to the process group (rank 0 waited
    # the whole 8 s at the barrier).
    out = driver('timeout', tmp_path, data)
    assert 'rank 0: trained' in out and 'rank 1: trained' in out, out[-3000:]
    assert re.search(r'waiting for 1 process\(es\) to prepare their data: rank 1 on \S+ \(fetching shard 3 of 7\)',
                     out), out[-3000:]
    waited = re.search(r'rank 0: barrier failed after (\d+) s', out)
    assert waited and int(waited.group(1)) < 8, out[-3000:]


def test_a_node_that_sees_newer_checkpoints_than_rank_0_stops_the_run(data, tmp_path, one_epoch):
    # After a restart rank 0 may land on a node whose local OUTPUT lacks the newest checkpoint.
    # Mutation caught: no such check (rank 0 started epoch 0 afresh without a word).
    copy_run(one_epoch, tmp_path / 'base' / 'rank1')
    proc = run_driver('train-per-rank', tmp_path / 'base', data)
    errors = error_lines(proc.stderr)
    assert len(errors) == 1, proc.stderr[-3000:]
    assert 'rank 1 sees' in errors[0] and 'is not one folder that every node shares' in errors[0]
    assert not (tmp_path / 'base' / 'rank0' / 'fat_b0' / 'default' / 'ckpt_last.pth').exists()


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
        'ckpt_best.pth', 'ckpt_epoch_2.pth', 'ckpt_epoch_3.pth', 'ckpt_last.pth', 'config.yaml', 'kernels',
        'log.txt', 'notes.tmp.txt', 'run.lock']
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


def test_an_image_only_one_process_reads_is_reported_by_it_and_the_run_ends(data48, tmp_path):
    # Mutations caught: the line without the process's rank and host; the other process's lost
    # collective shown as a traceback.
    copy = tmp_path / 'data'
    shutil.copytree(data48, copy)
    broken = copy / 'train' / 'class_1' / '3.png'
    broken.write_bytes(b'not a png at all')
    started = time.time()
    proc = run_main(*train_args(copy, tmp_path, 'DATA.NUM_WORKERS', '1', batch_size=2), nproc=2, check=False)
    assert time.time() - started < 120, 'ended promptly, not at the process-group timeout'
    errors = error_lines(proc.stderr)
    assert proc.returncode == 1 and len(errors) == 1, proc.stderr[-3000:]
    assert re.fullmatch(rf'error: cannot read image {broken}: .* \(rank [01] on \S+\)', errors[0]), errors[0]
    assert not re.search(r'\[rank\d\]: Traceback', proc.stderr), proc.stderr[-3000:]


def test_a_fetch_that_fails_on_one_node_stops_every_process_in_one_line_naming_it(data, tmp_path):
    # Mutation caught: build_data's errors not agreed (rank 1's DataError printed by nobody, rank 0
    # waiting for it in the first collective).
    from data.shards import convert
    convert(str(data), str(tmp_path / 'shards'), shard_mb=0.02, log=lambda line: None)
    location = (f'pipe:if [ "$RANK" = 1 ]; then echo "no route to the bucket" >&2; exit 7; fi; '
                f'cat {tmp_path / "shards"}/{{}}')
    proc = run_main(*train_args(location, tmp_path, 'DATA.SHARD_CACHE', tmp_path / 'cache', 'DATA.FETCH_RETRIES', '0'),
                    nproc=2, check=False)
    errors = error_lines(proc.stderr)
    assert proc.returncode == 1 and len(errors) == 1, proc.stderr[-3000:]
    assert 'index.json' in errors[0] and 'exited with status 7: no route to the bucket' in errors[0]
    assert re.search(r'\(on 1 of 2 processes: rank 1 on \S+\)$', errors[0]), errors[0]


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


def test_checkpoint_of_another_architecture_names_the_keys(data, tmp_path, one_epoch):
    ckpt = one_epoch / 'ckpt_last.pth'
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
