"""The DALI loader (classification/dali.py) on the CPU: tiny generated ImageFolders and WebDataset shards.

Each test names, in a comment, a bug it was seen to catch (the code was changed that way and the test
failed)."""
import argparse
import io
import pickle
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip('nvidia.dali')

from wds2idx import IndexCreator  # noqa: E402  (DALI's index tool, installed with DALI)

from classification import get_config  # noqa: E402
from classification.data import build_transform  # noqa: E402
import classification.dali as dali  # noqa: E402
from classification.dali import FolderSplit, ShardSplit, build_dali_loaders  # noqa: E402
from helpers import (EXACT_OPTS, assert_same_weights, last_checkpoint,  # noqa: E402
                     make_image_folder, project_env, run_main, start_main, train_args, wait_for_log)
from utils import DataError  # noqa: E402

BATCH = 4
CLASSES = ['a', 'b', 'c']
# Augmentation off except the random crop and flip, which keep a solid colour.
PLAIN = ['AUG.AUTO_AUGMENT', 'none', 'AUG.COLOR_JITTER', '0.0', 'AUG.REPROB', '0.0']


def make_config(*opts: str):
    return get_config(argparse.Namespace(cfg=None, opts=[
        'DATA.LOADER', 'dali', 'DEVICE', 'cpu', 'DATA.IMG_SIZE', '32', 'DATA.BATCH_SIZE', str(BATCH),
        'DATA.NUM_WORKERS', '1', *opts]))


def jpeg(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format='JPEG', quality=95)
    return out.getvalue()


def solid(index: int) -> np.ndarray:
    """Sample ``index``'s image: one grey level (16 + 7 index) that any crop and resize keep."""
    return np.full((40, 48, 3), 16 + 7 * index, np.uint8)


def textured(index: int) -> np.ndarray:
    """An image where crops, flips and RandAugment show."""
    y, x = np.mgrid[0:40, 0:48].astype(np.float32)
    channels = [x * 5 + 3 * index, y * 6, 128 + 90 * np.sin((x + 2 * y) / 5 + index)]
    return np.stack(channels, -1).clip(0, 255).astype(np.uint8)


def sample_ids(images: torch.Tensor) -> list:
    """The index each solid image encodes (its mean pixel, un-normalised)."""
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    grey = ((images * std + mean) * 255).mean(dim=(1, 2, 3))
    return ((grey - 16) / 7).round().long().tolist()


def write_folder(root: Path, images: list) -> FolderSplit:
    """An ImageFolder of ``images`` (sample i in class i % 3), as FolderSplit lists it."""
    samples = []
    for index, pixels in enumerate(images):
        path = root / CLASSES[index % 3] / f'{index:03d}.jpg'
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(jpeg(pixels))
        samples.append((str(path), index % 3))
    return FolderSplit(sorted(samples), CLASSES)


def write_shards(root: Path, members: list, per_shard: int = 6) -> ShardSplit:
    """WebDataset tars of ``members`` ((key, {ext: bytes})), with DALI's index beside each."""
    root.mkdir(parents=True, exist_ok=True)
    tars, indexes = [], []
    for number, start in enumerate(range(0, len(members), per_shard)):
        tar_path, index_path = root / f'train-{number:06d}.tar', root / f'train-{number:06d}.idx'
        with tarfile.open(tar_path, 'w', format=tarfile.USTAR_FORMAT) as tar:
            for key, files in members[start:start + per_shard]:
                for ext, payload in files.items():
                    info = tarfile.TarInfo(f'{key}.{ext}')
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
        with IndexCreator(str(tar_path), str(index_path), verbose=False) as creator:
            creator.create_index()
        tars.append(str(tar_path))
        indexes.append(str(index_path))
    return ShardSplit(tars, indexes, len(members), CLASSES)


def shard_members(images: list) -> list:
    return [(f'{index:06d}', {'jpg': jpeg(pixels), 'cls': f'{index % 3:04d}'.encode()})
            for index, pixels in enumerate(images)]


