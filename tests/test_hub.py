"""main.py --export DIR: the Hugging Face Hub folder that timm reads (config.json, model.safetensors,
README.md), loaded back offline with ``timm.create_model('local-dir:DIR', pretrained=True)`` and giving
the checkpoint's logits; the authors' weights convert the same way; --pretrained reads such a folder."""
import json
import logging
import os
import stat
from pathlib import Path

import pytest
import timm
import torch

from classification.task import load_pretrained
from helpers import CASES, TINY_OPTS, authors_state_dict, make_image_folder, run_main, train_args
from models.fat import FAT

TINY = dict(embed_dims=(8, 16, 16, 16), depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1))


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """A one-epoch run on three classes: (its ckpt_last.pth, the options that describe its model)."""
    data = make_image_folder(tmp_path_factory.mktemp('data'), classes=3, train_per_class=8, val_per_class=3)
    out = tmp_path_factory.mktemp('run')
    run_main(*train_args(data, out))
    return out / 'fat_b0' / 'default' / 'ckpt_last.pth', TINY_OPTS + ['MODEL.NUM_CLASSES', '3']


def export_folder(checkpoint: Path, opts, folder: Path, *flags):
    return run_main('--cfg', 'configs/fat_b0_224.yaml', '--resume', checkpoint, '--export', folder,
                    '--output', folder.parent, *flags, '--opts', *opts)


@pytest.fixture(scope='module')
def exported(trained, tmp_path_factory):
    """``trained``'s checkpoint exported as a folder, in training form and (``--reparam``) deploy form."""
    folders = {}
    for reparam in (False, True):
        folders[reparam] = tmp_path_factory.mktemp('exported') / 'fat_b0_tiny'
        export_folder(*trained, folders[reparam], *(['--reparam'] if reparam else []))
    return folders


@pytest.mark.parametrize('reparam', [False, True])
def test_the_folder_loads_through_timm_offline_with_the_checkpoints_logits(trained, exported, reparam):
    checkpoint, opts = trained
    folder = exported[reparam]
    assert [p.name for p in folder.parent.iterdir() if p.name.startswith('.')] == []  # no staging folder left
    assert sorted(p.name for p in folder.iterdir()) == ['README.md', 'config.json', 'model.safetensors']
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((folder / 'model.safetensors').stat().st_mode) == 0o666 & ~umask

    saved = torch.load(checkpoint, weights_only=True)
    reference = FAT(**TINY, num_classes=3).eval()
    reference.load_state_dict(saved['model'])
    loaded = timm.create_model(f'local-dir:{folder}', pretrained=True).eval()
    assert (sum(isinstance(m, torch.nn.BatchNorm2d) for m in loaded.modules()) == 0) == reparam
    for shape in ((2, 3, 32, 32), (1, 3, 48, 40)):  # not the sizes the export checked
        images = torch.randn(shape)
        with torch.no_grad():
            torch.testing.assert_close(loaded(images), reference(images), rtol=0, atol=1e-5)

    config = json.loads((folder / 'config.json').read_text())
    assert config['architecture'] == 'fat_b0' and config['label_names'] == ['class_0', 'class_1', 'class_2']
    form = config['pretrained_cfg']
    assert form['input_size'] == [3, 32, 32] and form['crop_pct'] == 0.875 and form['interpolation'] == 'bicubic'
    assert form['mean'] == [0.485, 0.456, 0.406] and config['model_args']['dwconv_impl'] == 'auto'
    card = (folder / 'README.md').read_text()
    metrics = saved['metrics']
    assert f'top-1 {metrics["acc1"]:.2f}%' in card and 'after epoch 1 of 1' in card and '24 training images' in card
    assert "`TRAIN.EPOCHS 300 -> 1`" in card and "`MODEL.FAT.EMBED_DIMS [] -> [8, 16, 16, 16]`" in card
    assert ('deploy: BatchNorms' in card) == reparam and 'MODEL.NAME' not in card


def test_the_authors_weights_convert_to_a_folder_with_their_logits(tmp_path):
    case = CASES['small']
    args = case['authors_args']
    checkpoint = tmp_path / 'authors.pth'
    torch.save({'model': authors_state_dict(case)}, checkpoint)
    opts = ['MODEL.NUM_CLASSES', str(args['num_classes']), 'DATA.IMG_SIZE', '64']
    for key in ('embed_dims', 'depths', 'num_heads', 'kernel_sizes', 'window_sizes', 'mlp_kernel_sizes',
                'mlp_ratios'):
        opts += [f'MODEL.FAT.{key.upper()}', str(list(args[key]))]
    folder = tmp_path / 'authors_small'
    proc = export_folder(checkpoint, opts, folder, '--reparam')
    assert '(no class names)' in proc.stdout
    card = (folder / 'README.md').read_text()
    assert 'Not recorded: these weights came without an evaluation by this project' in card
    loaded = timm.create_model(f'local-dir:{folder}', pretrained=True).eval()
    for vector in case['inputs']:
        images = torch.randn(vector['input_shape'], generator=torch.Generator().manual_seed(vector['input_seed']))
        with torch.no_grad():
            torch.testing.assert_close(loaded(images), torch.tensor(vector['logits']), rtol=0, atol=1e-4)


def test_a_folder_that_holds_files_is_never_written_over(tmp_path, trained):
    checkpoint, opts = trained
    folder = tmp_path / 'mine'
    folder.mkdir()
    (folder / 'notes.txt').write_text('keep me')
    proc = run_main('--cfg', 'configs/fat_b0_224.yaml', '--resume', checkpoint, '--export', folder, '--output',
                    tmp_path, '--opts', *opts, check=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith('error:')]
    assert proc.returncode == 2 and len(errors) == 1 and 'is not an empty folder' in errors[0], proc.stderr
    assert [p.name for p in folder.iterdir()] == ['notes.txt'] and (folder / 'notes.txt').read_text() == 'keep me'


def test_pretrained_reads_a_folder_and_reinitialises_a_classifier_of_another_size(trained, exported):
    checkpoint, _ = trained
    folder = exported[False]
    weights = torch.load(checkpoint, weights_only=True)['model']
    model = FAT(**TINY, num_classes=7)
    head = model.head.weight.clone()
    load_pretrained(model, f'local-dir:{folder}', logging.getLogger('test'))
    state = model.state_dict()
    assert all(torch.equal(state[key], value) for key, value in weights.items() if not key.startswith('head.'))
    assert torch.equal(model.head.weight, head)  # 7 classes, not the folder's 3: left as initialised
