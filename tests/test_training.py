"""Training, evaluation and throughput through main.py, the way users run it (CPU, tiny data)."""
import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Tuple

import pytest
import torch
import yaml

from classification import get_config
from config import scaled_lrs
from helpers import ROOT, TINY_OPTS, make_image_folder, project_env, run_main, train_args
from lr_scheduler import build_scheduler
from models import build_model, checkpoint_filter_fn
from optimizer import build_optimizer
from utils import ConfigError, amp_dtype

TESTDATA = ROOT.parent / 'shared' / 'testdata' / 'official-fat'
@pytest.fixture(scope='module')
def image_folder(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp('data'), classes=3, train_per_class=8, val_per_class=3)


def accuracy(stdout: str) -> float:
    return float(re.findall(r'Accuracy of the network on the \d+ test images: ([\d.]+)%', stdout)[-1])


def loss(stdout: str) -> float:
    return float(re.findall(r'Accuracy of the network .* loss ([\d.]+)\)', stdout)[-1])


@pytest.fixture(scope='module')
def one_run(image_folder, tmp_path_factory) -> Tuple[Path, subprocess.CompletedProcess]:
    """One epoch of TINY_OPTS in one process (SAVE_FREQ 1): its run folder and main.py's output."""
    out = tmp_path_factory.mktemp('one_run')
    proc = run_main(*train_args(image_folder, out, 'SAVE_FREQ', '1'))
    return out / 'fat_b0' / 'default', proc


def test_train_one_process_writes_outputs_then_auto_resumes(image_folder, tmp_path, one_run):
    trained, first = one_run
    run = tmp_path / 'fat_b0' / 'default'
    shutil.copytree(trained, run)  # the same command again, in a copy of the folder
    assert re.search(r'Train: \[0/1\]\[\d+/6\]\s+eta \S+ lr [\d.e+-]+\s+time .*\sloss [\d.]+\s+grad_norm [\d.]+\s+mem \d+MB',
                     first.stdout)
    for name in ('log.txt', 'config.yaml', 'ckpt_last.pth', 'ckpt_best.pth', 'ckpt_epoch_0.pth'):
        assert (run / name).is_file(), name
    assert list(run.glob('events.out.tfevents.*')), 'TensorBoard events'
    saved = yaml.safe_load((run / 'config.yaml').read_text())
    assert saved['MODEL']['FAT']['EMBED_DIMS'] == [8, 16, 16, 16] and saved['DATA']['IMG_SIZE'] == 32
    assert saved['MODEL']['NUM_CLASSES'] == 3, 'the class count follows the data'
    checkpoint = torch.load(run / 'ckpt_last.pth', weights_only=True)
    assert checkpoint['epoch'] == 0 and {'model', 'optimizer', 'scaler'} <= set(checkpoint)

    second = run_main(*train_args(image_folder, tmp_path, 'TRAIN.EPOCHS', '2'))
    assert 'resumed from' in second.stdout and 'ckpt_last.pth (epoch 0' in second.stdout
    assert 'Train: [0/2]' not in second.stdout and 'Train: [1/2]' in second.stdout
    assert torch.load(run / 'ckpt_last.pth', weights_only=True)['epoch'] == 1


