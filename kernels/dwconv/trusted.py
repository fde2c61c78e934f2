"""Where compiled code may be loaded from: only folders and files of this user that nobody else can
write (a shared FAT_KERNELS_BUILD_DIR could otherwise hold anybody's library); and how the files of
that folder are written (whole, or not at all)."""
from __future__ import annotations

import os
import stat
import tempfile
from typing import Callable


def check_private(path: str) -> None:
    """Compiled code is loaded from ``path`` (a folder or library) only when this user owns it and
    nobody else can write to it: a shared or planted folder could hold anybody's library. Raises
    RuntimeError naming the problem (``_load_once`` makes that one warning)."""
    info = os.stat(path)
    if info.st_uid != os.getuid():
        raise RuntimeError(f'{path} belongs to another user (uid {info.st_uid}): code is loaded only from your own '
                           'folder; set FAT_KERNELS_BUILD_DIR to one')
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise RuntimeError(f'{path} can be written by other users (mode {stat.filemode(info.st_mode)}): code is loaded '
                           'only from a folder nobody else can write; chmod go-w it or set FAT_KERNELS_BUILD_DIR')


def private_folder(path: str) -> str:
    """``path`` made if needed (nobody else may write to a new folder, whatever the umask), then checked
    by :func:`check_private`."""
    os.makedirs(path, mode=0o755, exist_ok=True)
    check_private(path)
    return path


def write_replacing(path: str, make: Callable[[str], None]) -> None:
    """``make(temporary path)`` writes a new file beside ``path``, which is then renamed over it: a
    crash, or processes writing at once, never leave a half-written file at ``path``. (The project's
    own files use ``utils.write_atomically``; this package imports nothing from the project.)"""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or '.', prefix=f'.{os.path.basename(path)}-')
    os.close(fd)
    try:
        make(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
