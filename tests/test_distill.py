"""Knowledge distillation (DISTILL.*): the loss comes from the teacher's logits on the student's own
mixed batch, a killed distilled run reruns bitwise equal, and teachers that cannot serve (other
classes, unknown, weights without a config, another teacher on resume) are refused with one line."""
import argparse
import logging
import re
import shutil
import signal
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import classification
from classification import get_config
from classification.config import CLASSIFICATION_CHOICES, check_config, classification_defaults
from config import parse_command_line
from classification.data import build_loader, preprocessing
import engine
from helpers import (EXACT_OPTS, TINY_OPTS, assert_one_line_error, assert_same_weights, last_checkpoint,
                     make_image_folder, run_main, start_main, train_args, wait_for_log)
from classification.distill import Teacher, TeacherLogits, build_teacher
from models.fat import FAT
from utils import CheckpointError, ConfigError

TINY = dict(embed_dims=(8, 16, 16, 16), depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1))


def command_line(argv):
    """main.py's config from ``argv``, as its command line builds it."""
    return parse_command_line('test', classification_defaults(), CLASSIFICATION_CHOICES, check_config, argv=argv)


def write_teacher(path: Path, num_classes: int = 3, seed: int = 1, **extra) -> Path:
    """A training checkpoint of this project (weights, config, data record) of a tiny FAT."""
    torch.manual_seed(seed)
    model = FAT(**TINY, num_classes=num_classes)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))  # decisive logits, not a fresh head's
    config = get_config()
    config.defrost()
    config.merge_from_list(TINY_OPTS + ['MODEL.NUM_CLASSES', str(num_classes)])
    torch.save({'model': model.state_dict(), 'config': config.dump(),
                'identity': {'data': {'classes': [f'class_{c}' for c in range(num_classes)]}}, **extra}, path)
    return path


@pytest.fixture(scope='module')
def data(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp('data'), classes=3, train_per_class=8, val_per_class=3)


@pytest.fixture(scope='module')
def teacher(tmp_path_factory) -> Path:
    return write_teacher(tmp_path_factory.mktemp('teacher') / 'teacher.pth')


def task_with(teacher, kind: str, tmp_path: Path, *opts: str) -> 'classification.Classification':
    config = command_line(['--device', 'cpu', '--opts', *TINY_OPTS, 'MODEL.NUM_CLASSES', '3',
                                              'AUG.MIXUP', '0.8', 'AUG.CUTMIX', '1.0', 'DISTILL.TYPE', kind,
                                              'DISTILL.TEACHER', str(teacher), 'DISTILL.ALPHA', '0.3',
                                              'DISTILL.TAU', '2.0', *opts])
    session = engine.Session(config, 0, 1, torch.device('cpu'), str(tmp_path), logging.getLogger('test'))
    task = classification.Classification(session)
    task.build_teacher()
    task.build_loss(3)
    return task


@pytest.mark.parametrize('kind', ['soft', 'hard'])
def test_the_loss_is_made_from_the_teachers_logits_on_the_students_mixed_batch(tmp_path, teacher, kind):
    task = task_with(teacher, kind, tmp_path)
    student = FAT(**TINY, num_classes=3).train()
    seen = {}
    student.register_forward_hook(lambda module, args, out: seen.update(student=(args[0], out)))
    task.teacher.model.register_forward_hook(lambda module, args, out: seen.update(teacher=(args[0], out)))
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    torch.manual_seed(0)
    loss, parts = task.loss(student, (images.clone(), labels))  # timm's Mixup mixes in place

    (student_in, s), (teacher_in, t) = seen['student'], seen['teacher']
    assert not torch.equal(student_in, images)  # Mixup/CutMix changed the batch ...
    assert torch.equal(teacher_in, student_in)  # ... and the teacher saw the same mixed images
    assert not task.teacher.model.training and not t.requires_grad
    if kind == 'soft':  # KL(teacher || student) at temperature 2, DeiT's scaling
        p_t = torch.softmax(t / 2, dim=1)
        expected = (p_t * (p_t.log() - torch.log_softmax(s / 2, dim=1))).sum() / s.numel() * 4
    else:
        expected = F.cross_entropy(s, t.argmax(dim=1))
        assert not torch.equal(t.argmax(dim=1), s.argmax(dim=1))  # the student's own labels would differ
    torch.testing.assert_close(parts['loss_distill'], expected.detach())
    torch.testing.assert_close(loss, 0.7 * parts['loss_cls'] + 0.3 * expected)
    loss.backward()
    assert all(p.grad is None for p in task.teacher.model.parameters())