def test_train_two_processes_under_torchrun(image_folder, tmp_path):
    opts = ['MODEL.EMA.ENABLE', 'True', 'AMP_CPU', 'True']
    proc = run_main(*train_args(image_folder, tmp_path, *opts), nproc=2)
    assert '2 process(es) on cpu' in proc.stdout and 'autocast bfloat16' in proc.stdout
    # 9 images over 2 processes: the count is the all-reduced one (5 + 4), not a padded 10
    assert proc.stdout.count('Accuracy of the network on the 9 test images') == 2, 'rank 0 logs model and EMA'
    run = tmp_path / 'fat_b0' / 'default'
    assert (run / 'log.txt').read_text().count('LR scaled to the total batch') == 1
    # Each process updated its own BatchNorm statistics; evaluation used rank 0's, which the checkpoint
    # holds, so one process evaluating the checkpoint reproduces the figures of both processes.
    checkpoint = torch.load(run / 'ckpt_last.pth', weights_only=True)
    torch.save({'model': checkpoint['ema']}, tmp_path / 'ema.pth')
    for path, prefix in ((run / 'ckpt_last.pth', 'INFO Accuracy'), (tmp_path / 'ema.pth', 'INFO EMA: Accuracy')):
        evaluated = run_main('--eval', '--resume', path, *train_args(image_folder, tmp_path / 'eval', *opts))
        trained = re.search(prefix + r'.*loss ([\d.]+)\)', proc.stdout).group(1)
        assert loss(evaluated.stdout) == float(trained), path


def test_eval_of_own_checkpoint_reproduces_training_accuracy(image_folder, one_run):
    run, trained = one_run
    output = run.parent.parent  # the run's own folder: evaluating there must not change its config
    evaluated = run_main('--eval', '--resume', run / 'ckpt_last.pth', *train_args(image_folder, output))
    assert accuracy(evaluated.stdout) == accuracy(trained.stdout)
    assert 'top-5' in evaluated.stdout and 'loss' in evaluated.stdout
    # the kernels are chosen once the model is on its device: for training and inference, or inference only
    chosen = re.compile(r'depthwise convs \(MODEL.DWCONV_IMPL auto\) on cpu: ours in (.*?);')
    assert 'for training' in chosen.search(trained.stdout).group(1)
    assert chosen.search(evaluated.stdout).group(1).endswith('for inference') and \
        'for training' not in chosen.search(evaluated.stdout).group(1)
    # a training run keeps its decisions in its folder, so that its resumes run the same kernels anywhere
    assert f'decisions kept in {run / "kernels"}/' in trained.stdout and list((run / 'kernels').glob('*.json'))
    assert f'decisions kept in {run / "kernels"}/' not in evaluated.stdout
    deployed = run_main('--eval', '--reparam', '--resume', run / 'ckpt_last.pth', *train_args(image_folder, output))
    assert 'deploy form' in deployed.stdout
    assert loss(deployed.stdout) == pytest.approx(loss(evaluated.stdout), abs=1e-4)
    assert yaml.safe_load((run / 'config.yaml').read_text())['EVAL_MODE'] is False, 'eval keeps the run config'


def test_eval_accepts_authors_and_bare_checkpoints(tmp_path):
    vector_path = TESTDATA / 'tiny_vector.pth'
    if not vector_path.exists():
        pytest.skip('test vectors not found')
    vector = torch.load(vector_path, weights_only=True)
    authors, bare = tmp_path / 'official.pth', tmp_path / 'bare.pth'
    torch.save({'model': vector['state_dict'], 'epoch': 299}, authors)
    torch.save(vector['state_dict'], bare)
    data = make_image_folder(tmp_path / 'data', classes=10, train_per_class=1, val_per_class=2, size=64)
    ours = tmp_path / 'ours.pth'
    torch.save({'model': checkpoint_filter_fn(vector['state_dict'])}, ours)
    cfg = vector['config']
    losses = []
    for path in (authors, bare, ours):
        proc = run_main('--eval', '--resume', path, '--data-path', data, '--output', tmp_path, '--batch-size', 8,
                        '--opts', 'MODEL.FAT.EMBED_DIMS', str(cfg['embed_dims']), 'MODEL.FAT.DEPTHS',
                        str(cfg['depths']), 'MODEL.FAT.NUM_HEADS', str(cfg['num_heads']), 'DATA.IMG_SIZE', '64',
                        'DATA.NUM_WORKERS', '0', 'TEST.CROP', 'False')
        losses.append(loss(proc.stdout))
    assert losses[0] == losses[1] == losses[2], 'the authors\' layout, wrapped or bare, loads as the same weights'


