"""FAT as a dense-prediction backbone: the backbone, torchvision detection, smp segmentation, and
their shared entry point, on a tiny generated set of digit canvases (CPU)."""
import functools
import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import time
from argparse import Namespace

import cv2
import numpy as np
import pytest
import segmentation_models_pytorch as smp
import timm
import torch
from pycocotools.coco import COCO
from sklearn.metrics import confusion_matrix as sk_confusion_matrix

from config import parse_command_line, update_config
from data.digit_canvases import materialize_digit_canvases
from detection.evaluate import evaluate_coco
from detection.train import CHOICES as DET_CHOICES, DetectionTask, defaults as det_defaults
import engine
import models
from models import FATBackbone
from segmentation.data import (IGNORE_INDEX, SegmentationFolder, confusion_matrix, pad_to_multiple,
                               segmentation_metrics)
from segmentation.train import CHOICES as SEG_CHOICES, SegmentationTask, defaults as seg_defaults
from helpers import ROOT
from utils import CheckpointError, DataError

TESTDATA = ROOT.parent / 'shared' / 'testdata' / 'official-fat'
TINY_FAT = ['MODEL.FAT.EMBED_DIMS', '[8, 16, 32, 32]', 'MODEL.FAT.DEPTHS', '[1, 1, 1, 1]',
            'MODEL.FAT.NUM_HEADS', '[1, 2, 2, 2]']


@pytest.fixture(scope='module')
def canvases(tmp_path_factory):
    return materialize_digit_canvases(tmp_path_factory.mktemp('data') / 'canvases', counts={'train': 12, 'val': 6})


def dense_config(defaults, choices, cfg: str, *opts: str):
    """An entry point's config from its yaml and --opts, as its command line would build it."""
    update_config(defaults, Namespace(cfg=str(ROOT / cfg), opts=list(opts) or None), choices)
    return defaults


def task_of(task_class, config, tmp_path) -> engine.Task:
    """A task in a one-process CPU session, as the engine starts it."""
    return task_class(engine.Session(config, 0, 1, torch.device('cpu'), str(tmp_path), logging.getLogger('test')))


# --- backbone ---------------------------------------------------------------------------------

