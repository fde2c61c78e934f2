"""--export: the model with a checkpoint's weights as a checked .onnx or .pt2 file, or as a Hugging
Face Hub folder with a model card."""
from __future__ import annotations

import datetime
from pathlib import Path
from typing import List

import torch.nn as nn
from yacs.config import CfgNode

import engine
from engine.checkpoints import LAUNCH_KEYS, config_changes
from models import count_macs
from models.export import check_destination, deployable, export as export_model
from models.hub import check_folder_destination, write_folder
from utils import UserInputError, data_record, load_checkpoint_file

from .config import recipe_defaults
from .data import preprocessing
from .task import Classification, deploy_form


def export(session: engine.Session) -> None:
    """Write the model with MODEL.RESUME's weights (else fresh ones), in deploy form with REPARAM, to
    EXPORT: a .onnx or .pt2 file checked against PyTorch at DATA.IMG_SIZE and a non-square size, or,
    for a path without a suffix, a Hugging Face Hub folder with a model card, checked by loading it
    back through timm."""
    config, logger = session.config, session.logger
    path = Path(config.EXPORT)
    to_folder = not path.suffix or config.EXPORT.endswith('/') or path.is_dir()
    check_folder_destination(path) if to_folder else check_destination(path)
    if session.world_size > 1:
        raise UserInputError('--export runs in one process; start it without torchrun')
    if config.MODEL.DWCONV_IMPL == 'cuda':
        logger.info('--export writes PyTorch depthwise convs: our kernels (MODEL.DWCONV_IMPL cuda) are never exported')
    task = Classification(session)
    engine.check_config(task)
    model = engine.build_model(task)
    checkpoint = load_checkpoint_file(config.MODEL.RESUME) if config.MODEL.RESUME else {}
    if checkpoint:
        engine.load_weights(model, task.weights(checkpoint), config.MODEL.RESUME)
    else:
        logger.info('--export without --resume writes freshly initialised weights')
    model = deploy_form(config, model.eval(), logger)
    if not to_folder:
        export_model(model, path, config.DATA.IMG_SIZE, logger)
        return
    classes = data_record(checkpoint).get('classes') or []
    difference = write_folder(deployable(model), path, preprocessing(config), classes,
                              {'dwconv_impl': 'auto', **({'reparameterized': True} if config.REPARAM else {})},
                              model_card(config, model, checkpoint, path.name), logger)
    logger.info(f'wrote {path}: model.safetensors, config.json ({len(classes) or "no"} class names), README.md; '
                f'timm.create_model("local-dir:{path}", pretrained=True) reproduces the model (max |logit '
                f'difference| {difference:.1e})')


# Keys whose values are local paths: a card names only the file (or folder) at their end.
_PATH_KEYS = ('DISTILL.TEACHER', 'DISTILL.TEACHER_WEIGHTS')


def _recipe(variant: str, run: CfgNode) -> List[str]:
    """The training keys in which ``run`` differs from ``variant``'s config, as 'KEY default -> run'."""
    recipe = []
    for change in config_changes(recipe_defaults(variant).dump(), run, LAUNCH_KEYS + Classification.launch_keys):
        key = change.split(' ', 1)[0]
        if not key.startswith(('MODEL.', 'DATA.', 'TRAIN.', 'AUG.', 'TEST.', 'DISTILL.', 'AMP_', 'SEED')) or \
                key in ('MODEL.NAME', 'MODEL.PRETRAINED'):
            continue
        if key in _PATH_KEYS:
            change = f'{key} {_without_folders(str(run.DISTILL[key.split(".")[1]]))!r}'
        recipe.append(change)
    return recipe


def _without_folders(value: str) -> str:
    """A local path (or local-dir: id) reduced to its last component; Hub ids and names as they are."""
    if value.startswith('hf-hub:') or '/' not in value:
        return value
    prefix = 'local-dir:' if value.startswith('local-dir:') else ''
    return prefix + value.rstrip('/').rsplit('/', 1)[-1]


def model_card(config, model: nn.Module, checkpoint: dict, name: str) -> str:
    """The README.md of an exported folder: the variant, size and cost, the data set, the recipe (the
    keys in which the run's config differs from its variant's), the final and best metrics, the date."""
    size = config.DATA.IMG_SIZE
    macs = count_macs(model, (config.DATA.IN_CHANS, size, size)) / 1e9
    record = data_record(checkpoint)
    run = CfgNode.load_cfg(checkpoint['config']) if isinstance(checkpoint.get('config'), str) else None
    recipe = _recipe(config.MODEL.VARIANT, run) if run is not None else None
    metrics = checkpoint.get('metrics') or {}
    form = preprocessing(config)
    lines: List[str] = [
        '---', 'library_name: timm', 'tags: [image-classification, timm, fat]', '---', '',
        f'# {name}', '',
        f'FAT ({config.MODEL.VARIANT}), the Fully Adaptive Transformer of "Lightweight Vision Transformer with '
        'Bidirectional Interaction" (NeurIPS 2023, arXiv:2306.00396), trained with the FAT training codebase.', '',
        '| | |', '|---|---|',
        f'| variant | {config.MODEL.VARIANT}' + ''.join(f', {k} {list(v)}' for k, v in config.MODEL.FAT.items() if v)
        + ' |',
        f'| parameters | {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M |',
        f'| GMACs | {macs:.3f} at {size} x {size} |',
        f'| input | {form["input_size"][0]} x {size} x {size}, mean {list(form["mean"])}, std {list(form["std"])}, '
        f'{form["interpolation"]} resize, crop_pct {form["crop_pct"]} |',
        f'| form | {"deploy: BatchNorms and depthwise residuals folded into the convs" if config.REPARAM else "training"} |',
        f'| data | {config.DATA.DATASET}'
        + (f': {record["train_images"]:,} training images, {len(record["classes"])} classes |' if record else
           f', {config.MODEL.NUM_CLASSES} classes (not recorded with these weights) |'),
        f'| exported | {datetime.date.today().isoformat()} |', '',
        '## Metrics', '',
    ]
    if metrics and run is not None:
        epoch, complete = checkpoint['epoch'], checkpoint['step'] >= checkpoint['steps_per_epoch']
        lines += [('' if complete else f'These weights were saved in the middle of epoch {epoch + 1} (a stop); ')
                  + f'evaluated after epoch {epoch + 1 if complete else epoch} of {run.TRAIN.EPOCHS}: top-1 '
                  f'{metrics["acc1"]:.2f}%, top-5 {metrics["acc5"]:.2f}% on {int(metrics["images"]):,} validation '
                  f'images; best top-1 of the run {checkpoint["best_metric"]:.2f}%.']
    else:
        lines += ['Not recorded: these weights came without an evaluation by this project.']
    lines += ['', '## Recipe', '']
    if recipe is None:
        lines += ['Not recorded.']
    else:
        lines += [f'The run\'s config differs from `configs/{config.MODEL.VARIANT}_224.yaml` (and the defaults of '
                  '`config.py`) in:' if recipe else f'`configs/{config.MODEL.VARIANT}_224.yaml`, unchanged.', '']
        lines += [f'- `{change}`' for change in recipe]
    lines += ['', '## Use', '', '```python', 'import models  # the FAT codebase\'s models package registers FAT with timm',
              'import timm', f"model = timm.create_model('local-dir:{name}', pretrained=True).eval()",
              'config = timm.data.resolve_data_config(model=model)',
              'transform = timm.data.create_transform(**config)', '```', '']
    return '\n'.join(lines)
