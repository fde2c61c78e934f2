"""Weights in the ecosystem's form: the Hugging Face Hub folder that timm reads (``config.json``,
``model.safetensors``, a model card), and the one reader of weights that every command uses.

A folder written here loads anywhere this package is importable (it registers ``fat_b0`` ..
``fat_b3`` with timm)::

    import models, timm
    model = timm.create_model('local-dir:fat_b0_digits', pretrained=True)   # or 'hf-hub:org/name'

timm writes ``config.json`` and ``model.safetensors`` (``save_for_hf``); this module checks the folder
by loading it back the same way before it takes the destination's name.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Dict, Sequence

import timm
import torch
import torch.nn as nn
from timm.models import load_state_dict_from_hf, save_for_hf
from timm.models._hub import load_state_dict_from_path

from utils import CheckpointError, ExportError, UserInputError, load_checkpoint_file

from .fat import checkpoint_filter_fn

HUB_PREFIXES = ('local-dir:', 'hf-hub:')
TOLERANCE = 1e-4  # max |logit difference| the folder, loaded through timm, may show against the model


def is_hub_id(spec: str) -> bool:
    """Whether ``spec`` names a Hub folder (``local-dir:DIR`` or ``hf-hub:ORG/NAME``) rather than a file."""
    return spec.startswith(HUB_PREFIXES)


def read_weights(spec: str) -> Dict[str, torch.Tensor]:
    """The state dict that ``spec`` names, in this model's key layout: a Hub folder (``local-dir:DIR``,
    ``hf-hub:ORG/NAME``: its ``model.safetensors``) or a checkpoint file (this project's, the
    authors', or a bare state dict). Anything unreadable is one ``CheckpointError`` naming ``spec``."""
    if not is_hub_id(spec):
        return checkpoint_filter_fn(load_checkpoint_file(spec))
    kind, _, where = spec.partition(':')
    try:
        if kind == 'local-dir':
            if not os.path.isdir(where):
                raise CheckpointError(f'{spec}: no such folder')
            return load_state_dict_from_path(where, weights_only=True)
        return load_state_dict_from_hf(where, weights_only=True)
    except CheckpointError:
        raise
    except Exception as error:  # timm, huggingface_hub and safetensors raise their own kinds
        raise CheckpointError(f'cannot read the weights of {spec}: {describe(error)}') from error


def create_from_hub(spec: str, **kwargs) -> nn.Module:
    """``timm.create_model(spec, pretrained=True)`` for a Hub id, its failures one ``CheckpointError``."""
    if spec.startswith('local-dir:') and not os.path.isfile(os.path.join(spec.partition(':')[2], 'config.json')):
        raise CheckpointError(f'{spec}: no config.json there (not a folder written by --export DIR or timm)')
    try:
        return timm.create_model(spec, pretrained=True, **kwargs)
    except Exception as error:
        raise CheckpointError(f'cannot build {spec}: {describe(error)}') from error


def describe(error: Exception) -> str:
    """An exception of another library in one line: its first two lines, at most 300 characters."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    text = ' '.join(lines[:2]) or type(error).__name__
    return text if len(text) <= 300 else text[:297] + '...'


def check_folder_destination(folder: Path) -> None:
    """``folder`` can be created (or is empty) in a writable place; else one error naming the problem.
    A folder that holds files is never written over."""
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise UserInputError(f'--export {folder}: exists and is not an empty folder; name a new one (nothing is '
                             'written over)')
    parent = folder.parent
    if not os.access(parent, os.W_OK | os.X_OK) or not parent.is_dir():
        raise UserInputError(f'--export {folder}: cannot write in {parent}')


def write_folder(model: nn.Module, folder: Path, preprocessing: dict, label_names: Sequence[str],
                 model_args: dict, card: str, logger) -> float:
    """Write ``model`` (eval mode, on the CPU, PyTorch's depthwise convs) as a Hub folder at ``folder``:
    ``model.safetensors``, timm's ``config.json`` (``model_args`` rebuild it; ``preprocessing`` and the
    class names describe its input and output) and ``README.md`` (``card``). The folder is written under
    a temporary name beside ``folder``, loaded back with ``timm.create_model('local-dir:...',
    pretrained=True)`` and run on random images at its input size and a non-square one; it takes
    ``folder``'s name only when it reproduces the model's logits. Returns the max |logit difference|."""
    check_folder_destination(folder)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f'.{folder.name}.export-'))
    try:
        save_for_hf(model, str(staging), model_config={'label_names': list(label_names)}, model_args=model_args,
                    safe_serialization=True, data_config=preprocessing)
        (staging / 'README.md').write_text(card)
        difference = _check_folder(model, staging, preprocessing['input_size'], logger, folder)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staging, 0o777 & ~umask)  # mkdtemp's 0700 otherwise
        for written in staging.iterdir():
            os.chmod(written, 0o666 & ~umask)  # safetensors writes 0600
        os.replace(staging, folder)  # an empty folder is replaced; the destination was checked to be one
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return difference


@torch.no_grad()
def _check_folder(model: nn.Module, staging: Path, input_size: Sequence[int], logger, folder: Path) -> float:
    loaded = create_from_hub(f'local-dir:{staging}').eval()
    channels, height, width = input_size
    worst = 0.0
    for shape in ((2, channels, height, width), (1, channels, height, width + 32)):
        images = torch.randn(shape)
        difference = (loaded(images) - model(images)).abs().max().item()
        logger.info(f'{folder}: input {shape}, max |logit difference| of timm.create_model(local-dir:) against '
                    f'the model {difference:.2e}')
        if not difference <= TOLERANCE:  # NaN too
            raise ExportError(f'{folder} was not written: the folder, loaded through timm, does not reproduce the '
                              f'model (max |logit difference| {difference:.3g} at input {shape}, tolerance '
                              f'{TOLERANCE:g})')
        worst = max(worst, difference)
    return worst
