"""Writing shards: ``convert`` an ImageFolder root (``python -m data.shards``), resumable and
byte-for-byte repeatable."""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import random
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import List, Optional, Sequence

from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

from utils import DataError, leftover_temporaries, write_atomically

from .index import DEFAULT_SHARD_MB, FORMAT, INDEX, STATE, VERSION, check_same_classes, index_name, shard_name

logger = logging.getLogger(__name__)
_BLOCK = 512  # tar block size


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
    parser = argparse.ArgumentParser(prog='python -m data.shards', description='Convert an ImageFolder root (train/ and val/) into WebDataset '
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