def seconds_of(timedelta: str) -> int:
    """The seconds of a ``str(datetime.timedelta)`` such as '3:57:36' or '2 days, 19:10:00'."""
    days, hours, minutes, seconds = re.fullmatch(r'(?:(\d+) days?, )?(\d+):(\d\d):(\d\d)', timedelta).groups()
    return ((int(days or 0) * 24 + int(hours)) * 60 + int(minutes)) * 60 + int(seconds)


# Compiling the training step (forward and backward) takes minutes with a cold inductor cache.
@pytest.mark.parametrize('flags', [['--accumulation-steps', '2'],
                                   pytest.param(['--reparam', '--compile', '--channels-last'], marks=pytest.mark.slow)])
def test_throughput_prints_training_and_inference_rates(tmp_path, flags):
    proc = run_main('--throughput', *flags, '--output', tmp_path, '--batch-size', 2, '--opts', *TINY_OPTS,
                    'TRAIN.EPOCHS', '3')
    accumulation = 2 if '--accumulation-steps' in flags else 1
    training = re.search(r'training: batch_size 2 x (\d+) micro-batch\(es\) per optimizer step, image size 32, '
                         r'fp32(, compiled, channels_last)?: (\d+) optimizer steps, (\d+) images in ([\d.]+) s, '
                         r'([\d.]+) img/s \(one process\); peak resident memory \+\d+ MB', proc.stdout)
    assert training, proc.stdout
    accumulated, settings, steps, images, seconds, rate = training.groups()
    assert int(accumulated) == accumulation and bool(settings) == ('--compile' in flags)
    # The images are the micro-batches the trainer completed optimizer steps over: every micro-batch of
    # every timed optimizer step, and the optimizer stepped at least 3 times.
    assert int(steps) >= 3 and int(images) == int(steps) * accumulation * 2
    assert float(rate) == pytest.approx(int(images) / float(seconds), rel=0.01)
    estimate = re.search(r'at ([\d.]+) img/s an ImageNet-1k epoch \(1,281,167 images\) trains in (.+) and '
                         r'TRAIN.EPOCHS 3 in (.+) \(data loading', proc.stdout)
    assert estimate and float(estimate.group(1)) == float(rate)
    epoch, run = seconds_of(estimate.group(2)), seconds_of(estimate.group(3))
    assert epoch == pytest.approx(1_281_167 / float(rate), rel=0.01) and abs(run - 3 * epoch) <= 2

    images, seconds, rate = re.search(r'inference: batch_size 2 image size 32: (\d+) images in ([\d.]+) s, '
                                      r'throughput ([\d.]+) img/s', proc.stdout).groups()
    assert int(images) % 2 == 0 and int(images) >= 20, 'at least 10 timed batches of 2'
    assert float(rate) == pytest.approx(int(images) / float(seconds), rel=0.01)
    assert ('deploy form' in proc.stdout) == ('--reparam' in flags)
    assert re.search(r'[\d,]+ parameters', proc.stdout) and re.search(r'[\d.]+ GMACs', proc.stdout)
    if sys.platform.startswith('linux'):
        assert 'large blocks kept on the heap for reuse' in proc.stdout


MMAPPED_WHILE_HOLDING_64MB = """
import ctypes, torch
import utils

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                'arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost'.split()]

mallinfo2 = ctypes.CDLL(None).mallinfo2
mallinfo2.restype = MallInfo2

def mmapped_mb_while_holding_64mb():
    block = torch.ones(16 << 20)
    return mallinfo2().hblkhd >> 20

before = mmapped_mb_while_holding_64mb()
took = utils.keep_freed_memory()
print(before, took, mmapped_mb_while_holding_64mb())
"""


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc mallopt')
def test_cpu_runs_serve_large_blocks_from_the_heap():
    out = subprocess.run([sys.executable, '-c', MMAPPED_WHILE_HOLDING_64MB], env=project_env(), capture_output=True,
                         text=True, check=True).stdout.split()
    before, took, after = int(out[0]), out[1], int(out[2])
    assert before >= 64, 'glibc should mmap a 64 MB block by default'
    assert took == 'True' and after < 64


