"""The engine's pieces that need no run: BatchNorm set-up and guard, config differences, threads."""
import os
import signal
from argparse import Namespace
from unittest import mock

import pytest
import torch
import torch.nn as nn
from timm.layers import freeze_batch_norm_2d


from classification import get_config
from classification import Classification
import engine
from engine import checkpoints
from utils import StopSignal, fit_cpu_threads


def net() -> nn.Module:
    """A BatchNorm, and one frozen as FATBackbone(freeze_bn=True) freezes them."""
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), freeze_batch_norm_2d(nn.BatchNorm2d(4)), nn.ReLU())


@pytest.mark.parametrize('device,world_size,synced', [('cuda', 2, True), ('cuda', 1, False), ('cpu', 2, False)])
def test_batchnorm_is_synchronised_only_across_several_gpus_and_frozen_ones_stay_frozen(device, world_size, synced):
    model = engine.sync_batchnorm(net(), torch.device(device), world_size)
    assert isinstance(model[1], nn.SyncBatchNorm) == synced
    assert type(model[2]).__name__ == 'FrozenBatchNorm2d'


def test_batchnorm_guard_puts_back_the_statistics_of_a_skipped_step():
    model = net().train()
    guard = engine.BatchNormGuard(model)
    model(torch.randn(2, 3, 8, 8))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    guard.snapshot()
    model(torch.full((2, 3, 8, 8), float('nan')))
    guard.restore_if(torch.tensor(True))
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    guard.snapshot()
    model(torch.randn(2, 3, 8, 8))
    guard.restore_if(torch.tensor(False))
    assert model[1].num_batches_tracked == before['1.num_batches_tracked'] + 1, 'a good step keeps its update'
    assert not torch.equal(model[1].running_mean, before['1.running_mean'])


def test_config_changes_name_each_key_and_skip_how_the_run_was_launched():
    old = get_config(Namespace(cfg=None, opts=['TRAIN.EPOCHS', '10', 'OUTPUT', 'a']))
    new = get_config(Namespace(cfg=None, opts=['TRAIN.EPOCHS', '20', 'OUTPUT', 'b', 'TRAIN.BASE_LR', '0.001']))
    assert engine.config_changes(old.dump(), new) == ['TRAIN.BASE_LR 0.0005 -> 0.001', 'TRAIN.EPOCHS 10 -> 20']
    # a task's own launch keys (classification's data format) are skipped where it says so
    plain, sharded = (get_config(Namespace(cfg=None, opts=opts)) for opts in (None, ['DATA.FORMAT', 'shards']))
    assert engine.config_changes(plain.dump(), sharded) == ["DATA.FORMAT 'auto' -> 'shards'"]
    assert engine.config_changes(plain.dump(), sharded, checkpoints.LAUNCH_KEYS + Classification.launch_keys) == []


def test_a_foreign_run_is_explained_by_the_task_sections_keys():
    """The keys named beside a differing identity are those of the task's identity sections."""
    old = get_config(Namespace(cfg=None, opts=['DISTILL.TAU', '2.0', 'AUG.REPROB', '0.1']))
    new = get_config(Namespace(cfg=None, opts=None))
    checkpoint = {'identity': {'teacher': 'x'}, 'config': old.dump()}
    keys = checkpoints.RunKeys(Classification.identity_sections, checkpoints.LAUNCH_KEYS)
    said = checkpoints._difference('ckpt.pth', checkpoint, {'teacher': 'y'}, new, keys)
    assert said == 'another teacher (ckpt.pth: DISTILL.TAU 2.0 -> 1.0)'


@pytest.mark.parametrize('threads,processes,cores,expected', [(2, 2, 2, (2, 1)), (8, 2, 16, None), (16, 3, 16, (16, 5)),
                                                              (4, 8, 2, (4, 1))])
def test_threads_per_process_are_lowered_to_fit_the_cores(threads, processes, cores, expected):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        with mock.patch.object(os, 'sched_getaffinity', return_value=set(range(cores))):
            assert fit_cpu_threads(processes) == expected
            assert torch.get_num_threads() == (expected[1] if expected else threads)
    finally:
        torch.set_num_threads(before)


def test_a_lone_process_stops_at_the_first_step_after_a_signal():
    previous = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    try:
        stop = StopSignal(mock.Mock())
        assert stop.requested() == 0
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested() == signal.SIGTERM
    finally:
        signal.signal(signal.SIGTERM, previous[0])
        signal.signal(signal.SIGINT, previous[1])


def test_the_pytorch_loader_resumes_at_a_batch_and_keeps_its_epoch_length():
    """engine.TrainLoader as data.build_train_loader implements it: set_epoch(epoch, start_batch)
    leaves out the first start_batch batches (of the loader's own size), and len() stays the epoch's.
    Mutations caught: the offset counted in samples (resumed 3 samples in); len() shrinking after a resume."""
    from data import build_train_loader
    config = get_config(Namespace(cfg=None, opts=['DATA.BATCH_SIZE', '4', 'DATA.NUM_WORKERS', '0']))
    dataset = torch.utils.data.TensorDataset(torch.arange(40))
    full = build_train_loader(dataset, config)
    full.set_epoch(1)
    epoch = [batch[0].tolist() for batch in full]
    resumed = build_train_loader(dataset, config)
    resumed.set_epoch(1, 3)
    assert isinstance(resumed, engine.TrainLoader) and len(resumed) == len(epoch) == 10
    assert [batch[0].tolist() for batch in resumed] == epoch[3:]


def test_training_data_that_is_no_train_loader_is_refused_naming_the_interface():
    task = Namespace(session=Namespace(device=torch.device('cpu'), logger=None), config=None)
    with pytest.raises(TypeError, match=r'Namespace.build_data gave a list .* engine.TrainLoader'):
        engine.Trainer(task, engine.TaskData([(torch.zeros(1), torch.zeros(1))], [], {}, 'list'), net())


@pytest.mark.parametrize('opts,message', [(['DATA.SKIP_CORRUPT', 'True'], 'DATA.SKIP_CORRUPT cannot be followed'),
                                          (['AUG.AUTO_AUGMENT', 'augmix-m5'], 'supports RandAugment policies'),
                                          (['DATA.INTERPOLATION', 'box'], 'has no DALI counterpart')])
def test_settings_dali_cannot_follow_are_refused_with_the_config(opts, message):
    """Before any data is read, and without DALI installed; the PyTorch loader takes them."""
    from utils import ConfigError
    with pytest.raises(ConfigError, match=message):
        get_config(Namespace(cfg=None, opts=['DATA.LOADER', 'dali', *opts]))
    get_config(Namespace(cfg=None, opts=['DATA.LOADER', 'torch', *opts]))