@pytest.mark.parametrize('size', [(64, 64), (100, 130)])
def test_backbone_returns_four_normalised_maps_at_strides_4_to_32(size):
    backbone = FATBackbone.from_variant('fat_b0').eval()
    maps = backbone(torch.randn(2, 3, *size))
    assert backbone.out_channels == [32, 80, 160, 256] and backbone.strides == [4, 8, 16, 32]
    for m, channels, stride in zip(maps, backbone.out_channels, backbone.strides):
        assert m.shape == (2, channels, -(-size[0] // stride), -(-size[1] // stride))
        # GroupNorm(1, C) at initialisation: zero mean, unit variance per sample
        torch.testing.assert_close(m.mean((1, 2, 3)), torch.zeros(2), atol=1e-4, rtol=0)
        torch.testing.assert_close(m.var((1, 2, 3), unbiased=False), torch.ones(2), atol=1e-2, rtol=0)


def test_backbone_maps_are_the_spec_taps_with_their_own_groupnorm():
    classifier = timm.create_model('fat_b0').eval()
    backbone = FATBackbone.from_variant('fat_b0').eval()
    backbone.body.load_state_dict({k: v for k, v in classifier.state_dict().items() if k in backbone.body.state_dict()})
    with torch.no_grad():
        torch.nn.init.normal_(backbone.norms[2].weight)
        x = torch.randn(1, 3, 96, 96)
        taps = classifier.forward_intermediates(x, intermediates_only=True)
        maps = backbone(x)
    for tap, m, norm in zip(taps, maps, backbone.norms):
        torch.testing.assert_close(m, norm(tap))


def test_backbone_loads_a_classification_checkpoint_without_its_head(tmp_path):
    classifier = timm.create_model('fat_b0', num_classes=7)
    path = tmp_path / 'ckpt.pth'
    torch.save({'model': classifier.state_dict(), 'epoch': 3}, path)
    backbone = FATBackbone.from_variant('fat_b0', out_indices=(1, 2, 3))
    backbone.load_pretrained(str(path))
    for name, value in backbone.body.state_dict().items():
        torch.testing.assert_close(value, classifier.state_dict()[name])
    with pytest.raises(CheckpointError, match='does not fit this backbone'):
        FATBackbone.from_variant('fat_b1').load_pretrained(str(path))


def test_backbone_loads_the_authors_checkpoint_layout(tmp_path):
    path = TESTDATA / 'fat_b0_vector.pth'
    if not path.exists():
        pytest.skip(f'test vectors not found at {path}')
    vector = torch.load(path, weights_only=True)
    torch.save({'model': vector['state_dict']}, tmp_path / 'official.pth')
    reference = models.FAT(**vector['config']).eval()
    reference.load_state_dict(models.checkpoint_filter_fn(vector['state_dict']))
    backbone = FATBackbone(**{k: v for k, v in vector['config'].items() if k != 'num_classes'}).eval()
    backbone.load_pretrained(str(tmp_path / 'official.pth'))
    with torch.no_grad():
        taps = reference.forward_intermediates(vector['input'], intermediates_only=True)
        for tap, m, norm in zip(taps, backbone(vector['input']), backbone.norms):
            torch.testing.assert_close(m, norm(tap))


def test_frozen_stages_get_no_gradient_and_keep_batchnorm_statistics():
    backbone = FATBackbone.from_variant('fat_b0', frozen_stages=2).train()
    frozen = [backbone.body.stem, backbone.body.stages[0], backbone.body.stages[1]]
    assert all(not p.requires_grad for m in frozen for p in m.parameters())
    assert all(p.requires_grad for p in backbone.body.stages[2].parameters())
    assert all(not m.training for f in frozen for m in f.modules())
    before = backbone.body.stem.conv1.bn.running_mean.clone()
    sum(m.sum() for m in backbone(torch.randn(2, 3, 64, 64))).backward()
    torch.testing.assert_close(backbone.body.stem.conv1.bn.running_mean, before)
    assert backbone.body.stages[2].blocks[0].attn.local.weight.grad is not None


def test_freeze_bn_replaces_every_batchnorm():
    backbone = FATBackbone.from_variant('fat_b0', freeze_bn=True)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in backbone.modules())
    frozen = [m for m in backbone.modules() if type(m).__name__ == 'FrozenBatchNorm2d']
    assert frozen and not any(p.requires_grad for m in frozen for p in m.parameters())


# --- segmentation ------------------------------------------------------------------------------

def test_smp_timm_universal_encoder_accepts_fat():
    model = smp.FPN('tu-fat_b0', encoder_weights=None, classes=5).eval()
    assert model.encoder.out_channels == [3, 0, 32, 80, 160, 256]
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 96)).shape == (1, 5, 64, 96)


@pytest.mark.parametrize('arch', ['fpn', 'upernet'])
def test_segmenter_uses_the_backbone_and_predicts_at_input_size(arch, tmp_path):
    config = dense_config(seg_defaults(), SEG_CHOICES, 'segmentation/configs/digits_fpn_fat_b0.yaml', 'SEG.ARCH', arch)
    model = task_of(SegmentationTask, config, tmp_path).build_model().eval()
    assert isinstance(model.encoder.model, FATBackbone)
    images = torch.randn(2, 3, 100, 70)
    with torch.no_grad():
        out = model(pad_to_multiple(images))
    assert out.shape == (2, 11, 128, 96)


