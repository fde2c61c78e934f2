"""The shards' format: file names, and ``index.json``, checked whole when read (it is data from
elsewhere)."""
from __future__ import annotations

import json
import os
import re
from typing import List

from utils import DataError

from ..fetch import check_file_name, is_remote

INDEX = 'index.json'
FORMAT = 'fat-shards'
VERSION = 2  # 2: each shard's entry also gives its .idx file's size and sha256
STATE = '.conversion.json'  # the parameters of a conversion in progress (removed when it completes)
DEFAULT_SHARD_MB = 256
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