@pytest.fixture(scope='module')
def splits(tmp_path_factory):
    """Solid-colour and textured data sets of 22 images, as a folder and as shards of 6 samples."""
    root = tmp_path_factory.mktemp('dali')
    solids, textures = [solid(i) for i in range(22)], [textured(i) for i in range(22)]
    return {'folder': write_folder(root / 'solid', solids),
            'shards': write_shards(root / 'solid-shards', shard_members(solids)),
            'textured folder': write_folder(root / 'textured', textures),
            'textured shards': write_shards(root / 'textured-shards', shard_members(textures))}


def loaders(config, train, val=None, rank=0, world=1, monkeypatch=None):
    if monkeypatch is not None:
        monkeypatch.setattr(dali, 'rank_world', lambda: (rank, world))
    return build_dali_loaders(config, train, val if val is not None else train)


def one_epoch(loader, epoch: int) -> list:
    loader.set_epoch(epoch)
    return [(images.clone(), labels.clone()) for images, labels in loader]


# --- 1. the validation transform ------------------------------------------------------------------

@pytest.mark.parametrize('crop', ['True', 'False'])
def test_validation_batches_match_the_torch_loaders_transform(tmp_path, crop):
    # Caught: resizing the shorter side to IMG_SIZE whatever TEST.CROP_PCT; ImageNet's mean and std swapped.
    split = write_folder(tmp_path, [textured(i) for i in range(6)])
    config = make_config('TEST.CROP', crop)
    _, val = loaders(config, split)
    batches = list(val)
    images, labels = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    assert [len(b[1]) for b in batches] == [4, 2] and len(val) == 2
    assert images.dtype == torch.float32 and images.shape == (6, 3, 32, 32) and labels.dtype == torch.int64
    assert labels.tolist() == [label for _, label in split.samples]
    # The PyTorch loader's transform (timm, PIL) of the same files. Measured here: the decoders agree
    # bit for bit and the resampling differs by at most 5 grey levels (0.3 to 0.6 on average).
    transform = build_transform(False, config)
    reference = torch.stack([transform(Image.open(path).convert('RGB')) for path, _ in split.samples])
    grey_levels = (images - reference).abs() * torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255
    assert grey_levels.max() <= 6 and grey_levels.mean() <= 1


# --- 2. training epochs over processes ------------------------------------------------------------

@pytest.mark.parametrize('kind', ['folder', 'shards'])
def test_training_epochs_take_each_sample_at_most_once_over_two_processes(splits, monkeypatch, kind):
    # Caught: the shuffle seed offset by rank (duplicates over processes); no shuffling of the folder
    # (each epoch in file order) or within the shards' buffer (runs of one tar's consecutive samples);
    # not reading DALI's epoch to its end before the next (the padding repeats leak in).
    config = make_config(*PLAIN)
    epochs = {}
    for rank in (0, 1):
        train, _ = loaders(config, splits[kind], rank=rank, world=2, monkeypatch=monkeypatch)
        assert len(train) == 22 // 2 // BATCH and train.num_samples == 22 and train.classes == CLASSES
        for epoch in (0, 1):
            batches = one_epoch(train, epoch)
            assert len(batches) == len(train)
            for images, labels in batches:
                assert images.shape == (BATCH, 3, 32, 32) and images.dtype == torch.float32
                assert labels.dtype == torch.int64 and labels.tolist() == [i % 3 for i in sample_ids(images)]
            epochs[rank, epoch] = [i for images, _ in batches for i in sample_ids(images)]
    for epoch in (0, 1):
        seen = epochs[0, epoch] + epochs[1, epoch]
        assert len(set(seen)) == len(seen) == 2 * len(train) * BATCH and set(seen) <= set(range(22))
    stored = (list(range(22)) if kind == 'shards'  # where each sample is in the reader's input
              else [int(Path(path).stem) for path, _ in splits[kind].samples])
    for order in epochs.values():  # shuffled: samples stored side by side rarely stay side by side
        places = [stored.index(i) for i in order]
        assert sum(b == a + 1 for a, b in zip(places, places[1:])) <= 2
    assert epochs[0, 0] != epochs[0, 1] and epochs[1, 0] != epochs[1, 1]


# --- 3. resume ------------------------------------------------------------------------------------