def test_mean_iou_matches_sklearn():
    rng = np.random.default_rng(0)
    target = rng.integers(0, 5, size=(4, 16, 16))
    prediction = np.where(rng.random(target.shape) < 0.7, target, rng.integers(0, 5, size=target.shape))
    target[0, :4] = IGNORE_INDEX
    counts = confusion_matrix(torch.from_numpy(prediction), torch.from_numpy(target), 5)
    valid = target != IGNORE_INDEX
    reference = sk_confusion_matrix(target[valid], prediction[valid], labels=range(5))
    np.testing.assert_array_equal(counts.numpy(), reference)
    iou = np.diag(reference) / (reference.sum(0) + reference.sum(1) - np.diag(reference))
    assert segmentation_metrics(counts)['mIoU'] == pytest.approx(iou.mean())
    assert segmentation_metrics(counts)['aAcc'] == pytest.approx((prediction[valid] == target[valid]).mean())


def test_segmentation_folder_reduces_zero_label_and_names_bad_masks(tmp_path, canvases):
    config = dense_config(seg_defaults(), SEG_CHOICES, 'segmentation/configs/ade20k_fpn_fat_b0.yaml',
                          'DATA.BASE_SIZE', '0')
    dataset = SegmentationFolder(str(canvases / 'images' / 'val'), str(canvases / 'masks' / 'val'), config, train=False)
    image, mask = dataset[0]
    raw = torch.from_numpy(cv2.imread(str(canvases / 'masks' / 'val' / '000001.png'), 0)).long()
    assert image.shape == (3, 128, 128)
    torch.testing.assert_close(mask, torch.where(raw == 0, IGNORE_INDEX, raw - 1))
    os.makedirs(tmp_path / 'img')
    os.makedirs(tmp_path / 'ann')
    (tmp_path / 'img' / 'a.png').write_bytes((canvases / 'images' / 'val' / '000001.png').read_bytes())
    with pytest.raises(DataError, match='have no mask'):
        SegmentationFolder(str(tmp_path / 'img'), str(tmp_path / 'ann'), config, train=True)


# --- detection ---------------------------------------------------------------------------------

@pytest.mark.parametrize('arch', ['retinanet', 'maskrcnn'])
def test_one_detection_training_step_lowers_nothing_to_nan_and_moves_the_weights(arch, canvases, tmp_path):
    config = dense_config(det_defaults(), DET_CHOICES, 'detection/configs/digits_retinanet_fat_b0.yaml',
                          'DET.ARCH', arch, 'DATA.DATA_PATH', str(canvases), 'DATA.NUM_WORKERS', '0',
                          'DATA.BATCH_SIZE', '2', 'DET.MIN_SIZE', '64', 'DET.MAX_SIZE', '64', *TINY_FAT)
    task = task_of(DetectionTask, config, tmp_path)
    loader_train = task.build_data().train
    loader_train.set_epoch(0)
    model = task.build_model().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss, parts = task.loss(model, next(iter(loader_train)))
    expected = {'classification', 'bbox_regression'} if arch == 'retinanet' else \
        {'loss_classifier', 'loss_box_reg', 'loss_mask', 'loss_objectness', 'loss_rpn_box_reg'}
    assert set(parts) == expected and torch.isfinite(loss)
    loss.backward()
    optimizer.step()
    moved = [k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.equal(v, before[k])]
    assert any(k.startswith('backbone.backbone.body.stages') for k in moved)
    assert any('head' in k for k in moved)