# --- configuration, LR scaling, optimizer ------------------------------------------------------

def config_from(*opts, cfg=None):
    return get_config(argparse.Namespace(cfg=cfg, opts=list(opts) or None))


def test_yaml_base_inheritance_and_opts_override():
    config = config_from('TRAIN.EPOCHS', '7', cfg=str(ROOT / 'configs' / 'digits_fat_b0.yaml'))
    assert config.TRAIN.EPOCHS == 7  # --opts wins over the yaml
    assert config.DATA.DATASET == 'digits' and config.DATA.IMG_SIZE == 64  # the file itself
    assert config.TRAIN.WEIGHT_DECAY == 0.05 and config.TRAIN.CLIP_GRAD == 5.0  # from imagenet_base.yaml
    assert config.MODEL.VARIANT == 'fat_b0'  # from fat_b0_224.yaml


@pytest.mark.parametrize('variant,dims,depths,heads,drop_path', [
    ('fat_b0', [32, 80, 160, 256], [2, 2, 6, 2], [2, 5, 10, 16], 0.05),
    ('fat_b1', [48, 96, 192, 384], [2, 2, 6, 2], [3, 6, 12, 24], 0.1),
    ('fat_b2', [64, 128, 256, 512], [2, 2, 6, 2], [2, 4, 8, 16], 0.1),
    ('fat_b3', [64, 128, 256, 512], [4, 4, 16, 4], [2, 4, 8, 16], 0.15),
])
def test_variant_configs_carry_the_paper_recipe(variant, dims, depths, heads, drop_path):
    config = config_from(cfg=str(ROOT / 'configs' / f'{variant}_224.yaml'))
    assert config.MODEL.VARIANT == variant and not any(config.MODEL.FAT.values()), 'the variant table is the source'
    with torch.device('meta'):
        model = build_model(config)
    assert [s.blocks[0].mlp.fc1.in_channels for s in model.stages] == dims
    assert [len(s.blocks) for s in model.stages] == depths
    assert [s.blocks[0].attn.num_heads for s in model.stages] == heads
    assert config.MODEL.DROP_PATH_RATE == drop_path
    assert (config.TRAIN.EPOCHS, config.TRAIN.WARMUP_EPOCHS, config.TRAIN.BASE_LR) == (300, 20, 5e-4)
    assert (config.AUG.MIXUP, config.AUG.CUTMIX, config.AUG.REPROB) == (0.8, 1.0, 0.25)
    assert config.AUG.AUTO_AUGMENT == 'rand-m9-mstd0.5-inc1' and config.DATA.INTERPOLATION == 'bicubic'
    assert config.TEST.CROP_PCT == 0.875 and tuple(config.TRAIN.OPTIMIZER.BETAS) == (0.9, 0.999)


@pytest.mark.parametrize('opts,fragment', [
    (['TRAIN.OPTIMIZER.NAME', 'adam'], "TRAIN.OPTIMIZER.NAME is 'adam'"),
    (['AMP_DTYPE', 'fp32'], "AMP_DTYPE is 'fp32'; choose one of 'bf16', 'fp16'"),
    (['DEVICE', 'gpu'], "DEVICE is 'gpu'"),
    (['MODEL.DWCONV_IMPL', 'triton'], "MODEL.DWCONV_IMPL is 'triton'"),
    (['TRAIN.ACCUMULATION_STEPS', '0'], 'TRAIN.ACCUMULATION_STEPS is 0; it must be at least 1'),
    (['TAG', '../other'], "TAG is '../other'"),
    (['MODEL.NAME', '..'], "MODEL.NAME is '..'"),
    (['TAG', 'run\x1b[2J'], "TAG is 'run\\x1b[2J'; it names a folder inside OUTPUT, so it must be a plain name "
                           "(printable"),
    (['TAG', 'a\nb'], "TAG is 'a\\nb'"),
])
def test_a_value_outside_a_keys_choices_is_named(opts, fragment):
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        config_from(*opts)


