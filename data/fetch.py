"""Remote shard locations: ``http(s)://`` folders and ``pipe:COMMAND`` (``{}`` stands for the file
name), fetched once into a local cache that the processes and loader workers of a node share.

What comes from the location (its ``index.json`` and the names in it) is data, not commands or
paths: a file name must be one plain path component (:func:`check_file_name`), reaches a shell only
quoted, and the cache never writes through a link someone planted there. A fetched file is kept only
when its size and sha256 are those the index gives, and it is written to a temporary name first
(``utils.write_atomically``), so a killed fetch leaves no file that looks complete.

Fetching survives ordinary failures: an HTTP 5xx, 408 or 429, a reset or refused connection, a
``pipe:`` command that exits non-zero and a file that arrives short or corrupt are tried again
DATA.FETCH_RETRIES times, waiting 1, 2, 4 ... (at most 60) seconds; a fetch that receives nothing for
``STALL_SECONDS`` or takes longer than DATA.FETCH_TIMEOUT in all has failed. A full disk is one line
naming the cache and the space needed.
"""
from __future__ import annotations

import fcntl
import hashlib
import http.client
import logging
import os
import random
import re
import select
import shlex
import shutil
import signal
import stat
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from utils import DataError, is_disk_full, leftover_temporaries, note_progress, write_atomically

logger = logging.getLogger(__name__)

DEFAULT_CACHE = Path(os.environ.get('FAT_DATA_CACHE', Path.home() / '.cache' / 'fat')) / 'shards'
FETCH_THREADS = 8  # files of a remote location fetched at once
STALL_SECONDS = 60  # a fetch that receives nothing for this long has failed (or DATA.FETCH_TIMEOUT if shorter)
MAX_BACKOFF = 60  # seconds between tries at most
REPORT_SECONDS = 10  # a progress line at most this often
_FILE_NAME = re.compile(r'[A-Za-z0-9_][A-Za-z0-9_.+-]{0,254}')
_LOCK = '.lock'


def is_remote(location: str) -> bool:
    return location.startswith(('http://', 'https://', 'pipe:'))


def check_file_name(name, where: str) -> str:
    """``name`` when it is one plain file name (letters, digits and ``_.+-``, not starting with a dot),
    else one error naming ``where`` it came from: a name from an index must not become a path out of
    the folder or text for a shell."""
    if not isinstance(name, str) or not _FILE_NAME.fullmatch(name):
        raise DataError(f'{where}: {name!r} is not a plain file name (letters, digits and _.+- only, one path '
                        'component); the index is refused')
    return name


class TransientFetchError(Exception):
    """A fetch that failed in a way worth trying again."""


def _private_folder(path: Path) -> Path:
    """``path`` made if needed; it must be a real folder, not a link planted in the cache."""
    path.mkdir(parents=True, exist_ok=True)
    if not stat.S_ISDIR(os.lstat(path).st_mode):
        raise DataError(f'{path} is a link, not a folder: the shard cache makes its own folders; remove it')
    return path


