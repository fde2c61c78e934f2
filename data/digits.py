"""scikit-learn's handwritten digits as an ImageFolder: real data that ships inside a package.

1,797 grey 8x8 images of the digits 0-9 are upscaled (bicubic) to RGB PNGs and split once, with a
fixed seed, into 1,400 training and 397 held-out images: ``<root>/train/<digit>/*.png`` and
``<root>/val/<digit>/*.png``. Run ``python -m data.digits --out DIR`` to write it by hand.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import cv2
import numpy as np

NUM_TRAIN = 1400
IMAGE_SIZE = 64
SPLIT_SEED = 0
DEFAULT_ROOT = Path(os.environ.get('FAT_DATA_CACHE', Path.home() / '.cache' / 'fat')) / 'digits'


def _complete(root: Path) -> bool:
    return (root / '.complete').exists()


def materialize_digits(root: Path = DEFAULT_ROOT, image_size: int = IMAGE_SIZE) -> Path:
    """Write the digits ImageFolder under ``root`` unless it is already complete; return ``root``.

    Safe with several processes: each writes into its own temporary folder and the first to finish
    renames it into place.
    """
    root = Path(root)
    if _complete(root):
        return root
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(SPLIT_SEED).permutation(len(digits.target))
    tmp = root.with_name(f'{root.name}.tmp{os.getpid()}')
    for rank, index in enumerate(order):
        split = 'train' if rank < NUM_TRAIN else 'val'
        folder = tmp / split / str(digits.target[index])
        folder.mkdir(parents=True, exist_ok=True)
        grey = (digits.images[index] * (255.0 / 16.0)).astype(np.float32)
        big = cv2.resize(grey, (image_size, image_size), interpolation=cv2.INTER_CUBIC)
        rgb = cv2.cvtColor(np.clip(big, 0, 255).astype(np.uint8), cv2.COLOR_GRAY2BGR)
        cv2.imwrite(str(folder / f'{index:04d}.png'), rgb)
    (tmp / '.complete').touch()
    root.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp.rename(root)
    except OSError:  # another process got there first
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
        if not _complete(root):
            raise
    return root


if __name__ == '__main__':
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out', type=Path, default=DEFAULT_ROOT)
    print(materialize_digits(parser.parse_args().out))
