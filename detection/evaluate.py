"""COCO box (and mask) AP with pycocotools, over all processes' detections."""
from __future__ import annotations

import contextlib
import io
from typing import Dict, List

import numpy as np
import torch
import torch.nn as nn
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from utils import gather_objects

STAT_NAMES = ('AP', 'AP50', 'AP75', 'APs', 'APm', 'APl')


def _to_coco_results(image_id: int, output: Dict[str, torch.Tensor]) -> List[dict]:
    boxes = output['boxes'].float().cpu()
    boxes[:, 2:] -= boxes[:, :2]  # xyxy -> xywh
    results = [{'image_id': image_id, 'category_id': int(label), 'bbox': [round(v, 2) for v in box.tolist()],
                'score': float(score)}
               for box, label, score in zip(boxes, output['labels'].tolist(), output['scores'].tolist())]
    if 'masks' in output:
        masks = (output['masks'][:, 0] > 0.5).cpu().numpy().astype(np.uint8)
        for result, mask in zip(results, masks):
            rle = mask_utils.encode(np.asfortranarray(mask))
            rle['counts'] = rle['counts'].decode('ascii')
            result['segmentation'] = rle
    return results


def coco_stats(coco: COCO, results: List[dict], iou_type: str) -> Dict[str, float]:
    """COCOeval's six area/IoU summary numbers for ``iou_type`` ('bbox' or 'segm'), as fractions."""
    if not results:
        return {f'{iou_type}_{name}': 0.0 for name in STAT_NAMES}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints tables; we log our own line
        evaluator = COCOeval(coco, coco.loadRes(results), iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {f'{iou_type}_{name}': float(max(value, 0.0)) for name, value in zip(STAT_NAMES, evaluator.stats)}


def evaluate_coco(model: nn.Module, loader, coco: COCO, device: torch.device) -> Dict[str, float]:
    """Detect on this process's shard, gather every process's detections, score them with COCOeval
    (box AP, and mask AP when the model predicts masks); the same numbers on every process."""
    results: List[dict] = []
    has_masks = False
    for images, targets in loader:
        outputs = model([image.to(device, non_blocking=True) for image in images])
        for target, output in zip(targets, outputs):
            has_masks |= 'masks' in output
            results.extend(_to_coco_results(int(target['image_id']), output))
    gathered = gather_objects((results, has_masks))
    results = [r for part, _ in gathered for r in part]
    has_masks = any(flag for _, flag in gathered)
    metrics = coco_stats(coco, results, 'bbox')
    if has_masks:
        metrics.update(coco_stats(coco, results, 'segm'))
    return metrics
