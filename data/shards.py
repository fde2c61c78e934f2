"""WebDataset shards of an ImageFolder root: written by ``python -m data.shards``, read map-style.

    python -m data.shards --data-path /data/imagenet --output /data/imagenet-shards

Layout of the output folder (the index is written last: without it the conversion is unfinished)::

    index.json         classes, label digits, and per split its shards: name, samples, bytes, sha256
    train-000000.tar   WebDataset samples: KEY.jpg (the original encoded bytes; png etc. keep their suffix) and
    train-000000.idx   KEY.cls (the class index, zero-padded ASCII); beside each tar, DALI's index (wds2idx)

KEY is the sample's position in torchvision's ImageFolder order of the source split. The samples are
stored in a shuffled order (so that streaming readers, DALI's among them, see mixed classes), and the
reader maps position -> (shard, byte range) through the ``.idx`` files: sample i of the shards is
sample i of the folder. The engine's sampler and per-sample seeding therefore work unchanged
(exact epochs, exact resume), and a run on the shards trains on the very batches a run on the
folders would. Why map-style rather than streaming: a streaming reader would need its own answer to
"every sample once per epoch over all processes" and "continue mid-epoch"; indexed random access
keeps the one answer the engine already has. The cost is random reads within shards, which local
disks and page caches serve well; remote shards are cached whole on local disk (below).

A location is a local folder, an ``http(s)://`` URL of the folder, or ``pipe:COMMAND`` where COMMAND
prints a file to stdout and ``{}`` stands for its name, e.g.
``pipe:aws s3 cp s3://bucket/imagenet-shards/{} -``. Remote files are fetched into a local cache
(DATA.SHARD_CACHE, data/fetch.py) before training starts, each checked against the index.

The index is data from elsewhere: it is checked whole when read (``parse_index``), and every name in
it must be a plain file name. Version 2 indexes (written since 2026-12) also give each ``.idx`` file's
size and sha256, so that a remote ``.idx`` is checked like its tar; a version 1 index's ``.idx``
files are fetched afresh every run.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import os
import random
import re
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

from utils import DataError, SampleError, leftover_temporaries, write_atomically

from .fetch import FETCH_THREADS, Fetcher, check_file_name, is_remote

logger = logging.getLogger(__name__)

INDEX = 'index.json'
FORMAT = 'fat-shards'
VERSION = 2  # 2: each shard's entry also gives its .idx file's size and sha256
STATE = '.conversion.json'  # the parameters of a conversion in progress (removed when it completes)
DEFAULT_SHARD_MB = 256
_BLOCK = 512  # tar block size
_SHA256 = re.compile(r'[0-9a-f]{64}')


def is_shard_location(location: str) -> bool:
    """Whether ``location`` holds shards: any URL or pipe:, or a local folder with an index.json (or
    the leftovers of an unfinished conversion)."""
    return is_remote(location) or any(os.path.isfile(os.path.join(location, name)) for name in (INDEX, STATE))


def shard_name(split: str, number: int, suffix: str = '.tar') -> str:
    return f'{split}-{number:06d}{suffix}'


def index_name(tar_name: str) -> str:
    return tar_name[:-len('.tar')] + '.idx'


def check_same_classes(classes: List[str], others: List[str], problem: str) -> None:
    """Stop with ``problem`` and the first classes in only one of the lists when they differ."""
    if classes != others:
        only = sorted(set(classes) ^ set(others))
        raise DataError(f'{problem} (in one only: {", ".join(only[:5])}{" ..." if len(only) > 5 else ""})')


# --- the index ------------------------------------------------------------------------------------

def parse_index(content: bytes, where: str) -> dict:
    """The index in ``content``, checked whole: an object of format ``fat-shards``, version 1 or 2,
    each split with its sample count, class names and shards, each shard with a plain file name, its
    sample count, size and sha256 (and, version 2, its .idx file's). One error line otherwise."""
    def fail(problem: str):
        raise DataError(f'{where}: {problem}; not a shard index written by python -m data.shards (convert again)')

    def count(value, what: str) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            fail(f'{what} is {value!r}, not a count')
        return value

    try:
        index = json.loads(content)
    except ValueError as error:
        fail(f'not JSON ({error})')
    if not isinstance(index, dict):
        fail(f'a JSON {type(index).__name__}, not an object')
    if index.get('format') != FORMAT or index.get('version') not in (1, 2):
        fail(f'format {index.get("format")!r} version {index.get("version")!r}, not {FORMAT!r} 1 or 2')
    count(index.get('label_digits'), 'label_digits')
    splits = index.get('splits')
    if not isinstance(splits, dict) or not splits:
        fail('it has no "splits" object')
    names = set()
    for split, info in splits.items():
        if not isinstance(info, dict):
            fail(f'split {split!r} is not an object')
        count(info.get('samples'), f'{split}: samples')
        classes = info.get('classes')
        if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
            fail(f'{split}: classes is not a list of names')
        shards = info.get('shards')
        if not isinstance(shards, list):
            fail(f'{split}: shards is not a list')
        keys = ('name', 'samples', 'bytes', 'sha256') + (('index_bytes', 'index_sha256') if index['version'] >= 2
                                                          else ())
        for number, entry in enumerate(shards):
            if not isinstance(entry, dict) or any(key not in entry for key in keys):
                fail(f'{split} shard {number} is not an object with {", ".join(keys)}')
            name = check_file_name(entry['name'], where)
            if not name.endswith('.tar') or name in names:
                fail(f'{split} shard {number}: {name!r} is not a .tar name of its own')
            names.add(name)
            for key in ('samples', 'bytes') + (('index_bytes',) if index['version'] >= 2 else ()):
                count(entry[key], f'{split} shard {number}: {key}')
            for key in ('sha256',) + (('index_sha256',) if index['version'] >= 2 else ()):
                if not isinstance(entry[key], str) or not _SHA256.fullmatch(entry[key]):
                    fail(f'{split} shard {number}: {key} is not a sha256')
    return index


# --- reading -------------------------------------------------------------------------------------

@dataclass
class SplitLayout:
    """Where every sample of a split lies, by position in the source's ImageFolder order."""
    shard: np.ndarray  # int32: which shard
    image: np.ndarray  # int64 (n, 2): byte offset and size of the encoded image
    label: np.ndarray  # int64 (n, 2): byte offset and size of the .cls member
    suffix: List[str]  # the image member's suffix, per sample


class ShardSet:
    """The shards at a location (see the module's docstring), checked against their index."""

    def __init__(self, location: str, cache_dir: str = '', retries: int = 4, timeout: float = 900):
        self.fetcher = Fetcher(location, cache_dir, retries, timeout)
        self.location = location
        content = self.fetcher.index(INDEX)
        if content is None:
            partial = list(self.fetcher.folder.glob('*.tar')) or (self.fetcher.folder / STATE).exists()
            raise DataError(f'{location}: no {INDEX}' + (': the conversion did not finish (run python -m data.shards '
                                                         'again with the same arguments to complete it)' if partial
                                                         else ''))
        self.index = parse_index(content, self.fetcher.describe(INDEX))
        self.splits: Dict[str, dict] = self.index['splits']

    def split(self, split: str) -> dict:
        if split not in self.splits:
            raise DataError(f'{self.location}: no {split} split in {INDEX} (it has {", ".join(self.splits)})')
        return self.splits[split]

    def classes(self, split: str) -> List[str]:
        return self.split(split)['classes']

    def _tars(self, split: str) -> List[Tuple[str, int, str]]:
        return [(entry['name'], entry['bytes'], entry['sha256']) for entry in self.split(split)['shards']]

    def _indexes(self, split: str) -> List[Tuple[str, Optional[int], Optional[str]]]:
        return [(index_name(entry['name']), entry.get('index_bytes'), entry.get('index_sha256'))
                for entry in self.split(split)['shards']]

    def prefetch(self, splits: Sequence[str]) -> None:
        """A remote location's files of ``splits`` into the cache now, before training: with a
        global shuffle the first batches need every shard, and a process fetching them then would
        keep the others waiting in a collective."""
        files = [entry for split in splits for entry in self._indexes(split) + self._tars(split)
                 if entry[2] is not None]
        self.fetcher.prefetch(files, f'the {" and ".join(splits)} shards')

    def tar_path(self, split: str, shard: int) -> Path:
        name, size, sha256 = self._tars(split)[shard]
        return self.fetcher.path(name, size=size, sha256=sha256)

    def check_tar(self, split: str, shard: int) -> Optional[str]:
        """Why shard ``shard``'s tar cannot be read (missing, or of another size than the index says), or None."""
        name, size, _ = self._tars(split)[shard]
        try:
            got = self.tar_path(split, shard).stat().st_size
        except FileNotFoundError:
            return f'{self.fetcher.describe(name)} is missing'
        if got != size:
            return f'{self.fetcher.describe(name)} is {got} bytes, {INDEX} says {size}: truncated or replaced'
        return None

    def index_paths(self, split: str) -> List[Path]:
        """The split's .idx files on local disk, fetched when remote and not cached with the size and
        sha256 the index gives (afresh for a version 1 index, which gives neither)."""
        entries = self._indexes(split)
        with ThreadPoolExecutor(FETCH_THREADS) as pool:
            return list(pool.map(lambda e: self.fetcher.path(e[0], refresh=e[2] is None, size=e[1], sha256=e[2],
                                                           recheck=True),
                                 entries))

    def local_paths(self, split: str) -> List[Path]:
        """Every tar of ``split`` on local disk (fetched first when remote), each checked against the index."""
        self.prefetch([split])
        for shard in range(len(self._tars(split))):
            problem = self.check_tar(split, shard)
            if problem:
                raise DataError(problem)
        return [self.tar_path(split, shard) for shard in range(len(self._tars(split)))]

    def layout(self, split: str) -> SplitLayout:
        """Read the split's .idx files; they must agree with index.json and cover every position once."""
        info = self.split(split)
        n = info['samples']
        shard_of = np.full(n, -1, dtype=np.int32)
        image, label = np.zeros((n, 2), dtype=np.int64), np.zeros((n, 2), dtype=np.int64)
        suffix = [''] * n
        for number, (entry, path) in enumerate(zip(info['shards'], self.index_paths(split))):
            where = self.fetcher.describe(index_name(entry['name']))
            try:
                if entry.get('index_bytes') is not None and path.stat().st_size != entry['index_bytes']:
                    raise DataError(f'{where} is {path.stat().st_size} bytes, {INDEX} says {entry["index_bytes"]}: '
                                    'the index disagrees with its shards (convert again)')
                lines = path.read_text().splitlines()
            except OSError as error:
                raise DataError(f'{where}: cannot read the shard\'s index ({error.strerror})') from error
            if len(lines) - 1 != entry['samples'] or lines[0] != f'v1.2 {entry["samples"]}':
                raise DataError(f'{where} lists {len(lines) - 1} samples, {INDEX} says {entry["samples"]} for '
                                f'{entry["name"]}: the index disagrees with its shards (convert again)')
            for line in lines[1:]:
                fields = line.split()
                members = {fields[i]: fields[i:i + 4] for i in range(0, len(fields), 4)}
                try:
                    (ext, at, size, _), = [m for e, m in members.items() if e != 'cls']
                    cls = members['cls']
                    key = int(cls[3].split('.')[0])
                    assert 0 <= key < n and shard_of[key] < 0
                    image[key], label[key] = (int(at), int(size)), (int(cls[1]), int(cls[2]))
                except (ValueError, KeyError, AssertionError):
                    raise DataError(f'{where}: bad or repeated sample line {line!r}') from None
                shard_of[key], suffix[key] = number, ext
        if (shard_of < 0).any():
            raise DataError(f'{self.location}: {int((shard_of < 0).sum())} {split} samples of {INDEX} are in no shard '
                            '(the index disagrees with its shards; convert again)')
        return SplitLayout(shard_of, image, label, suffix)


# What reading an image can raise: PIL's errors, and its refusal of images so large that they are
# likely a decompression bomb (more than twice Image.MAX_IMAGE_PIXELS).
UNREADABLE_IMAGE = (OSError, ValueError, Image.DecompressionBombError)


class FetchFailed(DataError):
    """A remote shard that a loader worker found missing from the cache could not be fetched: one
    process meets it, and it is not a corrupt sample to skip."""
    every_rank = False


class SkippingReader(Dataset):
    """``(transform(image), target)`` by position, where a sample that cannot be read raises
    :class:`SampleError`, or with ``skip_corrupt`` is replaced by the next readable one and counted.
    Subclasses give ``_load(position) -> (PIL image, target)`` and ``describe()``."""

    transform = None
    skip_corrupt = False
    skipped = 0

    def _load(self, position: int):
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError

    def __getitem__(self, index: int):
        for attempt in range(len(self)):
            position = (index + attempt) % len(self)
            try:
                image, target = self._load(position)
            except SampleError as error:
                if not self.skip_corrupt:
                    raise
                self.skipped += 1
                logger.warning(f'{error}; skipped (DATA.SKIP_CORRUPT), {self.skipped} so far in this worker')
                continue
            return self.transform(image), target
        raise SampleError(f'{self.describe()}: none of its {len(self)} images can be read '
                          '(DATA.SKIP_CORRUPT skipped every one)')


class ShardDataset(SkippingReader):
    """A split of a :class:`ShardSet` as a map-style data set: item i is item i of the source
    ImageFolder. A shard that is missing or of another size than its index says stops the run
    when the data set is built, naming it, or with ``skip_corrupt`` its samples are skipped."""

    def __init__(self, shards: ShardSet, split: str, transform, skip_corrupt: bool = False):
        self.shards, self.split, self.transform, self.skip_corrupt = shards, split, transform, skip_corrupt
        self.classes = shards.classes(split)
        self.layout = shards.layout(split)
        self.num_shards = len(shards.split(split)['shards'])
        self.broken: Dict[int, str] = {}  # shard -> why it cannot be read
        if not is_remote(shards.location):  # remote shards are checked as they are fetched
            for number in range(self.num_shards):
                problem = shards.check_tar(split, number)
                if problem and not skip_corrupt:
                    raise DataError(f'{problem} (convert again, or set DATA.SKIP_CORRUPT to skip its samples)')
                if problem:
                    logger.warning(f'{problem}: its samples are skipped (DATA.SKIP_CORRUPT)')
                    self.broken[number] = problem
        self._files: Dict[int, int] = {}  # shard -> file descriptor, opened by the process that reads
        self._pid = -1

    def __len__(self) -> int:
        return len(self.layout.shard)

    def describe(self) -> str:
        return f'{self.shards.location} ({self.split})'

    def _descriptor(self, shard: int) -> int:
        if self._pid != os.getpid():  # a worker forked with the parent's descriptors opens its own
            self._files, self._pid = {}, os.getpid()
        if shard not in self._files:
            if shard in self.broken:
                raise SampleError(self.broken[shard])
            # A remote shard is in the cache (ShardSet.prefetch); one removed since is fetched again.
            # A fetch that fails is no sample's fault: it stops the run, naming the process that met it.
            try:
                self._files[shard] = os.open(self.shards.tar_path(self.split, shard), os.O_RDONLY)
            except DataError as error:
                raise FetchFailed(str(error)) from error
        return self._files[shard]

    def _load(self, position: int):
        shard = int(self.layout.shard[position])
        (image_at, image_size), (label_at, label_size) = self.layout.image[position], self.layout.label[position]
        start, end = min(image_at, label_at), max(image_at + image_size, label_at + label_size)
        data = os.pread(self._descriptor(shard), int(end - start), int(start))
        if len(data) != end - start:
            raise SampleError(f'cannot read {self._where(position)}: the shard ends early (truncated)')
        try:
            target = int(data[label_at - start:label_at - start + label_size])
            if not 0 <= target < len(self.classes):
                raise ValueError(f'its label is {target}, there are {len(self.classes)} classes')
            with Image.open(io.BytesIO(data[image_at - start:image_at - start + image_size])) as image:
                return image.convert('RGB'), target
        except UNREADABLE_IMAGE as error:
            raise SampleError(f'cannot read {self._where(position)}: {error}') from error

    def _where(self, position: int) -> str:
        name = self.shards.split(self.split)['shards'][int(self.layout.shard[position])]['name']
        return f'sample {position:09d}.{self.layout.suffix[position]} of shard {name}'

    def __getstate__(self):
        state = dict(self.__dict__)
        state['_files'], state['_pid'] = {}, -1
        return state


# --- writing -------------------------------------------------------------------------------------

def _tar_member(name: str, size: int) -> tarfile.TarInfo:
    """A member header with fixed owner and times: a conversion writes the same bytes every time."""
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, 0o644, 0
    return info


def _read(path: str) -> bytes:
    with open(path, 'rb') as f:
        return f.read()


class _HashingWriter:
    """A binary file that hashes what is written to it (the shard's sha256 without reading it back)."""

    def __init__(self, raw, digest):
        self.raw, self.digest = raw, digest

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        return self.raw.write(data)

    def tell(self) -> int:
        return self.raw.tell()


class ShardWriter:
    """Writes the shards of one split, each atomically: its tar, then its .idx (a shard counts as
    written once ConversionState records it)."""

    def __init__(self, output: Path, split: str, label_digits: int):
        self.output, self.split, self.label_digits = output, split, label_digits

    def write(self, number: int, samples: Sequence[tuple], contents: Sequence[bytes]) -> dict:
        """Write shard ``number`` of ``samples`` ((position, path, label)) with the files' ``contents``."""
        name = shard_name(self.split, number)
        lines = [f'v1.2 {len(samples)}']
        digest = hashlib.sha256()

        def write_tar(raw) -> None:
            hashed = _HashingWriter(raw, digest)
            with tarfile.open(fileobj=hashed, mode='w', format=tarfile.USTAR_FORMAT) as tar:
                for (position, path, label), data in zip(samples, contents):
                    suffix = Path(path).suffix.lower().lstrip('.')
                    suffix = 'jpg' if suffix in ('jpeg', 'jpe') else suffix  # WebDataset's name for JPEG
                    line = []
                    for member, payload in ((f'{position:09d}.{suffix}', data),
                                            (f'{position:09d}.cls', f'{label:0{self.label_digits}d}'.encode())):
                        line.append(f'{member.split(".", 1)[1]} {tar.offset + _BLOCK} {len(payload)} {member}')
                        tar.addfile(_tar_member(member, len(payload)), io.BytesIO(payload))
                    lines.append(' '.join(line))

        write_atomically(str(self.output / name), write_tar)
        idx = ('\n'.join(lines) + '\n').encode()
        write_atomically(str(self.output / index_name(name)), lambda f: f.write(idx))
        return {'name': name, 'samples': len(samples), 'bytes': (self.output / name).stat().st_size,
                'sha256': digest.hexdigest(), **index_hash(idx)}


def index_hash(idx: bytes) -> dict:
    """The entries of a shard's .idx file in a version 2 index."""
    return {'index_bytes': len(idx), 'index_sha256': hashlib.sha256(idx).hexdigest()}


def _plan(samples: List[tuple], seed: int) -> List[tuple]:
    """The order samples are stored in: shuffled with ``seed`` (the same every run)."""
    order = list(range(len(samples)))
    random.Random(seed).shuffle(order)
    return [(position, *samples[position]) for position in order]


class ConversionState:
    """``output/.conversion.json``: a conversion's arguments and the shards it completed, rewritten
    atomically after each shard, so that a conversion run again continues after the last of them."""

    def __init__(self, out: Path, parameters: dict, log):
        self.path, self.done = out / STATE, {}
        if self.path.exists():
            previous = json.loads(self.path.read_text())
            if previous['parameters'] != parameters:
                raise DataError(f'{out} holds an unfinished conversion with other arguments '
                                f'({previous["parameters"]}); finish it with those, or choose another --output')
            self.done = previous['done']
            log(f'continuing the unfinished conversion in {out}')
        elif any(out.iterdir()):
            raise DataError(f'{out} is not empty; choose a new folder for --output')
        self.parameters = parameters
        self._write()

    def completed(self, out: Path, split: str) -> List[dict]:
        """The shards of ``split`` already written whole (in order; a shard renamed into place but not
        yet recorded is written again, to the same bytes)."""
        kept = []
        for entry in self.done.get(split, []):
            tar = out / entry['name']
            if not tar.exists() or tar.stat().st_size != entry['bytes']:
                break
            if 'index_sha256' not in entry:  # recorded by a version 1 conversion
                entry = {**entry, **index_hash((out / index_name(entry['name'])).read_bytes())}
            kept.append(entry)
        return kept

    def add(self, split: str, entry: dict) -> None:
        self.done.setdefault(split, []).append(entry)
        self._write()

    def _write(self) -> None:
        content = json.dumps({'parameters': self.parameters, 'done': self.done}).encode()
        write_atomically(str(self.path), lambda f: f.write(content))


def convert(data_path: str, output: str, shard_mb: float = DEFAULT_SHARD_MB, seed: int = 0,
            splits: Sequence[str] = ('train', 'val'), threads: int = 8, log=print) -> dict:
    """Write the shards of ``data_path``'s ImageFolder splits to ``output`` and return the index.
    A conversion interrupted at any point continues when run again with the same arguments: complete
    shards are kept (each is renamed into place whole), partial ones written again."""
    source, out = Path(data_path), Path(output)
    folders = {split: source / split for split in splits}
    for split, folder in folders.items():
        if not folder.is_dir():
            raise DataError(f'{folder} not found: --data-path must hold {" and ".join(splits)} ImageFolders')
    classes = {split: find_classes(str(folder))[0] for split, folder in folders.items()}
    first = splits[0]
    for split in splits[1:]:
        check_same_classes(classes[first], classes[split],
                           f'{source}: {first}/ and {split}/ have different class folders')
    if (out / INDEX).exists():
        raise DataError(f'{out} already holds converted shards ({INDEX}); choose another --output')
    out.mkdir(parents=True, exist_ok=True)
    state = ConversionState(out, {'source': str(source.resolve()), 'shard_mb': shard_mb, 'seed': seed,
                                  'splits': list(splits)}, log)
    for leftover in [*out.glob('*.partial'), *(Path(tmp) for tmp, _ in leftover_temporaries(str(out)))]:
        leftover.unlink()
    label_digits = len(str(max(len(classes[first]) - 1, 0)))
    index = {'format': FORMAT, 'version': VERSION, 'label_digits': label_digits, 'splits': {}}
    for split in splits:
        log(f'{split}: listing {folders[split]}')
        samples = make_dataset(str(folders[split]), {name: i for i, name in enumerate(classes[split])},
                               extensions=IMG_EXTENSIONS)
        log(f'{split}: {len(samples):,} images in {len(classes[split])} classes')
        entries = _convert_split(out, split, _plan(samples, seed), state, label_digits, shard_mb * 2 ** 20, threads,
                                 log)
        index['splits'][split] = {'samples': len(samples), 'classes': classes[split], 'shards': entries}
    content = json.dumps(index, indent=1).encode()
    write_atomically(str(out / INDEX), lambda f: f.write(content))
    state.path.unlink()
    return index


def _convert_split(out: Path, split: str, ordered: List[tuple], state: ConversionState, label_digits: int,
                   shard_bytes: float, threads: int, log) -> List[dict]:
    writer = ShardWriter(out, split, label_digits)
    entries, cursor = state.completed(out, split), 0
    for entry in entries:  # the source must still list what those shards hold, where they hold it
        lines = (out / index_name(entry['name'])).read_text().splitlines()[1:]
        stored = [int(line.split()[3].split('.')[0]) for line in lines]
        if stored != [position for position, *_ in ordered[cursor:cursor + len(lines)]]:
            raise DataError(f'{out / entry["name"]} does not hold the samples this conversion puts there (the source '
                            'changed?); convert into a new folder')
        cursor += len(lines)
    if entries:
        log(f'{split}: {len(entries)} shard(s), {cursor:,} images already written')
    started, written, total_bytes, number = time.time(), 0, 0, len(entries)
    last_report = [started]

    def report(final: bool = False) -> None:  # a line at most every 10 s, and at the end
        if final or time.time() - last_report[0] >= 10:
            last_report[0] = time.time()
            _progress(log, split, number, cursor + written, len(ordered), total_bytes, started)

    def finish_shard() -> None:
        nonlocal pending, contents, size, written, total_bytes, number
        entry = writer.write(number, pending, contents)
        state.add(split, entry)
        entries.append(entry)
        written, total_bytes, number = written + len(pending), total_bytes + size, number + 1
        pending, contents, size = [], [], 0

    pending: List[tuple] = []
    contents: List[bytes] = []
    size = 0
    with ThreadPoolExecutor(threads) as pool:
        for start in range(cursor, len(ordered), 256):  # read ahead in chunks; never all files at once
            chunk = ordered[start:start + 256]
            for sample, data in zip(chunk, pool.map(_read, [path for _, path, _ in chunk])):
                pending.append(sample)
                contents.append(data)
                size += len(data) + 4 * _BLOCK
                if size >= shard_bytes:
                    finish_shard()
                    report()
    if pending:
        finish_shard()
    report(final=True)
    return entries


def _progress(log, split: str, shards: int, done: int, total: int, written: float, started: float) -> None:
    elapsed = max(time.time() - started, 1e-6)
    rate = written / elapsed
    remaining = (total - done) * (written / max(done, 1)) / max(rate, 1e-6) if done < total else 0
    log(f'{split}: {shards} shard(s), {done:,}/{total:,} images ({100 * done / max(total, 1):.1f}%), '
        f'{rate / 2 ** 20:.1f} MB/s, about {int(remaining)} s left')


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description='Convert an ImageFolder root (train/ and val/) into WebDataset '
                                                 'shards that main.py reads with --data-path OUTPUT.')
    parser.add_argument('--data-path', required=True, help='ImageFolder root holding train/ and val/')
    parser.add_argument('--output', required=True, help='new folder for the shards and their index')
    parser.add_argument('--shard-size', type=float, default=DEFAULT_SHARD_MB, help='MB per shard (default 256)')
    parser.add_argument('--seed', type=int, default=0, help='seed of the order samples are stored in')
    parser.add_argument('--splits', nargs='+', default=['train', 'val'], help='sub-folders to convert')
    parser.add_argument('--threads', type=int, default=8, help='threads reading the source files')
    args = parser.parse_args(argv)
    started = time.time()
    index = convert(args.data_path, args.output, args.shard_size, args.seed, args.splits, args.threads)
    counts = ', '.join(f'{split} {info["samples"]:,} images in {len(info["shards"])} shards'
                       for split, info in index['splits'].items())
    print(f'wrote {args.output}: {counts} ({time.time() - started:.0f} s)')


if __name__ == '__main__':
    from utils import run_entry_point
    run_entry_point(main)
