"""Remote shard locations (data/fetch.py, data/shards/): an index is data, not commands or paths;
the cache is written safely; fetching survives ordinary failures and says what is wrong in one line.

Each test names, in a comment, the change of the code it was seen to catch."""
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from data.shards import FetchFailed, ShardDataset, ShardSet, convert
from helpers import assert_one_line_error, make_image_folder, run_main, train_args
from utils import DataError


def raw(image):
    return np.asarray(image)


@pytest.fixture(scope='module')
def shards(tmp_path_factory) -> Path:
    folder = make_image_folder(tmp_path_factory.mktemp('folder'), classes=3, train_per_class=4, val_per_class=2)
    out = tmp_path_factory.mktemp('shards') / 'out'
    convert(str(folder), str(out), shard_mb=0.01, log=lambda line: None)
    return out


@pytest.fixture
def served(shards, tmp_path, serve):
    """A server of a copy of the shards, which a test may change."""
    copy = tmp_path / 'served'
    shutil.copytree(shards, copy)
    return serve(copy)


def rewrite_index(folder: Path, change) -> None:
    index = json.loads((folder / 'index.json').read_text())
    change(index)
    (folder / 'index.json').write_text(json.dumps(index))


# --- the index is data -----------------------------------------------------------------------------

@pytest.mark.parametrize('name', ['x;touch PWNED;#.tar', '../../owned.tar', '.hidden.tar', 'a/b.tar'])
def test_a_shard_name_that_is_not_a_plain_file_name_is_refused_before_anything_is_fetched(served, tmp_path, name):
    # Mutation caught: no name check (the pipe ran `touch`, and the HTTP fetch wrote outside the cache).
    rewrite_index(served.folder, lambda index: index['splits']['train']['shards'][0].update(name=name))
    cache = tmp_path / 'deep' / 'cache'
    for location in (served.url, f'pipe:cd {tmp_path} && cat {served.folder}/{{}}'):
        with pytest.raises(DataError, match='is not a plain file name') as error:
            ShardSet(location, cache_dir=str(cache), retries=0)
        assert repr(name) in str(error.value) and '\n' not in str(error.value)
    assert not (tmp_path / 'PWNED').exists() and not list(tmp_path.rglob('owned.tar'))
    assert sorted(n for n in served.requests if n != 'index.json') == []


@pytest.mark.parametrize('damage, fragment', [
    (lambda index: index.clear() or index.update(format='fat-shards', version=2, label_digits=1, splits=[]),
     'no "splits" object'),
    (lambda index: index['splits']['val']['shards'][0].pop('sha256'), 'val shard 0 is not an object with'),
    (lambda index: index['splits']['val']['shards'][0].pop('index_sha256'), 'index_sha256'),
    (lambda index: index['splits']['val'].update(samples='many'), "val: samples is 'many', not a count"),
    (lambda index: index['splits']['val']['shards'][1].update(name=index['splits']['val']['shards'][0]['name']),
     'is not a .tar name of its own'),
])
def test_an_index_with_missing_or_wrong_entries_is_one_line(shards, tmp_path, damage, fragment):
    copy = tmp_path / 'copy'
    shutil.copytree(shards, copy)
    rewrite_index(copy, damage)
    with pytest.raises(DataError, match='not a shard index written by python -m data.shards') as error:
        ShardSet(str(copy))
    assert fragment in str(error.value) and '\n' not in str(error.value)


def test_an_index_that_is_not_an_object_is_one_line_from_main(shards, tmp_path):
    copy = tmp_path / 'copy'
    shutil.copytree(shards, copy)
    (copy / 'index.json').write_text('[1, 2, 3]')
    assert_one_line_error(run_main(*train_args(copy, tmp_path / 'out'), check=False),
                          'index.json: a JSON list, not an object')


# --- the cache -------------------------------------------------------------------------------------

def version_folder(cache: Path, location: str, index: bytes) -> Path:
    folder = cache / hashlib.sha256(location.encode()).hexdigest()[:16] / hashlib.sha256(index).hexdigest()[:16]
    folder.mkdir(parents=True)
    return folder