@pytest.mark.parametrize('entry, cfg, flags', [
    ('detection', 'detection/configs/digits_retinanet_fat_b0.yaml', ['--channels-last']),
    ('segmentation', 'segmentation/configs/digits_fpn_fat_b0.yaml', ['--compile', '--channels-last']),
])
def test_dense_tasks_train_compiled_and_channels_last_through_the_engine(entry, cfg, flags, canvases, tmp_path,
                                                                          monkeypatch):
    """--compile and --channels-last are the engine's, so every task's command line has them and the
    engine applies them: the model it trains is compiled (dynamo traces the segmenter's step; here
    with the eager backend, as inductor takes minutes on CPU) and in channels_last, and a training
    epoch ends with finite metrics. (The detector's step, whose box counts change every batch, took
    90 s to trace here; it trained compiled with inductor by hand, benchmarks/README.md.)"""
    compiled = []
    compile_eagerly = functools.partial(torch.compile, backend='eager')
    monkeypatch.setattr(torch, 'compile', lambda model, **kw: compiled.append(model) or compile_eagerly(model, **kw))
    defaults, choices, task_class = ((det_defaults(), DET_CHOICES, DetectionTask) if entry == 'detection' else
                                     (seg_defaults(), SEG_CHOICES, SegmentationTask))
    size = ['DET.MIN_SIZE', '64', 'DET.MAX_SIZE', '64'] if entry == 'detection' else ['DATA.CROP_SIZE', '64',
                                                                                        'DATA.BASE_SIZE', '64']
    config = parse_command_line('test', defaults, choices, argv=[
        '--cfg', str(ROOT / cfg), *flags, '--output', str(tmp_path), '--opts', 'DATA.DATA_PATH', str(canvases),
        'DATA.NUM_WORKERS', '0', 'DATA.BATCH_SIZE', '4', 'TRAIN.EPOCHS', '1', 'TRAIN.WARMUP_STEPS', '1',
        *TINY_FAT, *size])
    assert config.COMPILE == ('--compile' in flags) and config.CHANNELS_LAST
    placed = []

    class Recording(task_class):
        def on_device(self, model):
            placed.append(model)
            super().on_device(model)
    metrics = engine.train_or_evaluate(task_of(Recording, config, tmp_path))
    assert all(math.isfinite(value) for value in metrics.values()), metrics
    assert [model for model in compiled] == placed[:len(compiled)] and len(compiled) == ('--compile' in flags)
    weights = [p for p in placed[0].parameters() if p.dim() == 4 and p.shape[-1] > 1]
    assert weights and all(p.is_contiguous(memory_format=torch.channels_last) for p in weights)


class _Oracle(torch.nn.Module):
    """Returns the annotated boxes (optionally shifted) and, with ``masks``, the annotated instance
    masks as detections: AP must be 1 unshifted."""

    def __init__(self, coco: COCO, shift: float, masks: bool = False):
        super().__init__()
        self.coco, self.shift, self.masks = coco, shift, masks
        self.order = iter(sorted(coco.imgs))

    def forward(self, images):
        outputs = []
        for _ in images:
            anns = self.coco.imgToAnns[next(self.order)]
            boxes = torch.tensor([a['bbox'] for a in anns], dtype=torch.float32).reshape(-1, 4)
            boxes[:, 2:] += boxes[:, :2]
            outputs.append({'boxes': boxes + self.shift, 'labels': torch.tensor([a['category_id'] for a in anns]),
                            'scores': torch.ones(len(anns))})
            if self.masks:
                outputs[-1]['masks'] = torch.stack([torch.from_numpy(self.coco.annToMask(a)).float()[None]
                                                    for a in anns])
        return outputs


def test_coco_evaluation_scores_perfect_and_shifted_boxes_and_masks(canvases, tmp_path):
    config = dense_config(det_defaults(), DET_CHOICES, 'detection/configs/digits_retinanet_fat_b0.yaml',
                          'DATA.DATA_PATH', str(canvases), 'DATA.NUM_WORKERS', '0')
    task = task_of(DetectionTask, config, tmp_path)
    loader_val = task.build_data().val
    coco = task.coco_val
    perfect = evaluate_coco(_Oracle(coco, 0.0), loader_val, coco, torch.device('cpu'))
    assert perfect['bbox_AP'] == pytest.approx(1.0) and perfect['bbox_AP50'] == pytest.approx(1.0)
    assert 'segm_AP' not in perfect
    shifted = evaluate_coco(_Oracle(coco, 6.0), loader_val, coco, torch.device('cpu'))
    assert shifted['bbox_AP'] < 0.6
    with_masks = evaluate_coco(_Oracle(coco, 0.0, masks=True), loader_val, coco, torch.device('cpu'))
    assert with_masks['segm_AP'] == pytest.approx(1.0) and with_masks['bbox_AP'] == pytest.approx(1.0)