@pytest.mark.parametrize('kind', ['textured folder', 'textured shards'])
def test_resume_from_state_dict_continues_bitwise(splits, tmp_path, kind):
    # Caught: saving the pipeline's own checkpoint (pipe.checkpoint(), blind to the batches the
    # iterator prefetched) instead of the iterator's; load_state_dict keeping the position but not
    # building from DALI's checkpoint.
    config = make_config('AUG.AUTO_AUGMENT', 'rand-m9-mstd0.5-inc1', 'AUG.REPROB', '0.0')  # random crop, flip on
    train, _ = loaders(config, splits[kind])
    expected = one_epoch(train, 0) + one_epoch(train, 1)
    assert len(expected) == 2 * len(train) == 10

    def saved(state):  # as a checkpoint holds it
        torch.save(state, tmp_path / 'state.pth')
        return torch.load(tmp_path / 'state.pth', weights_only=True)

    # Preempted after 2 batches of epoch 0, resumed through the end of epoch 1.
    interrupted, _ = loaders(config, splits[kind])
    interrupted.set_epoch(0)
    batches = iter(interrupted)
    got = [next(batches) for _ in range(2)]
    state = saved(interrupted.state_dict())
    resumed, _ = loaders(config, splits[kind])
    resumed.load_state_dict(state)
    resumed.set_epoch(0, 2)
    got += list(resumed) + one_epoch(resumed, 1)
    # Across the epoch boundary: saved after the last batch of epoch 0 was taken but before the loader
    # finished its DALI epoch (as when the engine stops at steps_per_epoch), resumed at epoch 1.
    resumed_again, _ = loaders(config, splits[kind])
    resumed_again.load_state_dict(saved(pickle.loads(pickle.dumps(state))))
    resumed_again.set_epoch(0, 2)
    tail = iter(resumed_again)
    for _ in range(len(resumed_again) - 2):
        next(tail)
    boundary, _ = loaders(config, splits[kind])
    boundary.load_state_dict(resumed_again.state_dict())
    after_boundary = one_epoch(boundary, 1)
    assert len(got) == len(expected)
    for (images, labels), (want_images, want_labels) in zip(got, expected):
        assert torch.equal(images, want_images) and torch.equal(labels, want_labels)
    for (images, labels), (want_images, want_labels) in zip(after_boundary, expected[len(train):]):
        assert torch.equal(images, want_images) and torch.equal(labels, want_labels)
    assert not torch.equal(expected[0][0], expected[len(train)][0])  # augmentation and order do change


def test_a_position_the_loader_cannot_reach_is_warned_and_shortened(splits, caplog):
    # Caught: ignoring ``skip`` (a full epoch after a resume from the PyTorch loader's checkpoint);
    # taking a fresh loader asked for epoch 1 for one that left epoch 0 early (no warning).
    train, _ = loaders(make_config(*PLAIN), splits['folder'])
    train.set_epoch(0, 2)  # a fresh loader: no DALI position to resume from
    assert 'not the one of an uninterrupted run' in caplog.text
    assert len(list(train)) == len(train) - 2
    assert len(one_epoch(train, 1)) == len(train)
    caplog.clear()
    fresh, _ = loaders(make_config(*PLAIN), splits['folder'])
    assert len(one_epoch(fresh, 1)) == len(fresh) and 'not the one of an uninterrupted run' in caplog.text


def test_rand_augment_policies_parse_as_timm_reads_them():
    # Caught: 'mstd0.5' read as m (the sections share the letter m).
    policy = dali.RandAugmentPolicy.parse('rand-m9-mstd0.5-inc1')
    assert policy == dali.RandAugmentPolicy(magnitude=9, layers=2, prob=0.5, magnitude_std=0.5, increasing=True)
    assert dali.RandAugmentPolicy.parse('rand-n3-m12-p1.0') == dali.RandAugmentPolicy(10, 3, 1.0, 0.0, False)
    for unsupported in ('rand-m9-mmax20', 'original', 'augmix-m5'):
        with pytest.raises(dali.ConfigError, match='DATA.LOADER dali'):
            dali.RandAugmentPolicy.parse(unsupported)