def test_links_planted_in_the_cache_are_not_written_through(served, tmp_path):
    # Mutations caught: the lock file opened with open(..., 'w') (the victim was emptied); a cached
    # file taken as it is without lstat (the planted link was read as the shard).
    cache, victim = tmp_path / 'cache', tmp_path / 'victim.txt'
    victim.write_text('precious')
    folder = version_folder(cache, served.url, (served.folder / 'index.json').read_bytes())
    entry = json.loads((served.folder / 'index.json').read_text())['splits']['val']['shards'][0]
    (folder / entry['name']).symlink_to(victim)
    shard_set = ShardSet(served.url, cache_dir=str(cache), retries=0)
    shard_set.prefetch(['val'])
    assert (folder / entry['name']).is_file() and not (folder / entry['name']).is_symlink()
    assert (folder / entry['name']).read_bytes() == (served.folder / entry['name']).read_bytes()
    second = json.loads((served.folder / 'index.json').read_text())['splits']['train']['shards'][0]['name']
    (folder / f'{second}.lock').symlink_to(victim)
    with pytest.raises(DataError, match=f'cannot lock .*{second}.lock in the shard cache'):
        shard_set.prefetch(['train'])
    assert victim.read_text() == 'precious'


def test_a_bad_idx_file_is_refused_when_fetched_and_replaced_when_found_in_the_cache(served, tmp_path):
    # Mutations caught: .idx fetched without size and sha256 (the HTML page was cached and then read
    # as the index); a cached .idx not checked again (it stayed wrong for every later run).
    idx = served.folder / 'val-000000.idx'
    good = idx.read_bytes()
    idx.write_bytes(b'<html>503 Service Unavailable</html>\n')
    cache = tmp_path / 'cache'
    with pytest.raises(DataError, match=r'cannot fetch .*val-000000.idx: fetched \d+ bytes, the index says'):
        ShardSet(served.url, cache_dir=str(cache), retries=0).prefetch(['val'])
    assert not list(cache.rglob('val-000000.idx'))
    idx.write_bytes(good)
    folder = next(cache.glob('*/*/'))
    (folder / 'val-000000.idx').write_bytes(b'x' * len(good))  # a stale copy of the right size
    dataset = ShardDataset(ShardSet(served.url, cache_dir=str(cache), retries=0), 'val', raw)
    assert len(dataset) == 6 and (folder / 'val-000000.idx').read_bytes() == good


def test_a_version_1_index_reads_and_fetches_its_idx_files_afresh(served, tmp_path):
    def to_version_1(index):
        index['version'] = 1
        for info in index['splits'].values():
            for entry in info['shards']:
                del entry['index_bytes'], entry['index_sha256']
    rewrite_index(served.folder, to_version_1)
    for _ in range(2):
        shard_set = ShardSet(served.url, cache_dir=str(tmp_path / 'cache'), retries=0)
        shard_set.prefetch(['val'])
        dataset = ShardDataset(shard_set, 'val', raw)
        assert len(dataset) == 6 and dataset[0][1] == 0
    assert served.requests['val-000000.idx'] == 2 and served.requests['val-000000.tar'] == 1


def test_leftovers_of_killed_fetches_are_removed_unless_a_fetch_is_running(served, tmp_path):
    # Mutations caught: no sweep (the leftover stayed); a sweep that takes no lock (the file of the
    # fetch in progress was removed).
    cache = tmp_path / 'cache'
    folder = version_folder(cache, served.url, (served.folder / 'index.json').read_bytes())
    dead, alive = folder / 'val-000000.tar.tmp4242-0badcafe', folder / 'val-000001.tar.tmp77-12345678'
    dead.write_bytes(b'half')
    alive.write_bytes(b'in progress')
    with open(folder / 'val-000001.tar.lock', 'w') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        ShardSet(served.url, cache_dir=str(cache), retries=0)
        assert not dead.exists() and alive.exists()


# --- fetching that survives ordinary failures -----------------------------------------------------

def test_an_evaluation_fetches_the_val_shards_only(served, tmp_path):
    # Mutation caught: both splits prefetched whatever the mode (ImageNet's 140 GB of train shards
    # fetched to evaluate a checkpoint).
    from argparse import Namespace
    from classification import get_config
    from classification.data import build_loader
    config = get_config(Namespace(cfg=None, opts=['DATA.DATA_PATH', served.url, 'DATA.SHARD_CACHE', str(tmp_path),
                                                  'DATA.NUM_WORKERS', '0', 'DATA.IMG_SIZE', '32', 'DEVICE', 'cpu',
                                                  'DATA.BATCH_SIZE', '4', 'EVAL_MODE', 'True']))
    data = build_loader(config)
    assert sum(len(labels) for _, labels in data.val) == 6
    fetched = {name for name in served.requests if name.endswith('.tar')}
    index = json.loads((served.folder / 'index.json').read_text())
    assert fetched == {entry['name'] for entry in index['splits']['val']['shards']}, fetched


