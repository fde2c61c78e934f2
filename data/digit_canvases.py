"""Digit canvases: a small detection / instance / semantic segmentation set made from real images.

scikit-learn's handwritten digits (the same fixed train / held-out split as ``data.digits``) are
scaled to 22-44 px and pasted, 1 to 4 per image without overlap, in random bright colours onto
noisy dark 128x128 canvases. Written once under ``root``:

    images/{train,val}/*.png                 the canvases
    annotations/instances_{train,val}.json   COCO: boxes, instance masks (RLE), categories "0".."9" (ids 1..10)
    masks/{train,val}/*.png                  semantic masks: 0 background, 1 + digit elsewhere

so the COCO loaders (detection/) and the image/mask-folder loaders (segmentation/) read it exactly as
they read COCO and ADE20K. Run ``python -m data.digit_canvases --out DIR`` to write it by hand.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Dict, List, Tuple

import cv2
import numpy as np
from pycocotools import mask as mask_utils

from utils import DataError

from .digits import DEFAULT_ROOT as DIGITS_ROOT, materialize, split_digits

CANVAS_SIZE = 128
DIGIT_SIZES = (22, 44)  # side of the pasted 8x8 digit, in pixels
DIGITS_PER_CANVAS = (1, 4)
NUM_CANVASES = {'train': 1200, 'val': 200}
DEFAULT_ROOT = DIGITS_ROOT.with_name('digit_canvases')
CATEGORIES = [{'id': digit + 1, 'name': str(digit), 'supercategory': 'digit'} for digit in range(10)]
MASK_THRESHOLD = 0.3  # fraction of full ink above which a pixel belongs to the digit


def _place(rng: np.random.Generator, sizes: List[int]) -> List[Tuple[int, int]]:
    """Top-left corners for squares of ``sizes`` inside the canvas, pairwise disjoint."""
    corners: List[Tuple[int, int, int]] = []
    for size in sizes:
        for _ in range(100):
            x, y = (int(v) for v in rng.integers(0, CANVAS_SIZE - size + 1, size=2))
            if all(x + size <= cx or cx + cs <= x or y + size <= cy or cy + cs <= y for cx, cy, cs in corners):
                corners.append((x, y, size))
                break
    return [(x, y) for x, y, _ in corners]


def _canvas(rng: np.random.Generator, images: np.ndarray, labels: np.ndarray):
    """One canvas: (BGR image, semantic mask, [(digit, instance mask)])."""
    background = rng.uniform(0, 60, size=3)
    image = np.clip(background + rng.normal(0, 12, size=(CANVAS_SIZE, CANVAS_SIZE, 3)), 0, 255)
    semantic = np.zeros((CANVAS_SIZE, CANVAS_SIZE), np.uint8)
    count = int(rng.integers(DIGITS_PER_CANVAS[0], DIGITS_PER_CANVAS[1] + 1))
    sizes = [int(s) for s in rng.integers(DIGIT_SIZES[0], DIGIT_SIZES[1] + 1, size=count)]
    instances = []
    for size, (x, y) in zip(sizes, _place(rng, sizes)):
        index = int(rng.integers(len(labels)))
        ink = cv2.resize(images[index] / 16.0, (size, size), interpolation=cv2.INTER_CUBIC).clip(0, 1)
        colour = rng.uniform(150, 255, size=3)
        patch = image[y:y + size, x:x + size]
        image[y:y + size, x:x + size] = patch * (1 - ink[..., None]) + colour * ink[..., None]
        mask = np.zeros((CANVAS_SIZE, CANVAS_SIZE), np.uint8)
        mask[y:y + size, x:x + size] = ink > MASK_THRESHOLD
        semantic[mask.astype(bool)] = labels[index] + 1
        instances.append((int(labels[index]), mask))
    return image.astype(np.uint8), semantic, instances


def _annotation(ann_id: int, image_id: int, digit: int, mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask))
    x, y, w, h = mask_utils.toBbox(rle).tolist()
    rle['counts'] = rle['counts'].decode('ascii')
    return {'id': ann_id, 'image_id': image_id, 'category_id': digit + 1, 'bbox': [x, y, w, h],
            'area': float(mask_utils.area(rle)), 'iscrowd': 0, 'segmentation': rle}


def _write_split(tmp: Path, split: str, count: int, images: np.ndarray, labels: np.ndarray, seed: int) -> None:
    rng = np.random.default_rng(seed)
    (tmp / 'images' / split).mkdir(parents=True)
    (tmp / 'masks' / split).mkdir(parents=True)
    coco = {'images': [], 'annotations': [], 'categories': CATEGORIES}
    for image_id in range(1, count + 1):
        image, semantic, instances = _canvas(rng, images, labels)
        name = f'{image_id:06d}.png'
        cv2.imwrite(str(tmp / 'images' / split / name), image)
        cv2.imwrite(str(tmp / 'masks' / split / name), semantic)
        coco['images'].append({'id': image_id, 'file_name': name, 'width': CANVAS_SIZE, 'height': CANVAS_SIZE})
        for digit, mask in instances:
            coco['annotations'].append(_annotation(len(coco['annotations']) + 1, image_id, digit, mask))
    with open(tmp / 'annotations' / f'instances_{split}.json', 'w') as f:
        json.dump(coco, f)


def materialize_digit_canvases(root: Path = DEFAULT_ROOT, counts: Dict[str, int] = NUM_CANVASES) -> Path:
    """Write the canvases (``counts``: how many per split) under ``root`` unless they are already
    complete; return ``root`` (safe with several processes, see ``data.digits.materialize``).
    Held-out canvases use only the held-out digits of ``data.digits``' split."""

    def write(tmp: Path) -> None:
        digits, splits = split_digits()
        (tmp / 'annotations').mkdir()
        for seed, (split, indices) in enumerate(splits.items()):
            _write_split(tmp, split, counts[split], digits.images[indices], digits.target[indices], seed)

    return materialize(root, write)


def dense_data_root(config, real_data: str) -> str:
    """DATA.DATA_PATH, or with DATA.DATASET 'digit_canvases' the canvases (written on first use) when
    it is empty; ``real_data`` names what DATA_PATH should point at otherwise."""
    if config.DATA.DATA_PATH:
        return config.DATA.DATA_PATH
    if config.DATA.DATASET == 'digit_canvases':
        return str(materialize_digit_canvases())
    raise DataError(f'DATA.DATA_PATH (--data-path) is empty: point it at {real_data} '
                    'or set DATA.DATASET digit_canvases for the generated digits')


if __name__ == '__main__':
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out', type=Path, default=DEFAULT_ROOT)
    print(materialize_digit_canvases(parser.parse_args().out))