def test_colour_jitter_only_without_rand_augment_and_erasing_on_the_batch(splits):
    # Caught: colour jitter applied under RandAugment too (timm turns it off); erasing never applied.
    def first_epoch(*opts):
        train, _ = loaders(make_config('AUG.HFLIP', '0.0', *opts), splits['textured folder'])
        return torch.cat([images for images, _ in one_epoch(train, 0)])

    rand = ['AUG.AUTO_AUGMENT', 'rand-m9-mstd0.5-inc1', 'AUG.REPROB', '0.0']
    assert torch.equal(first_epoch(*rand, 'AUG.COLOR_JITTER', '0.4'), first_epoch(*rand, 'AUG.COLOR_JITTER', '0.0'))
    plain = first_epoch(*PLAIN)
    assert not torch.equal(first_epoch('AUG.AUTO_AUGMENT', 'none', 'AUG.COLOR_JITTER', '0.4', 'AUG.REPROB', '0.0'),
                           plain)
    torch.manual_seed(0)
    erased = first_epoch(*PLAIN, 'AUG.REPROB', '1.0', 'AUG.REMODE', 'const')  # const: the erased box is 0
    assert all((image == 0).all(dim=0).sum() >= 1 for image in erased) and not (plain == 0).all(dim=1).any()


@pytest.mark.parametrize('interpolation', ['bicubic', 'bilinear', 'nearest', 'lanczos', 'random', 'box'])
def test_interpolations(splits, interpolation):
    # Caught: 'random' drawn outside the pipeline definition (DALI refuses the graph).
    if interpolation == 'box':  # refused with the config, before any data is read
        with pytest.raises(dali.ConfigError, match='DATA.INTERPOLATION box has no DALI counterpart'):
            make_config(*PLAIN, 'DATA.INTERPOLATION', interpolation)
        return
    train, val = loaders(make_config(*PLAIN, 'DATA.INTERPOLATION', interpolation), splits['folder'])
    assert len(one_epoch(train, 0)) == len(train) and len(list(val)) == len(val)


# --- 4. validation over processes -----------------------------------------------------------------

@pytest.mark.parametrize('kind,size', [('folder', 21), ('folder', 9), ('shards', 22)])
def test_validation_reads_every_sample_once_over_two_processes(splits, monkeypatch, kind, size):
    # Caught: yielding the empty batch that ends a share one sample short of the other (9 samples);
    # each process moving to the next share every pass (stick_to_shard off: lengths no longer hold).
    split = splits[kind]
    if kind == 'folder':
        ordered = sorted(split.samples, key=lambda sample: sample[0].rsplit('/', 1)[-1])
        split = FolderSplit(ordered[:size], CLASSES)
    seen = []
    for rank in (0, 1):
        _, val = loaders(make_config(*PLAIN), splits['folder'], split, rank=rank, world=2, monkeypatch=monkeypatch)
        assert val.num_samples == size
        next(iter(val))  # a pass left early: the next one still reads the whole share
        for _ in range(2):
            batches = list(val)
            assert len(batches) == len(val) and all(0 < len(labels) <= BATCH for _, labels in batches)
            ids = [i for images, _ in batches for i in sample_ids(images)]
            assert [label for _, labels in batches for label in labels.tolist()] == [i % 3 for i in ids]
        seen += ids
    assert sorted(seen) == list(range(size))


# --- 5. without DALI ------------------------------------------------------------------------------

