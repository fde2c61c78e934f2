"""Knowledge distillation in DeiT's form, for a model with one head: a frozen teacher's logits on the
student's own (augmented, mixed) batch, and the loss that blends them into the training loss.

    soft: KL(softmax(teacher / TAU) || softmax(student / TAU)) x TAU^2   (DeiT's soft distillation)
    hard: cross-entropy of the student against the teacher's top class   (DeiT's hard distillation)
    loss = (1 - ALPHA) x classification + ALPHA x distillation

The teacher is a timm model (by name, with a weights file or timm's own pretrained weights), a Hub
folder (``local-dir:DIR``, ``hf-hub:ORG/NAME``) or a training checkpoint of this project. It runs in
eval mode without gradients; its class count, input channels and resolution are checked against the
student's, and a teacher normalised otherwise than the student's data gets the batch renormalised.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from yacs.config import CfgNode

from models import build_model, checkpoint_filter_fn
from models.hub import create_from_hub, describe, is_hub_id
from utils import CheckpointError, ConfigError, data_record, load_checkpoint_file, load_weights

from .data import preprocessing


@dataclass
class Teacher:
    """A frozen teacher and what it expects of its input."""
    model: nn.Module  # eval mode, no gradients, on the CPU
    name: str  # DISTILL.TEACHER
    num_classes: int
    label_names: Optional[Sequence[str]]  # its classes' names, when its source records them
    input_size: Tuple[int, int, int]  # (channels, height, width) it was trained at
    fixed_input_size: bool  # whether it only takes input_size
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    fingerprint: str  # sha256 of its weights: a run resumes only with the teacher it started with

    @property
    def identity(self) -> dict:
        """What a run's checkpoints record: the weights, whatever path or id names them."""
        return {'weights_sha256': self.fingerprint}


def _from_checkpoint(path: str) -> Tuple[nn.Module, dict, Optional[list]]:
    """A FAT of this project's training checkpoint ``path``, built from the config inside it."""
    checkpoint = load_checkpoint_file(path)
    if not isinstance(checkpoint.get('config'), str) or 'model' not in checkpoint:
        raise CheckpointError(f'DISTILL.TEACHER {path} is not a training checkpoint of this project (it holds no '
                              'config); for other weights name the architecture: DISTILL.TEACHER fat_b1 '
                              f'DISTILL.TEACHER_WEIGHTS {path}')
    try:
        saved = CfgNode.load_cfg(checkpoint['config'])  # the whole config of its run
        saved.defrost()
        state = checkpoint_filter_fn(checkpoint)
        saved.MODEL.NUM_CLASSES = state['head.weight'].shape[0]
        saved.MODEL.DWCONV_IMPL = 'auto'
        model = build_model(saved)
        form = {**preprocessing(saved), 'fixed_input_size': False}
    except (KeyError, AttributeError, TypeError, ValueError) as error:  # a classifier-less or older run's file
        raise CheckpointError(f'DISTILL.TEACHER {path}: cannot rebuild a classifier from the config and weights '
                              f'inside ({type(error).__name__}: {describe(error)})') from error
    load_weights(model, state, f'the teacher\'s weights {path}', type(model).__name__)
    classes = data_record(checkpoint).get('classes')
    return model, form, classes