def _cached(path: Path, size: Optional[int], sha256: Optional[str] = None) -> bool:
    """Whether ``path`` is a regular file (not a link) of ``size`` bytes (any size when None) and,
    when ``sha256`` is given, that hash."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return False
    if not stat.S_ISREG(info.st_mode) or (size is not None and info.st_size != size):
        return False
    return sha256 is None or hashlib.sha256(path.read_bytes()).hexdigest() == sha256


def _human(size: float) -> str:
    for unit, scale in (('GB', 2 ** 30), ('MB', 2 ** 20)):
        if size >= scale:
            return f'{size / scale:.1f} {unit}'
    return f'{size / 2 ** 10:.1f} KB'


class Fetcher:
    """Local paths of the files of a shard location: the location's own for a local folder, else
    copies fetched once into ``cache_dir/<hash of the location>/`` (the index, fetched afresh every
    run) and ``.../<hash of the index>/`` (the rest: shards converted again get a new folder)."""

    def __init__(self, location: str, cache_dir: str = '', retries: int = 4, timeout: float = 900):
        self.location, self.retries, self.timeout = location, retries, timeout
        if is_remote(location):
            if location.startswith('pipe:') and '{}' not in location:
                raise DataError(f'{location}: a pipe: location needs {{}} where the file name goes, e.g. '
                                '"pipe:aws s3 cp s3://bucket/shards/{} -"')
            root = Path(cache_dir or DEFAULT_CACHE)
            root.mkdir(parents=True, exist_ok=True)
            self.folder = _private_folder(root / hashlib.sha256(location.encode()).hexdigest()[:16])
        else:
            self.folder = Path(location)

    def index(self, name: str) -> Optional[bytes]:
        """The location's index ``name`` (None when a local folder has none); for a remote location,
        fetched afresh and the cache folder of this version of the index chosen."""
        if not is_remote(self.location):
            path = self.folder / name
            return path.read_bytes() if path.exists() else None
        content = self.path(name, refresh=True).read_bytes()
        self.folder = _private_folder(self.folder / hashlib.sha256(content).hexdigest()[:16])
        self.remove_leftovers()
        return content

    def describe(self, name: str) -> str:
        """Where ``name`` comes from, for messages."""
        if self.location.startswith('pipe:'):
            return self.location[len('pipe:'):].replace('{}', shlex.quote(name))
        if is_remote(self.location):
            return self.location.rstrip('/') + '/' + name
        return str(self.folder / name)

    def cached(self, name: str, size: Optional[int] = None) -> bool:
        return _cached(self.folder / name, size)

    def path(self, name: str, refresh: bool = False, size: Optional[int] = None, sha256: Optional[str] = None,
             recheck: bool = False) -> Path:
        """The local path of ``name``, fetched first when remote and not cached whole (again with
        ``refresh``, or when ``recheck`` finds the cached copy's sha256 changed: for small files read
        whole anyway). Every process of the node fetching it waits for the one that does."""
        path = self.folder / name
        if not is_remote(self.location) or (not refresh and _cached(path, size, sha256 if recheck else None)):
            return path
        lock_path = self.folder / f'{name}{_LOCK}'
        try:
            lock = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
        except OSError as error:
            raise DataError(f'cannot lock {lock_path} in the shard cache: {error.strerror}') from error
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one fetch per node; the others wait and find the file
            if not refresh and _cached(path, size, sha256 if recheck else None):
                return path
            for leftover, _ in self._leftovers(name):  # of a fetch that was killed
                os.remove(leftover)
            self._fetch_with_retries(name, path, size, sha256)
        finally:
            os.close(lock)
        return path

    def _leftovers(self, name: Optional[str] = None) -> List[Tuple[str, str]]:
        return [(tmp, target) for tmp, target in leftover_temporaries(str(self.folder))
                if name is None or os.path.basename(target) == name]

    def remove_leftovers(self) -> None:
        """Remove the temporary files of killed fetches in the cache folder: those of files nobody
        is fetching now (whose lock can be taken)."""
        for tmp, target in self._leftovers():
            try:
                lock = os.open(f'{target}{_LOCK}', os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
            except OSError:
                continue
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                if os.path.lexists(tmp):
                    os.remove(tmp)
            except BlockingIOError:
                pass  # being fetched right now
            finally:
                os.close(lock)

    def _fetch_with_retries(self, name: str, path: Path, size: Optional[int], sha256: Optional[str]) -> None:
        source = self.describe(name)

        def check(written: str) -> None:
            got = os.path.getsize(written)
            if size is not None and got != size:
                raise TransientFetchError(f'fetched {got} bytes, the index says {size} (truncated or replaced)')
            if sha256 is not None and digest.hexdigest() != sha256:
                raise TransientFetchError('its sha256 differs from the index\'s (corrupt or replaced)')

        for attempt in range(self.retries + 1):
            digest = hashlib.sha256()
            try:
                write_atomically(str(path), lambda out: self._copy(name, out, digest), check)
                return
            except TransientFetchError as error:
                if attempt == self.retries:
                    tries = f'{attempt + 1} {"try" if attempt == 0 else "tries"}, DATA.FETCH_RETRIES {self.retries}'
                    raise DataError(f'cannot fetch {source}: {error} ({tries})') from None
                delay = min(MAX_BACKOFF, 2 ** attempt) * random.uniform(1.0, 1.25)
                logger.warning(f'fetching {source} failed ({error}); trying again in {delay:.0f} s '
                               f'({attempt + 2} of {self.retries + 1})')
                time.sleep(delay)
            except OSError as error:
                if is_disk_full(error):
                    raise DataError(f'the shard cache {self.folder} is full ({error.strerror}) while fetching {name}'
                                    f'{f" ({_human(size)})" if size else ""}: free space there or set DATA.SHARD_CACHE '
                                    'to a larger disk') from error
                raise DataError(f'cannot write {path} in the shard cache: {error.strerror}') from error

    def _copy(self, name: str, out, digest) -> None:
        """Copy ``name`` from the location into the open file ``out``, updating ``digest``; transient
        failures raise :class:`TransientFetchError`, a missing file :class:`DataError`."""
        deadline = time.monotonic() + self.timeout
        stall = min(STALL_SECONDS, self.timeout)
        if self.location.startswith('pipe:'):
            self._copy_from_command(self.describe(name), out, digest, deadline, stall)
        else:
            self._copy_from_url(self.describe(name), out, digest, deadline, stall)

    def _copy_from_url(self, url: str, out, digest, deadline: float, stall: float) -> None:
        try:
            with urllib.request.urlopen(url, timeout=stall) as response:
                while True:
                    chunk = response.read1(1 << 20)
                    if not chunk:
                        return
                    digest.update(chunk)
                    out.write(chunk)
                    if time.monotonic() > deadline:
                        raise TransientFetchError(f'it took longer than DATA.FETCH_TIMEOUT ({self.timeout:g} s)')
        except urllib.error.HTTPError as error:
            if error.code >= 500 or error.code in (408, 429):
                raise TransientFetchError(f'HTTP {error.code} {error.reason}') from None
            raise DataError(f'cannot fetch {url}: HTTP {error.code} {error.reason}') from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as error:  # HTTPException: a cut response
            if is_disk_full(error):
                raise
            reason = getattr(error, 'reason', None) or error
            if isinstance(reason, TimeoutError) or 'timed out' in str(reason):
                reason = f'no data for {stall:g} s'
            raise TransientFetchError(str(reason)) from None

    def _copy_from_command(self, command: str, out, digest, deadline: float, stall: float) -> None:
        with tempfile.TemporaryFile() as stderr:  # a file: a chatty command cannot block on a full pipe
            proc = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, stderr=stderr, start_new_session=True)
            try:
                fd = proc.stdout.fileno()
                readable = select.poll()  # not select.select: a worker may hold more than 1024 descriptors
                readable.register(fd, select.POLLIN)
                while True:
                    wait = min(stall, deadline - time.monotonic())
                    if wait <= 0 or not readable.poll(wait * 1000):
                        raise TransientFetchError(f'the command sent no data for {stall:g} s' if wait > 0 else
                                                  f'it took longer than DATA.FETCH_TIMEOUT ({self.timeout:g} s)')
                    chunk = os.read(fd, 1 << 20)
                    if not chunk:
                        break
                    digest.update(chunk)
                    out.write(chunk)
                status = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise TransientFetchError('the command did not exit after sending its data') from None
            finally:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)  # the command and whatever it started
                    proc.wait()
                proc.stdout.close()
            if status != 0:
                stderr.seek(0)
                lines = stderr.read().decode(errors='replace').strip().splitlines()
                raise TransientFetchError(f'the command exited with status {status}: '
                                          f'{lines[-1] if lines else "no message"}')

    def prefetch(self, files: Sequence[Tuple[str, int, Optional[str]]], what: str) -> None:
        """Fetch every (name, size, sha256) of ``files`` not cached yet, ``FETCH_THREADS`` at a time,
        after checking that the cache's disk has room for them, with a progress line every
        ``REPORT_SECONDS``."""
        if not is_remote(self.location):
            return
        missing = [entry for entry in files if not _cached(self.folder / entry[0], entry[1])]
        if not missing:
            return
        needed = sum(size for _, size, _ in missing)
        free = shutil.disk_usage(self.folder).free
        if needed > free:
            raise DataError(f'the shard cache {self.folder} needs {_human(needed)} more for {what} ({_human(free)} '
                            'free there): free space or set DATA.SHARD_CACHE to a larger disk')
        logger.info(f'fetching {len(missing)} file(s) of {what}, {_human(needed)}, from {self.location} into '
                    f'{self.folder}')
        started, done = time.monotonic(), [0, 0]
        report = [started]

        def fetch(entry: Tuple[str, int, Optional[str]]) -> None:
            name, size, sha256 = entry
            self.path(name, size=size, sha256=sha256)
            done[0], done[1] = done[0] + 1, done[1] + size
            now = time.monotonic()
            if now - report[0] >= REPORT_SECONDS or done[0] == len(missing):
                report[0] = now
                rate = done[1] / max(now - started, 1e-6)
                line = (f'{what}: {done[0]}/{len(missing)} files, {_human(done[1])} of {_human(needed)}, '
                        f'{rate / 2 ** 20:.1f} MB/s, about {int((needed - done[1]) / max(rate, 1))} s left')
                note_progress(line)
                logger.info(line)

        with ThreadPoolExecutor(FETCH_THREADS) as pool:
            pending = [pool.submit(fetch, entry) for entry in missing]
            for future in as_completed(pending):  # the first failure stops the rest (in order, the last file's
                if future.exception() is not None:  # failure would wait for all before it)
                    for other in pending:
                        other.cancel()
                    raise future.exception()
        note_progress('')