def test_python_configs_are_refused_unread(tmp_path):
    marker = tmp_path / 'ran'
    code = tmp_path / 'evil.py'
    code.write_text(f'open({str(marker)!r}, "w").close()\nfrom yacs.config import CfgNode\ncfg = CfgNode()\n')
    including = tmp_path / 'including.yaml'
    including.write_text("BASE: ['evil.py']\n")
    for path in (code, including):
        with pytest.raises(ConfigError, match=r'evil\.py: configs are yaml files'):
            config_from(cfg=str(path))
    assert not marker.exists(), 'yacs would have executed the .py file'


def test_a_whole_number_for_a_float_key_is_taken_as_a_float(tmp_path):
    # Mutation caught: no widening (yacs refused "DIST_TIMEOUT 60" and "BASE_LR: 1" as a type mismatch).
    (tmp_path / 'run.yaml').write_text('TRAIN:\n  BASE_LR: 1\n  EPOCHS: 3\n')
    config = config_from('DIST_TIMEOUT', '60', 'DATA.FETCH_TIMEOUT', '1.5', cfg=str(tmp_path / 'run.yaml'))
    assert (config.TRAIN.BASE_LR, config.DIST_TIMEOUT, config.DATA.FETCH_TIMEOUT) == (1.0, 60.0, 1.5)
    assert all(isinstance(v, float) for v in (config.TRAIN.BASE_LR, config.DIST_TIMEOUT))
    assert config.TRAIN.EPOCHS == 3 and isinstance(config.TRAIN.EPOCHS, int)
    with pytest.raises(ConfigError, match='Type mismatch'):
        config_from('TRAIN.EPOCHS', '2.5')  # a fraction for a whole-number key stays refused


def test_base_files_resolve_against_the_including_file_and_cycles_are_named(tmp_path, monkeypatch):
    (tmp_path / 'recipes' / 'shared').mkdir(parents=True)
    (tmp_path / 'recipes' / 'shared' / 'base.yaml').write_text('TRAIN:\n  EPOCHS: 7\n')
    (tmp_path / 'recipes' / 'run.yaml').write_text("BASE: ['shared/base.yaml']\nSEED: 3\n")
    monkeypatch.chdir(tmp_path)  # not the including file's folder
    config = config_from(cfg='recipes/run.yaml')
    assert (config.TRAIN.EPOCHS, config.SEED) == (7, 3)
    (tmp_path / 'a.yaml').write_text("BASE: ['b.yaml']\n")
    (tmp_path / 'b.yaml').write_text("BASE: ['a.yaml']\n")
    with pytest.raises(ConfigError, match='cycle'):
        config_from(cfg=str(tmp_path / 'a.yaml'))


@pytest.mark.parametrize('base', ['fat_b0_224.yaml', '', '[1, 2]'])
def test_a_base_that_is_not_a_list_of_files_is_one_line(tmp_path, base):
    # Mutation caught: BASE iterated as it is (a string's letters were taken as files; None crashed).
    (tmp_path / 'run.yaml').write_text(f'BASE: {base}\nSEED: 3\n')
    with pytest.raises(ConfigError, match=r"run\.yaml: BASE is .*; it must be a list of yaml files, e\.g\. BASE: "
                                          r"\['base\.yaml'\]"):
        config_from(cfg=str(tmp_path / 'run.yaml'))


def test_reparam_is_refused_for_training():
    with pytest.raises(ConfigError, match=r'REPARAM \(--reparam\).*training run'):
        config_from('REPARAM', 'True')
    assert config_from('REPARAM', 'True', 'EVAL_MODE', 'True').REPARAM