def _from_timm_name(name: str, weights: str) -> nn.Module:
    """timm's ``name`` with the weights file ``weights`` (its classifier sized from the file), or with
    timm's own pretrained weights (downloaded when not cached)."""
    if not timm.is_model(name.split('.')[0]):
        raise ConfigError(f'DISTILL.TEACHER {name!r} is neither a timm model name, a local-dir:DIR / hf-hub:ORG/NAME '
                          'folder nor an existing checkpoint file')
    if not weights:
        try:
            return timm.create_model(name, pretrained=True)
        except Exception as error:
            raise CheckpointError(f'cannot get the pretrained weights of DISTILL.TEACHER {name} (offline? give a '
                                  f'weights file as DISTILL.TEACHER_WEIGHTS): {describe(error)}') from error
    if not os.path.isfile(weights):
        raise CheckpointError(f'DISTILL.TEACHER_WEIGHTS {weights}: no such file')
    try:  # weights only (no code runs); unwraps 'state_dict', 'model' and EMA
        state = timm.models.load_state_dict(weights, weights_only=True)
    except Exception as error:
        raise CheckpointError(f'cannot read DISTILL.TEACHER_WEIGHTS {weights}: {describe(error)}') from error
    with torch.device('meta'):
        classifier = timm.create_model(name).pretrained_cfg.get('classifier', 'head')
    head = state.get(f'{classifier}.weight')
    model = timm.create_model(name, num_classes=head.shape[0] if head is not None else 1000)
    load_weights(model, state, f'the teacher\'s weights {weights}', type(model).__name__)
    return model


def fingerprint(model: nn.Module) -> str:
    """sha256 of ``model``'s state dict: names, dtypes, shapes and bytes."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(f'{name}:{tensor.dtype}:{tuple(tensor.shape)};'.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def build_teacher(name: str, weights: str = '') -> Teacher:
    """The teacher ``name`` (DISTILL.TEACHER) names, frozen, with ``weights`` (DISTILL.TEACHER_WEIGHTS)
    for a timm model name. The global random state is left as it was: a run's student starts from the
    same weights with a teacher as without."""
    if weights and (is_hub_id(name) or os.path.isfile(name)):
        raise ConfigError(f'DISTILL.TEACHER_WEIGHTS is for a teacher named by its timm model name; {name} brings '
                          'its own weights')
    with torch.random.fork_rng(devices=[]):
        return _build_teacher(name, weights)


def _build_teacher(name: str, weights: str) -> Teacher:
    classes = None
    if is_hub_id(name):
        model = create_from_hub(name)
        form = model.pretrained_cfg
        classes = form.get('label_names')
    elif os.path.isfile(name):
        model, form, classes = _from_checkpoint(name)
    else:
        model = _from_timm_name(name, weights)
        form = model.pretrained_cfg
    model.eval().requires_grad_(False)
    return Teacher(model, name, model.num_classes, list(classes) if classes else None, tuple(form['input_size']),
                   bool(form.get('fixed_input_size', False)), tuple(form['mean']), tuple(form['std']),
                   fingerprint(model))


class TeacherLogits(nn.Module):
    """The teacher's logits for a batch normalised for the student (``mean``, ``std``): renormalised
    when the teacher was trained with other statistics."""

    def __init__(self, teacher: Teacher, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.model = teacher.model
        self.renormalise = tuple(mean) != teacher.mean or tuple(std) != teacher.std
        if self.renormalise:  # x_teacher = (x * std + mean - teacher_mean) / teacher_std
            scale = torch.tensor(std) / torch.tensor(teacher.std)
            shift = (torch.tensor(mean) - torch.tensor(teacher.mean)) / torch.tensor(teacher.std)
            self.register_buffer('scale', scale.view(1, -1, 1, 1), persistent=False)
            self.register_buffer('shift', shift.view(1, -1, 1, 1), persistent=False)
        self.eval()

    def train(self, mode: bool = True) -> 'TeacherLogits':
        return super().train(False)  # always in eval mode: BatchNorm statistics and dropout stay fixed

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images * self.scale + self.shift if self.renormalise else images)


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str, tau: float) -> torch.Tensor:
    """DeiT's distillation term of ``student``'s logits against ``teacher``'s: 'soft' or 'hard'."""
    if kind == 'soft':
        return F.kl_div(F.log_softmax(student / tau, dim=1), F.log_softmax(teacher / tau, dim=1),
                        reduction='sum', log_target=True) * (tau * tau) / student.numel()
    return F.cross_entropy(student, teacher.argmax(dim=1))