def test_without_dali_the_builder_says_how_to_install_it():
    # Caught: importing nvidia.dali at the top of classification/dali.py (the module itself no longer imports).
    script = '''
import sys
for name in [m for m in sys.modules if m.startswith('nvidia.dali')] + ['nvidia.dali', 'nvidia.dali.fn',
                                                                       'nvidia.dali.plugin.pytorch']:
    sys.modules[name] = None
import argparse
from classification import get_config
from classification.dali import FolderSplit, build_dali_loaders
from utils import UserInputError
split = FolderSplit([('x.jpg', 0)], ['a'])
try:
    build_dali_loaders(get_config(argparse.Namespace(cfg=None, opts=['DATA.LOADER', 'dali'])), split, split)
except UserInputError as error:
    print(repr(str(error)))
'''
    run = subprocess.run([sys.executable, '-c', script], env=project_env(), capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == repr(dali.DALI_MISSING)
    assert '\n' not in dali.DALI_MISSING  # the CLI prints a UserInputError as one 'error:' line


# --- 6. bad data ----------------------------------------------------------------------------------

def test_an_undecodable_image_is_one_line_naming_the_folder(tmp_path):
    # Caught: letting DALI's RuntimeError (a dozen lines with a traceback) through.
    split = write_folder(tmp_path, [solid(i) for i in range(6)])
    Path(split.samples[3][0]).write_bytes(b'not a jpeg at all')
    _, val = loaders(make_config(*PLAIN), split)
    with pytest.raises(DataError) as raised:
        list(val)
    message = str(raised.value)
    # DALI's decoder names no file: only the operator and nvImageCodec's status code.
    assert '\n' not in message and str(tmp_path) in message and 'DALI decoders.image: nvImageCodec failure' in message
    assert 'DATA.LOADER torch names unreadable files' in message


def test_a_missing_image_file_is_named(tmp_path):
    # Caught: keeping only DALI's first line ("Critical error in pipeline:").
    split = write_folder(tmp_path, [solid(i) for i in range(6)])
    Path(split.samples[2][0]).unlink()
    _, val = loaders(make_config(*PLAIN), split)
    with pytest.raises(DataError, match=f'File mapping failed: {split.samples[2][0]}$'):
        list(val)


@pytest.mark.parametrize('damage', ['truncated', 'bad cls'])
def test_broken_shards_name_the_shard(tmp_path, damage):
    # Caught: not mapping the index DALI names to its tar; reading a .cls of other bytes as a number.
    members = shard_members([solid(i) for i in range(12)])
    if damage == 'bad cls':
        members[7][1]['cls'] = b'0x07'
    split = write_shards(tmp_path, members)
    if damage == 'truncated':
        tar = Path(split.tars[1])
        tar.write_bytes(tar.read_bytes()[:5000])
    _, val = loaders(make_config(*PLAIN), split)
    with pytest.raises(DataError) as raised:
        list(val)
    message = str(raised.value)
    assert '\n' not in message
    if damage == 'truncated':
        assert f'Malformed index file at "{split.indexes[1]}"' in message and f'(shard {split.tars[1]})' in message
    else:
        assert f'a .cls member in the shards of {tmp_path} is not zero-padded decimal digits' in message


# --- through main.py: the engine keeps each process's DALI position in its checkpoints ---------------

@pytest.fixture(scope='module')
def main_data(tmp_path_factory):
    """test_dependability's folder (3 classes, 24 training images) and its shards."""
    from data.shards import convert
    folder = make_image_folder(tmp_path_factory.mktemp('main') / 'folder', classes=3, train_per_class=8,
                               val_per_class=3)
    convert(str(folder), str(folder.parent / 'shards'), shard_mb=0.01, log=lambda line: None)
    return folder, folder.parent / 'shards'


def test_main_with_dali_on_two_processes_trains_and_evaluates_every_image_once(main_data, tmp_path):
    proc = run_main(*train_args(main_data[1], tmp_path, 'DATA.LOADER', 'dali', 'TRAIN.EPOCHS', '2'), nproc=2)
    # 24 images, 2 processes, batch 4: 3 batches each per epoch; the 9 validation images once in all.
    assert '[1/2][2/3]' in proc.stdout and 'Accuracy of the network on the 9 test images' in proc.stdout


def test_sigkill_with_dali_then_same_command_ends_bitwise_identical(main_data, tmp_path):
    # DALI's RandAugment, random erasing on the batch, Mixup/CutMix, drop path and EMA all on. Mutations
    # caught: the engine not saving the loader's state (the restart reads epoch 1 afresh, with a warning).
    opts = [*EXACT_OPTS, 'DATA.LOADER', 'dali']
    run_main(*train_args(main_data[1], tmp_path / 'uninterrupted', *opts))
    args = train_args(main_data[1], tmp_path / 'killed', *opts)
    proc = start_main(*args)
    wait_for_log(tmp_path / 'killed' / 'fat_b0' / 'default' / 'log.txt', 'Train: [1/3][3/6]', proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    restarted = run_main(*args)
    assert '(epoch 0, 6 steps done' in restarted.stdout and 'DALI cannot skip' not in restarted.stdout
    assert_same_weights(last_checkpoint(tmp_path / 'killed'), last_checkpoint(tmp_path / 'uninterrupted'))