@pytest.mark.parametrize('device,opts,dtype', [
    ('cuda', [], torch.bfloat16),
    ('cuda', ['AMP_DTYPE', 'fp16'], torch.float16),
    ('cuda', ['AMP_ENABLE', 'False'], None),
    ('cpu', [], None),  # CPU runs fp32 unless asked
    ('cpu', ['AMP_CPU', 'True', 'AMP_DTYPE', 'fp16'], torch.bfloat16),  # CPU autocast is always bf16
    ('cpu', ['AMP_CPU', 'True', 'AMP_ENABLE', 'False'], None),
])
def test_autocast_type_per_device(device, opts, dtype):
    assert amp_dtype(config_from(*opts), torch.device(device)) == dtype


def test_lr_scales_linearly_with_the_total_batch():
    config = config_from('DATA.BATCH_SIZE', '128', 'TRAIN.ACCUMULATION_STEPS', '2')
    base, warmup, minimum = scaled_lrs(config, world_size=8)  # 128 x 8 x 2 = 2048 = 4 x 512
    assert (base, warmup, minimum) == pytest.approx((2e-3, 2e-6, 2e-5))
    assert scaled_lrs(config_from('DATA.BATCH_SIZE', '64'), world_size=4)[0] == pytest.approx(2.5e-4)


def test_scheduler_warms_up_then_decays_per_step():
    config = config_from('TRAIN.EPOCHS', '10', 'TRAIN.WARMUP_EPOCHS', '2')
    model = build_model(config_from('MODEL.FAT.EMBED_DIMS', '[8, 16, 16, 16]', 'MODEL.FAT.NUM_HEADS', '[1, 1, 1, 1]'))
    optimizer = build_optimizer(config, model, lr=1e-3)
    scheduler = build_scheduler(config, optimizer, steps_per_epoch=10, warmup_lr=1e-6, min_lr=1e-5)
    lrs = []
    for step in range(100):
        scheduler.step_update(step)
        lrs.append(optimizer.param_groups[0]['lr'])
    assert lrs[0] == pytest.approx(1e-6)
    assert lrs[:20] == sorted(lrs[:20]) and lrs[20] == pytest.approx(1e-3)
    assert lrs[20:] == sorted(lrs[20:], reverse=True) and lrs[-1] == pytest.approx(1e-5, rel=0.05)


def test_no_weight_decay_on_norms_and_biases():
    model = build_model(config_from())
    optimizer = build_optimizer(config_from(), model, lr=1e-3)
    plain, decayed = optimizer.param_groups
    assert decayed['weight_decay'] == 0.05 and plain['weight_decay'] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.ndim > 1 for p in decayed['params'])
    plain_names = {names[id(p)] for p in plain['params']}
    assert 'stem.norm.weight' in plain_names and 'head.bias' in plain_names
    assert 'stages.0.blocks.0.mlp.norm.weight' in plain_names
    assert len(decayed['params']) + len(plain['params']) == len(list(model.parameters()))


def test_the_imagenet_training_transform_survives_randaugments_strongest_posterize():
    # timm's PosterizeIncreasing at its top magnitude keeps 0 bits (~1 image in 640 with mstd0.5);
    # Pillow 13 raises there, which stopped ImageNet training mid-epoch (requirements.txt keeps Pillow < 13).
    from PIL import Image
    from timm.data.auto_augment import RandAugment
    from classification.data import build_transform
    transform = build_transform(True, get_config(argparse.Namespace(cfg=str(ROOT / 'configs' / 'fat_b0_224.yaml'),
                                                                   opts=None)))
    rand_augment = next(t for t in transform.transforms if isinstance(t, RandAugment))
    posterize = next(op for op in rand_augment.ops if op.name == 'PosterizeIncreasing')
    posterize.prob, posterize.magnitude, posterize.magnitude_std = 1.0, 10, 0  # 10: timm's top level
    assert posterize(Image.new('RGB', (8, 8), (200, 100, 50))).getpixel((0, 0)) == (0, 0, 0)
