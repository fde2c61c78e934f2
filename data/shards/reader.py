"""Reading shards map-style: ``ShardSet`` (a location's shards, fetched into the cache and checked)
and ``ShardDataset`` (sample i of the shards is sample i of the folder)."""
from __future__ import annotations

import io
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from utils import DataError, SampleError

from ..fetch import FETCH_THREADS, Fetcher, is_remote
from .index import INDEX, STATE, index_name, parse_index

logger = logging.getLogger(__name__)


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
