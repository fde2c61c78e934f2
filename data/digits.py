"""scikit-learn's handwritten digits as an ImageFolder: real data that ships inside a package.

1,797 grey 8x8 images of the digits 0-9 are upscaled (bicubic) to RGB PNGs and split once, with a
fixed seed, into 1,400 training and 397 held-out images: ``<root>/train/<digit>/*.png`` and
``<root>/val/<digit>/*.png``. Run ``python -m data.digits --out DIR`` to write it by hand.
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

NUM_TRAIN = 1400
IMAGE_SIZE = 64
SPLIT_SEED = 0
DEFAULT_ROOT = Path(os.environ.get('FAT_DATA_CACHE', Path.home() / '.cache' / 'fat')) / 'digits'


def materialize(root: Path, write: Callable[[Path], None]) -> Path:
    """Make the data set folder ``root`` once: unless it is already complete, ``write`` fills a
    temporary folder beside it, which is marked complete and renamed into place. Safe with several
    processes: each writes its own temporary folder and the first to finish wins. Returns ``root``."""
    root = Path(root)
    if (root / '.complete').exists():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=f'{root.name}.making-'))  # unique across containers too
    tmp.chmod(0o755)  # as a plain mkdir would make it
    write(tmp)
    (tmp / '.complete').touch()
    try:
        tmp.rename(root)
    except OSError:  # another process got there first
        shutil.rmtree(tmp, ignore_errors=True)
        if not (root / '.complete').exists():
            raise
    return root


def split_digits():
    """scikit-learn's digits and the fixed split of their indices: {'train': 1,400, 'val': 397}."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(SPLIT_SEED).permutation(len(digits.target))
    return digits, {'train': order[:NUM_TRAIN], 'val': order[NUM_TRAIN:]}


def materialize_digits(root: Path = DEFAULT_ROOT, image_size: int = IMAGE_SIZE) -> Path:
    """Write the digits ImageFolder under ``root`` unless it is already complete; return ``root``
    (safe with several processes, see ``materialize``)."""

    def write(tmp: Path) -> None:
        digits, splits = split_digits()
        for split, indices in splits.items():
            for index in indices:
                folder = tmp / split / str(digits.target[index])
                folder.mkdir(parents=True, exist_ok=True)
                grey = (digits.images[index] * (255.0 / 16.0)).astype(np.float32)
                big = cv2.resize(grey, (image_size, image_size), interpolation=cv2.INTER_CUBIC)
                rgb = cv2.cvtColor(np.clip(big, 0, 255).astype(np.uint8), cv2.COLOR_GRAY2BGR)
                cv2.imwrite(str(folder / f'{index:04d}.png'), rgb)

    return materialize(root, write)


if __name__ == '__main__':
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out', type=Path, default=DEFAULT_ROOT)
    print(materialize_digits(parser.parse_args().out))