# --- the entry points, end to end ---------------------------------------------------------------

def _run(module: str, cfg: str, *args: str, threads: int = 2) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    return subprocess.run([sys.executable, '-m', module, '--cfg', cfg, '--device', 'cpu', *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize('module, cfg, metric, size_opts', [
    ('detection.train', 'detection/configs/digits_retinanet_fat_b0.yaml', 'bbox_AP50',
     ['DET.MIN_SIZE', '64', 'DET.MAX_SIZE', '64']),
    ('segmentation.train', 'segmentation/configs/digits_fpn_fat_b0.yaml', 'mIoU',
     ['DATA.CROP_SIZE', '64', 'DATA.BASE_SIZE', '64']),
])
def test_entry_point_trains_checkpoints_resumes_and_evaluates(tmp_path, canvases, module, cfg, metric, size_opts):
    opts = ['--output', str(tmp_path), '--opts', 'DATA.DATA_PATH', str(canvases), 'DATA.BATCH_SIZE', '4',
            'DATA.NUM_WORKERS', '0', 'TRAIN.WARMUP_STEPS', '1', *TINY_FAT, *size_opts]
    first = _run(module, cfg, *opts, 'TRAIN.EPOCHS', '1')
    assert first.returncode == 0, first.stderr[-3000:]
    run_dir = next(p.parent for p in tmp_path.rglob('ckpt_last.pth'))
    checkpoint = torch.load(run_dir / 'ckpt_last.pth', weights_only=True)
    assert checkpoint['epoch'] == 0 and metric in checkpoint['metrics']
    second = _run(module, cfg, *opts, 'TRAIN.EPOCHS', '2')
    assert second.returncode == 0, second.stderr[-3000:]
    log = (run_dir / 'log.txt').read_text()
    assert 'resumed from' in log
    # the engine's Task.on_device hook: the backbone's kernels chosen once, for training and inference
    assert re.search(r'depthwise convs \(MODEL.DWCONV_IMPL auto\) on cpu: ours in \d+ of \d+ for training', log)
    assert torch.load(run_dir / 'ckpt_last.pth', weights_only=True)['epoch'] == 1
    evaluated = _run(module, cfg, *opts, '--eval', '--resume', str(run_dir / 'ckpt_last.pth'))
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    saved = torch.load(run_dir / 'ckpt_last.pth', weights_only=True)['metrics'][metric]
    assert f'{metric} {saved:.4f}' in evaluated.stdout


def test_entry_point_reports_bad_input_in_one_line(tmp_path):
    bad_arch = _run('detection.train', 'detection/configs/digits_retinanet_fat_b0.yaml', '--output', str(tmp_path),
                    '--opts', 'DET.ARCH', 'yolo')
    assert bad_arch.returncode == 2 and "DET.ARCH is 'yolo'" in bad_arch.stderr
    missing = _run('segmentation.train', 'segmentation/configs/ade20k_fpn_fat_b0.yaml', '--output', str(tmp_path),
                   '--data-path', str(tmp_path / 'nowhere'))
    assert missing.returncode == 2 and 'segmentation folder not found' in missing.stderr
    assert 'Traceback' not in missing.stderr


@pytest.mark.parametrize('content', ['not an image', 'decompression bomb'])
def test_a_detection_image_that_cannot_be_read_is_named(canvases, tmp_path, content, bomb_png):
    # Mutation caught: torchvision's own image loading (PIL's traceback, the file unnamed).
    import shutil
    from utils import SampleError
    copy = tmp_path / 'canvases'
    shutil.copytree(canvases, copy)
    config = dense_config(det_defaults(), DET_CHOICES, 'detection/configs/digits_retinanet_fat_b0.yaml',
                          'DATA.DATA_PATH', str(copy), 'DATA.NUM_WORKERS', '0')
    dataset = task_of(DetectionTask, config, tmp_path).build_data().val.dataset
    path = copy / config.DATA.VAL_IMAGES / dataset.coco.loadImgs(dataset.ids[0])[0]['file_name']
    path.write_bytes(b'not a png' if content == 'not an image' else bomb_png)
    with pytest.raises(SampleError, match=f'cannot read image {path}: '):
        dataset[0]


def test_digit_canvases_are_valid_coco_with_masks_matching_the_semantic_maps(canvases):
    with open(canvases / 'annotations' / 'instances_val.json') as f:
        data = json.load(f)
    assert len(data['images']) == 6 and {c['id'] for c in data['categories']} == set(range(1, 11))
    coco = COCO(str(canvases / 'annotations' / 'instances_val.json'))
    for image_id in coco.imgs:
        semantic = cv2.imread(str(canvases / 'masks' / 'val' / coco.imgs[image_id]['file_name']), 0)
        union = np.zeros_like(semantic)
        for ann in coco.imgToAnns[image_id]:
            mask = coco.annToMask(ann)
            assert (semantic[mask > 0] == ann['category_id']).all()
            x, y, w, h = ann['bbox']
            ys, xs = np.nonzero(mask)
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x, y, x + w, y + h)
            union |= mask
        assert ((semantic > 0) == (union > 0)).all()


def test_sigterm_saves_mid_epoch_and_the_same_command_continues_bitwise(tmp_path, canvases):
    """Dense tasks run on the same engine: EMA, accumulation and per-sample-seeded exact resume too."""
    cfg = 'segmentation/configs/digits_fpn_fat_b0.yaml'
    opts = ['--opts', 'DATA.DATA_PATH', str(canvases), 'DATA.BATCH_SIZE', '1', 'DATA.NUM_WORKERS', '0',
            'DATA.CROP_SIZE', '64', 'DATA.BASE_SIZE', '64', 'PRINT_FREQ', '1', 'TRAIN.EPOCHS', '2',
            'TRAIN.ACCUMULATION_STEPS', '2', 'MODEL.EMA.ENABLE', 'True', 'MODEL.DROP_PATH_RATE', '0.1', *TINY_FAT]
    reference = _run('segmentation.train', cfg, '--output', str(tmp_path / 'reference'), *opts, threads=1)
    assert reference.returncode == 0, reference.stderr[-3000:]
    args = ['--output', str(tmp_path / 'run'), *opts]
    log = tmp_path / 'run' / 'fpn_fat_b0_digits' / 'default' / 'log.txt'
    proc = subprocess.Popen([sys.executable, '-m', 'segmentation.train', '--cfg', cfg, '--device', 'cpu', *args],
                            cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS='1'), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (log.exists() and 'Train: [0/2][2/12]' in log.read_text()):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert 'stopped by SIGTERM at epoch 0 step' in stderr and 'Run the same command again' in stderr
    saved = torch.load(log.parent / 'ckpt_last.pth', weights_only=True)
    assert saved['epoch'] == 0 and 0 < saved['step'] < 12 and saved['step'] % 2 == 0

    again = _run('segmentation.train', cfg, *args, threads=1)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"(epoch 0, {saved['step']} steps done" in again.stdout
    assert f"Train: [0/2][{saved['step']}/12]" in again.stdout and 'Train: [0/2][0/12]' not in again.stdout
    assert again.stdout.count('Train: [0/2]') == 12 - saved['step']  # only the batches not yet trained on
    final = torch.load(log.parent / 'ckpt_last.pth', weights_only=True)
    expected = torch.load(tmp_path / 'reference' / 'fpn_fat_b0_digits' / 'default' / 'ckpt_last.pth',
                          weights_only=True)
    for part in ('model', 'ema'):
        for key, value in expected[part].items():
            assert torch.equal(final[part][key], value), f'{part} {key}'