def test_transient_failures_are_tried_again_and_a_missing_file_is_not(served, tmp_path):
    # Mutations caught: no retries (the 503 stopped the run); a 404 retried (4 requests instead of 1).
    served.faults['val-000000.tar'] = [503, 502]
    shard_set = ShardSet(served.url, cache_dir=str(tmp_path / 'cache'), retries=2)
    started = time.monotonic()
    shard_set.prefetch(['val'])
    assert served.requests['val-000000.tar'] == 3 and 3 <= time.monotonic() - started < 30  # waits 1, then 2 s
    (served.folder / 'train-000000.tar').unlink()
    with pytest.raises(DataError, match=r'cannot fetch http://.*/train-000000.tar: HTTP 404'):
        shard_set.prefetch(['train'])
    assert served.requests['train-000000.tar'] == 1


def test_a_shard_a_loader_worker_fetches_again_is_tried_again_and_never_dropped(served, tmp_path):
    # A shard removed from the cache after the prefetch is fetched again where a sample needs it.
    # Mutations caught: a failed fetch remembered as a broken shard (its samples skipped for the rest
    # of the run); a failed fetch taken for a corrupt sample (skipped under DATA.SKIP_CORRUPT).
    shard_set = ShardSet(served.url, cache_dir=str(tmp_path / 'cache'), retries=1)
    shard_set.prefetch(['val'])
    cached = shard_set.tar_path('val', 0)
    want = ShardDataset(shard_set, 'val', raw)
    position = int(np.flatnonzero(want.layout.shard == 0)[0])
    image, label = want[position]

    cached.unlink()
    served.faults['val-000000.tar'] = [503]
    dataset = ShardDataset(shard_set, 'val', raw, skip_corrupt=True)
    assert np.array_equal(dataset[position][0], image) and dataset.skipped == 0
    assert served.requests['val-000000.tar'] == 3, 'prefetched, then failed and tried again'

    cached.unlink()
    served.faults['val-000000.tar'] = [503, 503]
    dataset = ShardDataset(shard_set, 'val', raw, skip_corrupt=True)
    with pytest.raises(FetchFailed, match=r'val-000000.tar: HTTP 503 .*\(2 tries, DATA.FETCH_RETRIES 1\)'):
        dataset[position]
    assert dataset.skipped == 0
    assert np.array_equal(dataset[position][0], image), 'the shard is fetched when asked again'


def test_a_response_cut_short_is_tried_again(served, tmp_path):
    # Mutation caught: http.client's IncompleteRead not taken as transient (a traceback, no retry).
    served.faults['val-000000.tar'] = ['cut']
    ShardSet(served.url, cache_dir=str(tmp_path / 'cache'), retries=1).prefetch(['val'])
    assert served.requests['val-000000.tar'] == 2


def test_a_file_that_cannot_be_fetched_stops_the_prefetch_without_waiting_for_those_before_it(served, tmp_path,
                                                                                               monkeypatch):
    # Two at a time: the first shard stalls, the second is missing. Mutation caught: results taken in
    # order (pool.map): the stall was reported, and meanwhile every later shard was fetched.
    monkeypatch.setattr('data.fetch.FETCH_THREADS', 2)
    shard_set = ShardSet(served.url, cache_dir=str(tmp_path / 'cache'), retries=0, timeout=2)
    shard_set.index_paths('train')  # the .idx files first, so that the two threads take the first two shards
    names = [entry['name'] for entry in shard_set.split('train')['shards']]
    served.faults[names[0]] = ['stall']
    (served.folder / names[1]).unlink()
    with pytest.raises(DataError, match=f'{names[1]}: HTTP 404'):
        shard_set.prefetch(['train'])
    fetched = [name for name in served.requests if name.endswith('.tar')]
    assert len(names) > 3 and len(fetched) <= 3, fetched  # the two, and at most one started meanwhile