def test_a_killed_distilled_run_reruns_bitwise_equal_and_refuses_another_teacher(data, teacher, tmp_path):
    """Mixup, RandAugment, EMA and a loader worker on, soft distillation: SIGKILL after epoch 0 is
    saved, the same command again ends where an uninterrupted run ends. The checkpoints carry the
    teacher's identity (its weights' hash), not its weights: the same weights elsewhere continue the
    run, other weights at the same path are refused, in the folder and through --resume."""
    mine = tmp_path / 'teacher.pth'
    shutil.copy(teacher, mine)
    opts = [*EXACT_OPTS, 'DISTILL.TYPE', 'soft', 'DISTILL.TAU', '2.0', 'DISTILL.TEACHER']
    reference = tmp_path / 'reference'
    run_main(*train_args(data, reference, *opts, str(teacher)))
    killed = tmp_path / 'killed'
    args = train_args(data, killed, *opts, str(mine))
    proc = start_main(*args)
    wait_for_log(killed / 'fat_b0' / 'default' / 'log.txt', 'Train: [1/3][3/6]', proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    restarted = run_main(*args)
    assert 'resumed from' in restarted.stdout and 'loss_distill' in restarted.stdout
    final = last_checkpoint(killed)
    assert_same_weights(final, last_checkpoint(reference))
    assert final['identity']['teacher'] == {'weights_sha256': build_teacher(str(teacher)).fingerprint}
    assert sum(v.numel() for v in final['model'].values()) == sum(v.numel() for v in FAT(**TINY, num_classes=3)
                                                                   .state_dict().values())  # no teacher inside

    longer = ['TRAIN.EPOCHS', '4', 'TRAIN.WARMUP_EPOCHS', '0', 'PRINT_FREQ', '100']
    moved = run_main(*train_args(data, killed, *opts, str(teacher), *longer))  # the same weights, another path
    assert 'resumed from' in moved.stdout and 'EPOCH 3 training' in moved.stdout
    write_teacher(mine, seed=2)  # other weights under the run's own path
    assert_one_line_error(run_main(*train_args(data, killed, *opts, str(mine), *longer), check=False),
                          'holds a run with another teacher', '--tag')
    ckpt = killed / 'fat_b0' / 'default' / 'ckpt_last.pth'
    assert_one_line_error(run_main(*train_args(data, tmp_path / 'elsewhere', *opts, str(mine), *longer),
                                   '--resume', ckpt, check=False),
                          f'--resume {ckpt} cannot continue this run', 'another teacher', '--pretrained')


def test_a_teacher_of_other_classes_is_refused_before_any_shard_is_fetched(tmp_path, serve):
    from data.shards import convert
    folder = make_image_folder(tmp_path / 'folder', classes=3, train_per_class=4, val_per_class=2)
    convert(str(folder), str(tmp_path / 'shards'), shard_mb=0.01, log=lambda line: None)
    server = serve(tmp_path / 'shards')
    five = write_teacher(tmp_path / 'five.pth', num_classes=5)
    proc = run_main(*train_args(server.url, tmp_path / 'out', 'DATA.SHARD_CACHE', str(tmp_path / 'cache'),
                                'DISTILL.TYPE', 'hard', 'DISTILL.TEACHER', str(five)), check=False)
    assert_one_line_error(proc, f'DISTILL.TEACHER {five} has 5 classes and the data 3')
    assert set(server.requests) == {'index.json'}  # the index was read; no shard was fetched


def test_a_folders_classes_reach_the_teacher_check_before_its_images_are_listed(tmp_path):
    folder = make_image_folder(tmp_path / 'data', classes=3, train_per_class=2, val_per_class=1)
    for image in (folder / 'train' / 'class_2').iterdir():
        image.rename(image.with_suffix('.txt'))  # listing the images would fail: class_2 has none
    config = command_line(['--device', 'cpu', '--data-path', str(folder)])
    seen = []

    def refuse(classes):
        seen.append(list(classes))
        raise ConfigError('refused')
    with pytest.raises(ConfigError, match='refused'):
        build_loader(config, refuse)
    assert seen == [['class_0', 'class_1', 'class_2']]


def test_teachers_that_cannot_serve_are_named_in_one_line(tmp_path):
    bare = tmp_path / 'bare.pth'
    torch.save(FAT(**TINY, num_classes=3).state_dict(), bare)
    with pytest.raises(CheckpointError, match='not a training checkpoint of this project .* DISTILL.TEACHER_WEIGHTS'):
        build_teacher(str(bare))
    with pytest.raises(ConfigError, match="'resnet_9000' is neither a timm model name"):
        build_teacher('resnet_9000')
    with pytest.raises(CheckpointError, match='no config.json there'):
        build_teacher(f'local-dir:{tmp_path}')
    with pytest.raises(CheckpointError, match='does not fit ResNet: missing: .*unexpected'):  # a named teacher with another model's weights
        build_teacher('resnet18', str(bare))
    with pytest.raises(ConfigError, match='DISTILL.TYPE soft needs DISTILL.TEACHER'):
        command_line(['--opts', 'DISTILL.TYPE', 'soft'])
    named = task_with(write_teacher(tmp_path / 'named.pth'), 'soft', tmp_path)
    named.check_teacher(['class_0', 'class_1', 'class_2'])
    with pytest.raises(ConfigError, match='knows other classes than the data: class_0, class_1, class_2 ... where '
                                          'the data has cat, dog, emu'):
        named.check_teacher(['cat', 'dog', 'emu'])
    with pytest.raises(ConfigError, match='TEACHER_WEIGHTS is for a teacher named by its timm model name'):
        build_teacher(str(bare), str(bare))
    import timm
    vit = tmp_path / 'vit.pth'
    torch.save(timm.create_model('vit_tiny_patch16_224', num_classes=3).state_dict(), vit)
    with pytest.raises(ConfigError, match='takes 3-channel images of exactly 224x224; the student.s are 3-channel at '
                                          'DATA.IMG_SIZE 32'):
        task_with('vit_tiny_patch16_224', 'soft', tmp_path, 'DISTILL.TEACHER_WEIGHTS', str(vit))


def test_a_named_teacher_takes_its_classifier_size_from_the_weights_file(tmp_path):
    import timm
    torch.manual_seed(0)
    source = timm.create_model('resnet10t', num_classes=3)
    weights = tmp_path / 'resnet10t.pth'
    torch.save(source.state_dict(), weights)
    teacher = build_teacher('resnet10t', str(weights))
    assert teacher.num_classes == 3 and teacher.input_size == (3, 176, 176) and not teacher.fixed_input_size
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(teacher.model(images), source.eval()(images))


def test_a_teacher_trained_with_other_statistics_sees_the_batch_renormalised():
    recorded = []
    probe = torch.nn.Identity()
    probe.register_forward_hook(lambda module, args, out: recorded.append(args[0]))
    teacher = Teacher(probe, 'probe', 3, None, (3, 32, 32), False, (0.5, 0.5, 0.5), (0.25, 0.5, 1.0), 'x')
    student_mean, student_std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    pixels = torch.rand(2, 3, 8, 8)  # in [0, 1], as the loader reads them
    as_student = (pixels - torch.tensor(student_mean).view(1, 3, 1, 1)) / torch.tensor(student_std).view(1, 3, 1, 1)
    TeacherLogits(teacher, student_mean, student_std)(as_student)
    as_teacher = (pixels - 0.5) / torch.tensor([0.25, 0.5, 1.0]).view(1, 3, 1, 1)
    torch.testing.assert_close(recorded[-1], as_teacher)
    TeacherLogits(teacher, (0.5, 0.5, 0.5), (0.25, 0.5, 1.0))(as_teacher)
    assert recorded[-1] is as_teacher  # the same statistics: the batch itself, no arithmetic


def test_the_distillation_config_names_deits_teacher_at_the_students_input():
    import timm
    config = get_config(argparse.Namespace(cfg='configs/fat_b0_224_distill.yaml', opts=None))
    assert (config.DISTILL.TYPE, config.DISTILL.ALPHA, config.DISTILL.TAU) == ('hard', 0.5, 1.0)
    form = timm.models.get_pretrained_cfg(config.DISTILL.TEACHER)
    assert form.architecture == 'regnety_160' and form.hf_hub_id == 'timm/regnety_160.deit_in1k'
    assert form.input_size == (3, config.DATA.IMG_SIZE, config.DATA.IMG_SIZE) and form.num_classes == 1000
    assert (form.mean, form.std) == (preprocessing(config)['mean'], preprocessing(config)['std'])


def test_throughput_times_the_teachers_forward_in_every_training_step(tmp_path, teacher, caplog):
    config = command_line(['--device', 'cpu', '--throughput', '--batch-size', '2', '--opts',
                                              *TINY_OPTS, 'MODEL.NUM_CLASSES', '3', 'DISTILL.TYPE', 'hard',
                                              'DISTILL.TEACHER', str(teacher)])
    logger = logging.getLogger('test_throughput')
    session = engine.Session(config, 0, 1, torch.device('cpu'), str(tmp_path), logger)
    calls = []
    hook = torch.nn.modules.module.register_module_forward_hook(
        lambda module, args, out: calls.append(module.training) if isinstance(module, TeacherLogits) else None)
    try:
        with caplog.at_level(logging.INFO, logger='test_throughput'):
            classification.throughput(session)
    finally:
        hook.remove()
    training = next(r.message for r in caplog.records if r.message.startswith('training:'))
    steps = int(re.search(r'(\d+) optimizer steps', training).group(1))
    assert f"the teacher {teacher}'s forward included" in training
    assert calls == [False] * (2 + steps)  # the 2 warm-up steps and every timed one, the teacher in eval mode


def test_distillation_under_torchrun_with_accumulation(data, teacher, tmp_path):
    """2 gloo processes, 2 micro-batches per optimizer step, Mixup: the teacher stays outside DDP."""
    proc = run_main(*train_args(data, tmp_path, 'TRAIN.ACCUMULATION_STEPS', '2', 'AUG.MIXUP', '0.8',
                                'DISTILL.TYPE', 'soft', 'DISTILL.TEACHER', str(teacher)), nproc=2)
    assert re.search(r'Train: \[0/1\]\[1/2\].* loss_cls [\d.]+ loss_distill [\d.]+', proc.stdout), proc.stdout
    final = last_checkpoint(tmp_path)
    assert final['step'] == 2 and 'weights_sha256' in final['identity']['teacher']


def test_building_a_teacher_leaves_the_random_state_alone(teacher):
    """The student is built after the teacher: with the same seed it starts from the same weights."""
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    build_teacher(str(teacher))
    assert torch.equal(torch.rand(3), expected)
