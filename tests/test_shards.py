"""Shards (data/shards/): conversion, map-style reading by the ImageFolder's positions, remote
locations, exact epochs across 2 processes, and every bad input as one line."""
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from argparse import Namespace
from pathlib import Path

import cv2
import numpy as np
import pytest

from classification import get_config
from classification.data import ImageFolder, build_loader
from data.shards import ShardDataset, ShardSet
from helpers import ROOT, assert_one_line_error, make_image_folder, project_env, run_main, train_args
from utils import DataError, SampleError


def raw(image):
    return np.asarray(image)


def convert_cli(source: Path, output: Path, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, '-m', 'data.shards', '--data-path', str(source), '--output', str(output),
                           *extra], cwd=ROOT, capture_output=True, text=True, timeout=300)
    if check and proc.returncode:
        raise AssertionError(proc.stderr)
    return proc


def files_of(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(scope='module')
def folder(tmp_path_factory) -> Path:
    root = make_image_folder(tmp_path_factory.mktemp('folder'), classes=3, train_per_class=8, val_per_class=3)
    image = np.random.default_rng(1).integers(0, 255, (40, 40, 3), dtype=np.uint8)
    cv2.imwrite(str(root / 'train' / 'class_1' / 'z.jpg'), image)
    (root / 'train' / 'class_1' / 'z.jpg').rename(root / 'train' / 'class_1' / 'z.JPEG')  # ImageNet's suffix
    return root


@pytest.fixture(scope='module')
def shards(folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp('shards') / 'out'
    convert_cli(folder, out, '--shard-size', '0.01')  # ~2 samples per shard: many shards
    return out


def test_shards_hold_the_original_bytes_and_read_as_the_folder_reads(folder, shards):
    index = json.loads((shards / 'index.json').read_text())
    assert len(index['splits']['train']['shards']) > 5
    folder_train = ImageFolder(str(folder / 'train'), raw)
    members = {}
    for entry in index['splits']['train']['shards']:
        with tarfile.open(shards / entry['name']) as tar:
            members.update({m.name: tar.extractfile(m).read() for m in tar})
        assert hashlib.sha256((shards / entry['name']).read_bytes()).hexdigest() == entry['sha256']
    for position, (path, target) in enumerate(folder_train.samples):  # WebDataset layout, original bytes
        suffix = {'.jpeg': '.jpg'}.get(Path(path).suffix.lower(), Path(path).suffix.lower())
        assert members[f'{position:09d}{suffix}'] == Path(path).read_bytes()
        assert int(members[f'{position:09d}.cls']) == target
    sharded = ShardDataset(ShardSet(str(shards)), 'train', raw)
    assert len(sharded) == len(folder_train) and sharded.classes == folder_train.classes
    for position in range(len(folder_train)):  # item i is the folder's item i (a mapping bug swaps them)
        (a, ta), (b, tb) = folder_train[position], sharded[position]
        assert ta == tb and np.array_equal(a, b), position


def test_the_shard_index_is_dalis(shards):
    wds2idx = shutil.which('wds2idx', path=os.path.dirname(sys.executable))
    if wds2idx is None:
        pytest.skip('DALI (wds2idx) is not installed')
    for tar in sorted(shards.glob('*.tar'))[:3]:
        subprocess.run([wds2idx, str(tar), str(tar) + '.check'], check=True, capture_output=True)
        assert Path(str(tar) + '.check').read_text() == tar.with_suffix('.idx').read_text()
        os.remove(str(tar) + '.check')


def test_an_interrupted_conversion_continues_to_the_same_bytes(folder, shards, tmp_path):
    # A FIFO in the source blocks the converter at one sample, deterministically mid-way; it is killed
    # there, the FIFO becomes the real file again, and the same command finishes the conversion.
    source = tmp_path / 'source'
    shutil.copytree(folder, source)
    ordered = ImageFolder(str(source / 'train'), raw).samples
    entries = json.loads((shards / 'index.json').read_text())['splits']['train']['shards']
    stored_order = [line.split()[3] for entry in entries
                    for line in (shards / entry['name'].replace('.tar', '.idx')).read_text().splitlines()[1:]]
    blocker = Path(ordered[int(stored_order[len(stored_order) // 2].split('.')[0])][0])
    content = blocker.read_bytes()
    blocker.unlink()
    os.mkfifo(blocker)
    out = tmp_path / 'out'
    proc = subprocess.Popen([sys.executable, '-m', 'data.shards', '--data-path', str(source), '--output', str(out),
                             '--shard-size', '0.01', '--threads', '1'], cwd=ROOT, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while len(list(out.glob('train-*.tar'))) < 3 and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # the converter is now blocked in open(FIFO)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    complete = sorted(out.glob('train-*.tar'))
    assert 3 <= len(complete) < len(stored_order) // 2 and not (out / 'index.json').exists()
    for tar in complete:  # whatever looks complete is complete
        assert tar.read_bytes() == (shards / tar.name).read_bytes()
    blocker.unlink()
    blocker.write_bytes(content)
    unfinished = subprocess.run([sys.executable, 'main.py', '--device', 'cpu', '--data-path', str(out)], cwd=ROOT,
                                capture_output=True, text=True)
    assert_one_line_error(unfinished, 'no index.json: the conversion did not finish')
    other = convert_cli(source, out, '--shard-size', '0.02', check=False)
    assert other.returncode == 2 and 'unfinished conversion with other arguments' in other.stderr
    finished = convert_cli(source, out, '--shard-size', '0.01')
    assert 'continuing the unfinished conversion' in finished.stdout
    assert files_of(out) == files_of(shards)


def test_conversion_refuses_mixed_class_sets_and_a_used_output(folder, shards, tmp_path):
    source = tmp_path / 'source'
    shutil.copytree(folder, source)
    (source / 'val' / 'class_2').rename(source / 'val' / 'class_9')
    proc = convert_cli(source, tmp_path / 'out', check=False)
    assert_one_line_error(proc, 'train/ and val/ have different class folders', 'class_2, class_9')
    assert_one_line_error(convert_cli(folder, shards, check=False), 'already holds converted shards')


# --- training from shards (exact resume from shards: test_dependability.py's SIGKILL test) ----------

def test_an_epoch_over_two_processes_reads_every_sample_at_most_once_and_as_many_as_the_folder(folder, shards):
    def epoch(data: Path) -> dict:
        proc = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2',
                               'tests/loader_driver.py', str(data), '3'], cwd=ROOT, capture_output=True, text=True,
                              env=project_env(OMP_NUM_THREADS='1'), timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])

    from_shards, from_folder = epoch(shards), epoch(folder)
    samples = [tuple(s) for s in from_shards['samples']]
    # 25 images, 2 processes, batches of 3: 12 per process, 4 batches each, 24 distinct samples read.
    assert from_shards['per_rank'] == [12, 12] and from_shards['batches'] == 4
    assert len(set(samples)) == len(samples) == 24
    assert from_shards == from_folder  # the very samples of the folder's epoch, with their labels


# --- remote shards ---------------------------------------------------------------------------------

@pytest.fixture
def served(shards, serve):
    return serve(shards)


def test_shards_over_http_are_fetched_once_into_the_cache_and_read_as_local_ones(shards, served, tmp_path):
    local = ShardDataset(ShardSet(str(shards)), 'val', raw)
    for attempt in range(2):  # a second run finds the shards in the cache
        remote = ShardDataset(ShardSet(served.url, cache_dir=str(tmp_path / 'cache')), 'val', raw)
        for position in range(len(local)):
            (a, ta), (b, tb) = local[position], remote[position]
            assert ta == tb and np.array_equal(a, b)
    tars = [name for name in served.requests if name.endswith('.tar')]
    assert tars and all(served.requests[name] == 1 for name in tars)
    assert served.requests['index.json'] == 2  # the index is fetched afresh every run


def test_pipe_locations_run_the_command_per_file(shards, tmp_path):
    remote = ShardDataset(ShardSet(f'pipe:cat {shards}/{{}}', cache_dir=str(tmp_path)), 'val', raw)
    local = ShardDataset(ShardSet(str(shards)), 'val', raw)
    assert all(np.array_equal(remote[i][0], local[i][0]) for i in range(len(local)))
    with pytest.raises(DataError, match=r'needs \{\} where the file name goes'):
        ShardSet('pipe:cat /nowhere', cache_dir=str(tmp_path))
    with pytest.raises(DataError, match=r'exited with status 1: cat: /nowhere/index.json'):
        ShardSet('pipe:cat /nowhere/{}', cache_dir=str(tmp_path), retries=0)


def test_two_processes_train_from_a_url_and_fetch_each_file_once(shards, served, tmp_path):
    # The processes of a node share the cache: each file is fetched by one of them (a file lock), the
    # index by each. Mutation caught: fetching without the lock (files requested twice).
    proc = run_main(*train_args(served.url, tmp_path, 'DATA.SHARD_CACHE', str(tmp_path / 'cache')), nproc=2)
    assert 'Accuracy of the network on the 9 test images' in proc.stdout
    assert served.requests.pop('index.json') == 2
    assert len(served.requests) == 2 * len(list(shards.glob('*.tar'))) and set(served.requests.values()) == {1}


# --- bad input -------------------------------------------------------------------------------------

def build_error(data: Path, *opts: str) -> str:
    """The error build_loader stops with (main.py prints it as its one error line)."""
    config = get_config(Namespace(cfg=None, opts=['DATA.DATA_PATH', str(data), 'DATA.NUM_WORKERS', '0', *opts]))
    with pytest.raises(DataError) as error:
        build_loader(config)
    assert '\n' not in str(error.value)
    return str(error.value)


def broken_copy(shards: Path, tmp_path: Path) -> Path:
    copy = tmp_path / 'shards'
    shutil.copytree(shards, copy)
    return copy


def test_an_unreachable_url_is_one_line(tmp_path):
    proc = run_main('--data-path', 'http://127.0.0.1:9/imagenet/', '--output', tmp_path, '--opts', 'DATA.SHARD_CACHE',
                    tmp_path, 'DATA.FETCH_RETRIES', '0', check=False)
    assert_one_line_error(proc, 'cannot fetch http://127.0.0.1:9/imagenet/index.json', 'refused')


def test_a_truncated_shard_is_named_or_its_samples_skipped(shards, tmp_path):
    copy = broken_copy(shards, tmp_path)
    with open(copy / 'train-000001.tar', 'r+b') as tar:
        tar.truncate(1024)
    message = build_error(copy)
    assert all(f in message for f in ('train-000001.tar is 1024 bytes, index.json says', 'truncated',
                                      'DATA.SKIP_CORRUPT'))
    dataset = ShardDataset(ShardSet(str(copy)), 'train', raw, skip_corrupt=True)
    clean = ShardDataset(ShardSet(str(shards)), 'train', raw)
    readable = [i for i in range(len(clean)) if dataset.layout.shard[i] != 1]
    assert 0 < len(readable) < len(clean)
    for i in range(len(clean)):  # a lost sample is replaced by the next readable one
        replacement = next(j for j in readable + [readable[0] + len(clean)] if j >= i) % len(clean)
        assert np.array_equal(dataset[i][0], clean[replacement][0])
    assert dataset.skipped >= len(clean) - len(readable)


def test_a_truncated_shard_fetched_over_http_is_tried_again_then_refused_not_cached(shards, tmp_path, serve):
    copy = broken_copy(shards, tmp_path)
    with open(copy / 'val-000000.tar', 'r+b') as tar:
        tar.truncate(1024)
    server = serve(copy)
    with pytest.raises(DataError, match=r'val-000000.tar: fetched 1024 bytes, the index says \d+ \(truncated or '
                                        r'replaced\) \(2 tries, DATA.FETCH_RETRIES 1\)'):
        ShardSet(server.url, cache_dir=str(tmp_path / 'cache'), retries=1).prefetch(['val'])
    assert server.requests['val-000000.tar'] == 2
    assert [p.name for p in (tmp_path / 'cache').rglob('val-000000.tar*')] == ['val-000000.tar.lock']


def test_a_label_outside_the_classes_is_named_or_skipped(shards, tmp_path):
    # Mutation caught: no range check (label 7 of 3 classes reached the loss).
    copy = broken_copy(shards, tmp_path)
    line = (copy / 'train-000001.idx').read_text().splitlines()[1].split()
    cls_at, member = int(line[5]), line[7]
    with open(copy / 'train-000001.tar', 'r+b') as tar:
        tar.seek(cls_at)
        tar.write(b'7')
    dataset = ShardDataset(ShardSet(str(copy)), 'train', raw)
    with pytest.raises(SampleError, match=f'cannot read sample {member.split(".")[0]}.* of shard train-000001.tar: '
                                          'its label is 7, there are 3 classes'):
        dataset[int(member.split('.')[0])]
    skipping = ShardDataset(ShardSet(str(copy)), 'train', raw, skip_corrupt=True)
    assert skipping[int(member.split('.')[0])][1] in (0, 1, 2) and skipping.skipped == 1


def test_a_decompression_bomb_is_named_or_skipped(folder, tmp_path, bomb_png):
    # Mutation caught: PIL's DecompressionBombError not among the unreadable-image errors (it escaped
    # as a traceback, and SKIP_CORRUPT did not skip it).
    copy = tmp_path / 'folder'
    shutil.copytree(folder, copy)
    bomb = copy / 'train' / 'class_0' / '0.png'
    bomb.write_bytes(bomb_png)
    with pytest.raises(SampleError, match=f'cannot read image {bomb}: Image size .* decompression bomb'):
        ImageFolder(str(copy / 'train'), raw)[0]
    skipping = ImageFolder(str(copy / 'train'), raw, skip_corrupt=True)
    assert skipping[0][0].shape == (40, 40, 3) and skipping.skipped == 1


def test_a_corrupt_sample_is_named_or_skipped(shards, tmp_path):
    copy = broken_copy(shards, tmp_path)
    line = (copy / 'train-000002.idx').read_text().splitlines()[1].split()
    offset, size, member = int(line[1]), int(line[2]), line[3]
    with open(copy / 'train-000002.tar', 'r+b') as tar:  # same size: only decoding can tell
        tar.seek(offset)
        tar.write(b'\0' * size)
    proc = run_main(*train_args(copy, tmp_path / 'out'), check=False)
    assert_one_line_error(proc, f'cannot read sample {member} of shard train-000002.tar')
    dataset = ShardDataset(ShardSet(str(copy)), 'train', raw, skip_corrupt=True)
    for i in range(len(dataset)):
        dataset[i]
    assert dataset.skipped == 1


@pytest.mark.parametrize('damage, fragments', [
    ('drop-idx-line', ('train-000003.idx is', 'bytes, index.json says', 'the index disagrees with its shards')),
    ('drop-idx-line-v1', ('train-000003.idx lists', 'the index disagrees with its shards')),
    ('missing-shard', ('train-000003.tar is missing',)),
    ('val-classes', ('train and val have different class sets', 'class_2, class_7')),
    ('no-index', ('no index.json',)),
])
def test_a_shard_folder_that_disagrees_with_its_index_is_one_line(shards, tmp_path, damage, fragments):
    copy = broken_copy(shards, tmp_path)
    if damage.startswith('drop-idx-line'):
        idx = copy / 'train-000003.idx'
        idx.write_text('\n'.join(idx.read_text().splitlines()[:-1]) + '\n')
        if damage.endswith('v1'):  # an index without the .idx sizes: the line count is checked
            index = json.loads((copy / 'index.json').read_text())
            index['version'] = 1
            for entry in index['splits']['train']['shards'] + index['splits']['val']['shards']:
                del entry['index_bytes'], entry['index_sha256']
            (copy / 'index.json').write_text(json.dumps(index))
    elif damage == 'missing-shard':
        (copy / 'train-000003.tar').unlink()
    elif damage == 'val-classes':
        index = json.loads((copy / 'index.json').read_text())
        index['splits']['val']['classes'][2] = 'class_7'
        (copy / 'index.json').write_text(json.dumps(index))
    else:
        (copy / 'index.json').unlink()
    message = build_error(copy, 'DATA.FORMAT', 'shards')
    assert all(fragment in message for fragment in fragments), message