def test_a_pipe_command_that_fails_once_is_tried_again(shards, tmp_path):
    flag = tmp_path / 'failed-once'
    command = (f'pipe:if [ {{}} = val-000001.tar ] && [ ! -e {flag} ]; then touch {flag}; echo throttled >&2; '
               f'exit 3; fi; cat {shards}/{{}}')
    dataset = ShardDataset(ShardSet(command, cache_dir=str(tmp_path / 'cache'), retries=1), 'val', raw)
    dataset.shards.prefetch(['val'])
    assert flag.exists() and len(dataset) == 6
    with pytest.raises(DataError, match=r'exited with status 3: throttled \(1 try, DATA.FETCH_RETRIES 0\)'):
        flag.unlink()
        ShardSet(command, cache_dir=str(tmp_path / 'cache2'), retries=0).prefetch(['val'])


@pytest.mark.parametrize('fault, fragment', [('stall', 'no data for 1 s'),
                                             ('trickle', r'took longer than DATA.FETCH_TIMEOUT \(1 s\)')])
def test_a_stalled_or_trickling_http_fetch_fails_after_its_deadline(served, tmp_path, fault, fragment):
    # Mutation caught: urlopen's socket timeout as the only deadline (the trickle never ended).
    served.faults['val-000000.tar'] = [fault]
    started = time.monotonic()
    with pytest.raises(DataError, match=fragment):
        ShardSet(served.url, cache_dir=str(tmp_path / 'cache'), retries=0, timeout=1).prefetch(['val'])
    assert time.monotonic() - started < 6


def test_a_hung_pipe_command_is_killed_after_its_deadline(shards, tmp_path):
    # Mutation caught: the command's process group not killed (its sleep outlived the fetch).
    pids = tmp_path / 'pids'
    command = f'pipe:if [ {{}} = val-000000.tar ]; then echo $$ >> {pids}; sleep 60; fi; cat {shards}/{{}}'
    started = time.monotonic()
    with pytest.raises(DataError, match='the command sent no data for 1 s'):
        ShardSet(command, cache_dir=str(tmp_path / 'cache'), retries=0, timeout=1).prefetch(['val'])
    assert time.monotonic() - started < 10
    pid = int(pids.read_text().split()[0])
    time.sleep(0.2)
    alive = subprocess.run(['pgrep', '-s', str(pid), '-r', 'R,S,D,T'], capture_output=True).stdout
    assert alive == b'', 'nothing of it left running'


# --- a full disk ------------------------------------------------------------------------------------

def test_a_cache_without_room_for_the_split_is_one_line_before_fetching(served, tmpfs):
    small_disk = tmpfs('64k')
    # Mutation caught: no room check (fetching began and filled the disk).
    big = served.folder / 'train-000000.tar'
    big.write_bytes(big.read_bytes() * 10)  # one shard of several hundred KB
    rewrite_index(served.folder, lambda index: index['splits']['train']['shards'][0].update(
        bytes=big.stat().st_size, sha256=hashlib.sha256(big.read_bytes()).hexdigest()))
    with pytest.raises(DataError, match=rf'the shard cache {small_disk}/.* needs [\d.]+ KB more for the train shards '
                                        r'\([\d.]+ KB free there\): free space or set DATA.SHARD_CACHE'):
        ShardSet(served.url, cache_dir=str(small_disk), retries=0).prefetch(['train'])
    assert served.requests.get('train-000000.tar') is None


def test_a_disk_that_fills_while_fetching_is_one_line_naming_the_cache(served, tmpfs):
    small_disk = tmpfs('64k')
    # Mutation caught: ENOSPC reported as any write error (no word of the cache being full).
    shard_set = ShardSet(served.url, cache_dir=str(small_disk), retries=2)
    (small_disk / 'filler').write_bytes(b'\0' * (os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize))
    with pytest.raises(DataError, match=r'the shard cache .* is full \(No space left on device\) while fetching '
                                        r'val-000000.tar \([\d.]+ KB\): free space there or set DATA.SHARD_CACHE to a larger disk'):
        shard_set.fetcher.path('val-000000.tar', size=(served.folder / 'val-000000.tar').stat().st_size)
    assert served.requests['val-000000.tar'] == 1, 'a full disk is not tried again'
