"""Image classification batches through NVIDIA DALI (DATA.LOADER dali): decoding and augmentation in
DALI pipelines, on the GPU (nvJPEG / the hardware decoder) or, with DEVICE cpu or no CUDA, on the CPU.

The recipe follows timm's ``create_transform`` as ``data.py`` calls it: random resized crop (fused
with decoding), resize, horizontal flip, RandAugment or colour jitter, normalisation, and random
erasing on the batch afterwards (as timm's PrefetchLoader does); evaluation resizes the shorter side
to IMG_SIZE / TEST.CROP_PCT and centre-crops.

What differs from the PyTorch loader (``data.build_train_loader`` over ``data.py``'s data sets):

* Order. The training reader shuffles with DALI's own schemes (see ``_reader``), not with
  ResumableSampler's permutation, so the two loaders see the epochs in different orders.
* RandAugment (``RandAugment``) uses timm's operations and magnitude ranges built from DALI's
  ``nvidia.dali.auto_aug`` blocks; what DALI does differently is listed there.
* Colour jitter (only without RandAugment, as in timm) applies brightness, contrast and saturation
  in that fixed order; torchvision's ColorJitter picks a random order per image.
* Resume is exact only through the loader's own ``state_dict`` (DALI's pipeline checkpoint): DALI
  cannot start an epoch at a sample index, see ``DaliTrainLoader.set_epoch``.

Errors (``_data_error``): DALI names the file or shard when a file cannot be read (the file reader:
"File mapping failed: PATH"), when a shard's index points past the end of a truncated tar or lists a
sample without an image or .cls member ("... index file at PATH line N"). It does not name the image
that its decoder cannot decode: its message names only the decoder operator and nvImageCodec's status
code, so the error says so and points to the PyTorch loader, which names unreadable files.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import dataclass
from typing import Iterator, List, Optional, Tuple

import numpy as np
import torch
from timm.data.random_erasing import RandomErasing

from utils import ConfigError, DataError, SampleError, UserInputError, rank_world

from .data import preprocessing

logger = logging.getLogger(__name__)

DALI_MISSING = ('DATA.LOADER dali needs NVIDIA DALI: pip install nvidia-dali-cuda130 '
                '(or the build for your CUDA version)')
IMAGE_EXTENSIONS = 'jpg;jpeg;png;bmp;tif;tiff;webp;pnm;ppm;pgm;pbm;jp2'  # the members a shard's image may be
READER = 'Reader'  # the reader operator's name, through which the iterator learns the epoch size


@dataclass
class FolderSplit:
    """One split of an ImageFolder: (path, class index) per image, and the class names."""
    samples: List[Tuple[str, int]]
    classes: List[str]


@dataclass
class ShardSplit:
    """One split in WebDataset tar shards: each sample is ``KEY.<image ext>`` plus ``KEY.cls``, the
    class index as zero-padded ASCII decimal of one width for the whole data set; beside each tar its
    DALI index (``wds2idx``)."""
    tars: List[str]
    indexes: List[str]
    samples: int
    classes: List[str]


def _require_dali():
    """Import NVIDIA DALI, or say how to install it."""
    try:
        import nvidia.dali  # noqa: F401
    except ImportError as error:
        raise UserInputError(DALI_MISSING) from error


# --- RandAugment ----------------------------------------------------------------------------------

MAGNITUDE_BINS = 101  # timm's magnitudes 0..10 in steps of 0.1: bin = round(10 * magnitude)


@dataclass(frozen=True)
class RandAugmentPolicy:
    """A timm RandAugment string, e.g. 'rand-m9-mstd0.5-inc1', with timm's defaults."""
    magnitude: int = 10  # m: 0..10 (timm clips larger values to 10)
    layers: int = 2  # n: operations drawn (with replacement) per image
    prob: float = 0.5  # p: each drawn operation is applied with this probability
    magnitude_std: float = 0.0  # mstd: per-application gaussian noise on m; inf (mstd > 100) = uniform in [0, m]
    increasing: bool = False  # inc: the variants whose strength increases with the magnitude

    @classmethod
    def parse(cls, policy: str) -> 'RandAugmentPolicy':
        sections = policy.split('-')
        if sections[0] != 'rand':
            raise ConfigError(f'AUG.AUTO_AUGMENT {policy!r}: DATA.LOADER dali supports RandAugment policies '
                              "('rand-m9-mstd0.5-inc1' and the like) or 'none'")
        values = {}
        for section in sections[1:]:
            parts = re.split(r'(\d.*)', section)
            key = parts[0]
            if len(parts) < 2 or key not in ('m', 'n', 'p', 'mstd', 'inc'):
                raise ConfigError(f'AUG.AUTO_AUGMENT {policy!r}: DATA.LOADER dali does not support the section '
                                  f'{section!r} (it knows m, n, p, mstd and inc)')
            values[key] = float(parts[1])
        std = values.get('mstd', 0.0)
        return cls(magnitude=min(max(int(values.get('m', 10)), 0), 10), layers=int(values.get('n', 2)),
                   prob=values.get('p', 0.5), magnitude_std=math.inf if std > 100 else std,
                   increasing=bool(values.get('inc', 0)))


def _rand_augment_suite(increasing: bool) -> list:
    """timm's RandAugment operations (``_RAND_INCREASING_TRANSFORMS`` / ``_RAND_TRANSFORMS``) with its
    magnitude ranges, as DALI augmentations whose bins 0..100 are timm's magnitudes 0..10, then the
    identity."""
    from nvidia.dali.auto_aug import augmentations as a
    from nvidia.dali.auto_aug.core import augmentation

    # DALI's own equalize and sharpness call the deprecated fn.experimental aliases, which warn on
    # every pipeline; these are the same with the operators' current names.
    equalize = augmentation(_equalize)
    sharpness = augmentation(_sharpen, randomly_negate=True, param_device='auto')
    geometric = [a.rotate.augmentation((0, 30), True), a.shear_x.augmentation((0, 0.3), True),
                 a.shear_y.augmentation((0, 0.3), True),
                 a.translate_x.augmentation((0, 0.45), True), a.translate_y.augmentation((0, 0.45), True)]
    if increasing:  # enhancements 1 -/+ 0.9 m/10, posterize keeps 4 - 4 m/10 bits, solarize threshold 256 - 256 m/10
        colour = [a.brightness.augmentation((0, 0.9), True, a.shift_enhance_range),
                  a.contrast.augmentation((0, 0.9), True, a.shift_enhance_range),
                  a.color.augmentation((0, 0.9), True, a.shift_enhance_range),
                  sharpness.augmentation((0, 0.9), True, a.sharpness_kernel),
                  a.posterize.augmentation((4, 0), False, a.poster_mask_uint8),
                  a.solarize.augmentation((256, 0), False)]
    else:  # enhancements 0.1 + 1.8 m/10, posterize keeps 4 m/10 bits, solarize threshold 256 m/10
        colour = [a.brightness.augmentation((0.1, 1.9), False, None),
                  a.contrast.augmentation((0.1, 1.9), False, None),
                  a.color.augmentation((0.1, 1.9), False, None),
                  sharpness.augmentation((0.1, 1.9), False, a.sharpness_kernel_shifted),
                  a.posterize.augmentation((0, 4), False, a.poster_mask_uint8),
                  a.solarize.augmentation((0, 256), False)]
    return [a.auto_contrast, equalize, a.invert, a.solarize_add.augmentation((0, 110)), *colour, *geometric,
            a.identity]


def _equalize(images, _):
    from nvidia.dali import fn
    return fn.equalize(images)


def _sharpen(images, kernel):
    from nvidia.dali import fn
    return fn.filter(images, kernel)


def _unconverted(augmentation):
    """``augmentation`` as a function that DALI's AutoGraph calls as it is (see RandAugment)."""
    from nvidia.dali.pipeline import do_not_convert
    return do_not_convert(lambda images, **kwargs: augmentation(images, **kwargs))


class RandAugment:
    """timm's RandAugment on a batch of uint8 HWC images of ``size`` x ``size``: ``policy.layers``
    times, draw one operation uniformly, a magnitude (m, with mstd noise, clipped to 0..10) and a
    random sign, and apply it with probability ``policy.prob``. Make it outside the pipeline
    definition and call it inside.

    What differs from timm's PIL operations: the geometric ones interpolate bilinearly (DALI's
    warp_affine and rotate offer linear or nearest only; timm uses DATA.INTERPOLATION) and fill
    with grey 128 (timm: the mean colour (124, 116, 104)); equalize follows OpenCV's formula, not
    PIL's; posterize keeps at least 1 bit (timm's m 10 keeps 0: a black image); noisy magnitudes
    are quantised to 0.1."""

    def __init__(self, policy: RandAugmentPolicy, size: int):
        self.policy, self.size = policy, size
        # The pipeline is traced with conditionals on (the selection is one), and AutoGraph would
        # convert, anew on every call, each function that DALI's augmentations call to tabulate their
        # parameters: about 6 s per pipeline instead of milliseconds. Functions made here, outside the
        # traced definition, and marked are called as they are; they branch on no DataNode.
        self.operations = [_unconverted(augmentation) for augmentation in _rand_augment_suite(policy.increasing)]

    def __call__(self, images):
        import nvidia.dali.math as dmath
        from nvidia.dali import fn, types
        from nvidia.dali.auto_aug.core import select, signed_bin

        policy = self.policy
        skip = len(self.operations) - 1  # the identity's index: taken when the drawn operation is not applied
        for _ in range(policy.layers):
            if policy.magnitude_std == 0:
                level = round(policy.magnitude * 10)
            else:
                if math.isinf(policy.magnitude_std):
                    magnitude = fn.random.uniform(range=[0.0, policy.magnitude])
                else:
                    magnitude = fn.random.normal(mean=policy.magnitude, stddev=policy.magnitude_std)
                level = fn.cast(dmath.clamp(magnitude * 10, 0, MAGNITUDE_BINS - 1), dtype=types.INT32)  # rounds
            drawn = fn.random.uniform(values=list(range(skip)), dtype=types.INT32)
            applied = fn.random.coin_flip(probability=policy.prob, dtype=types.INT32)
            images = select(self.operations, applied * drawn + (1 - applied) * skip, images,
                            magnitude_bin=signed_bin(level), num_magnitude_bins=MAGNITUDE_BINS,
                            shape=(self.size, self.size), fill_value=128)
        return images


# --- pipelines ------------------------------------------------------------------------------------

# DATA.INTERPOLATION -> DALI's interpolation ('box' and 'hamming' have none)
INTERPOLATIONS = {'nearest': 'INTERP_NN', 'bilinear': 'INTERP_LINEAR', 'bicubic': 'INTERP_CUBIC',
                  'lanczos': 'INTERP_LANCZOS3', 'random': None}


def _interpolation(name: str, training: bool):
    """DALI's counterpart of DATA.INTERPOLATION; 'random' is timm's per-image choice of bilinear or
    bicubic in training and bilinear in evaluation."""
    from nvidia.dali import fn, types
    if name != 'random':
        return getattr(types, INTERPOLATIONS[name])
    if not training:
        return types.INTERP_LINEAR
    return fn.cast(fn.random.choice([int(types.INTERP_LINEAR), int(types.INTERP_CUBIC)]), dtype=types.INTERP_TYPE)


def _reader(split, rank: int, world: int, training: bool, seed: int):
    """(encoded images, raw labels) of this process's shard of ``split``.

    Training: the folder reader draws a new global permutation of the whole split every epoch
    (``shuffle_after_epoch`` seeded with SEED, the same on every process) and each process reads its
    contiguous part of it. The shard reader visits the tars in a new order every epoch (same seed)
    and shuffles samples within a buffer of 1024 (``random_shuffle``): shards hold their samples in
    a shuffled order (data/shards/convert.py writes them so). Every epoch each process's share is padded
    with repeats to the same number of batches (``pad_last_batch``); the loader never yields them.
    Evaluation: each process reads its fixed contiguous share in order."""
    from nvidia.dali import fn
    common = dict(name=READER, shard_id=rank, num_shards=world, pad_last_batch=True, seed=seed,
                  stick_to_shard=not training)
    if training:
        common.update(shuffle_after_epoch=True, shuffle_after_epoch_seed=seed)
    if isinstance(split, FolderSplit):
        paths, labels = zip(*split.samples)
        return fn.readers.file(files=list(paths), labels=list(labels), **common)
    if training:
        common.update(random_shuffle=True)
    return fn.readers.webdataset(paths=split.tars, index_paths=split.indexes, ext=[IMAGE_EXTENSIONS, 'cls'],
                                 case_sensitive_extensions=False, missing_component_behavior='error', **common)


def _normalize(images, form: dict, crop: Optional[int] = None, mirror=None):
    """uint8 HWC -> float32 CHW normalised with the run's mean and std (``form``: ``preprocessing``),
    optionally centre-cropped and mirrored."""
    from nvidia.dali import fn, types
    extra = {'crop': (crop, crop), 'crop_pos_x': 0.5, 'crop_pos_y': 0.5} if crop else {}
    if mirror is not None:
        extra['mirror'] = mirror
    return fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout='CHW',
                                    mean=[255 * m for m in form['mean']], std=[255 * s for s in form['std']],
                                    **extra)


def _color_jitter(images, strength: float):
    """torchvision's ColorJitter(strength, strength, strength): brightness (scaling), contrast
    (blend with the mean grey level) and saturation, each factor uniform in [1 - s, 1 + s]."""
    from nvidia.dali import fn, types
    factors = dict(range=[max(0.0, 1 - strength), 1 + strength])
    images = fn.brightness(images, brightness=fn.random.uniform(**factors))
    mean = fn.reductions.mean(images, axis_names='HW', keep_dims=True)
    grey = fn.reductions.sum(mean * types.Constant(np.array([0.299, 0.587, 0.114], np.float32)), axis_names='C',
                             keep_dims=True)
    images = fn.cast(grey + (images - grey) * fn.random.uniform(**factors), dtype=types.UINT8)  # saturating
    return fn.saturation(images, saturation=fn.random.uniform(**factors))


def _build_pipeline(config, split, training: bool, rank: int, world: int, device_id: Optional[int],
                    checkpoint: Optional[bytes] = None):
    """The DALI pipeline of ``split`` for this process (DALI's iterator builds it); training pipelines
    can be checkpointed, and start from ``checkpoint`` when given."""
    from nvidia.dali import fn, pipeline_def, types

    size, form = config.DATA.IMG_SIZE, preprocessing(config)
    decoder = 'mixed' if device_id is not None else 'cpu'
    augment = (RandAugment(RandAugmentPolicy.parse(config.AUG.AUTO_AUGMENT), size)
               if training and config.AUG.AUTO_AUGMENT != 'none' else None)

    @pipeline_def(enable_conditionals=augment is not None)  # RandAugment's selection is a conditional
    def pipeline():
        encoded, labels = _reader(split, rank, world, training, config.SEED)
        interpolation = _interpolation(config.DATA.INTERPOLATION, training)
        if training:
            images = fn.decoders.image_random_crop(encoded, device=decoder, output_type=types.RGB,
                                                   random_area=list(config.AUG.SCALE),
                                                   random_aspect_ratio=[3 / 4, 4 / 3], num_attempts=10)
            images = fn.resize(images, resize_x=size, resize_y=size, interp_type=interpolation)
            if augment is not None:
                images = augment(images)
            elif config.AUG.COLOR_JITTER > 0:
                images = _color_jitter(images, config.AUG.COLOR_JITTER)
            # The flip comes last: timm flips before RandAugment, whose operations and random signs are
            # symmetric under a flip, so the distribution is the same.
            images = _normalize(images, form, mirror=fn.random.coin_flip(probability=config.AUG.HFLIP))
        else:
            images = fn.decoders.image(encoded, device=decoder, output_type=types.RGB)
            images = fn.resize(images, resize_shorter=math.floor(size / form['crop_pct']), interp_type=interpolation)
            images = _normalize(images, form, crop=size)
        return images, labels  # the labels stay on the host: the engine moves them

    # Augmentation draws differ per process; the reader's seed (SEED) is the same everywhere.
    seed = int(np.random.SeedSequence([config.SEED, rank]).generate_state(1)[0] >> 1)
    return pipeline(batch_size=config.DATA.BATCH_SIZE, num_threads=max(1, config.DATA.NUM_WORKERS),
                    device_id=device_id, seed=seed, prefetch_queue_depth=2, enable_checkpointing=training,
                    checkpoint=checkpoint)


# --- errors ---------------------------------------------------------------------------------------

def _data_error(error: RuntimeError, split, what: str) -> SampleError:
    """One line from DALI's error: the operator and the first line of what it encountered, with the
    tar beside a named index file. A :class:`SampleError`, which every process that meets it reports:
    DALI's iterator already reads batches while it is built, so a bad sample may surface there, in
    one process only."""
    lines = [line.strip() for line in str(error).splitlines()]
    operator = next((re.search(r'`([^`]+)`', line) for line in lines if line.startswith('Error in')), None)
    reason = ''
    if 'encountered:' in lines:
        after = lines[lines.index('encountered:') + 1:]
        reason = next((line for line in after if line and not line.startswith(('C++ context', 'Current pipeline'))), '')
    reason = re.sub(r'^Assert on ".*" failed: ', '', reason) or (lines[0] if lines else type(error).__name__)
    if isinstance(split, ShardSplit):
        for index, tar in zip(split.indexes, split.tars):
            if f'"{index}"' in reason:
                reason += f' (shard {tar})'
                break
    name = '.'.join(operator.group(1).split('.')[-2:]) if operator else 'pipeline'  # e.g. decoders.image
    message = f'{what}: DALI {name}: {reason}'
    if operator and '.decoders.' in operator.group(1):
        message += ' (DALI does not name the image it cannot decode; DATA.LOADER torch names unreadable files)'
    return SampleError(message)


def _labels(raw: torch.Tensor, split) -> torch.Tensor:
    """int64 class indices (B,): the folder reader's int32 labels, or a shard's .cls bytes (zero-padded
    ASCII decimal) read as numbers and checked against the class count."""
    if isinstance(split, FolderSplit) or len(raw) == 0:  # an evaluation batch of padding only is empty
        return raw.reshape(-1).long()
    digits = raw.long() - ord('0')
    if digits.numel() == 0 or ((digits < 0) | (digits > 9)).any():
        raise SampleError(f'a .cls member in the shards of {_describe(split)} is not zero-padded decimal digits')
    labels = (digits * 10 ** torch.arange(digits.shape[1] - 1, -1, -1)).sum(1)
    if labels.max() >= len(split.classes):
        raise SampleError(f'a .cls member in the shards of {_describe(split)} names class {int(labels.max())}; '
                          f'there are {len(split.classes)} classes')
    return labels


def _describe(split) -> str:
    if isinstance(split, ShardSplit):
        return os.path.dirname(split.tars[0]) if split.tars else 'no shards'
    paths = [split.samples[0][0], split.samples[-1][0]]
    return os.path.commonpath(paths)


def _split_size(split) -> int:
    return len(split.samples) if isinstance(split, FolderSplit) else split.samples


# --- loaders --------------------------------------------------------------------------------------

class _Batches:
    """One DALI pipeline behind DALI's PyTorch iterator, built when asked; DALI's errors become one-line
    errors. The iterator stops at the end of each DALI epoch and goes on with the next one when called
    again."""

    def __init__(self, config, split, training: bool, device_id: Optional[int], what: str):
        self.config, self.split, self.training, self.device_id, self.what = config, split, training, device_id, what
        self.rank, self.world = rank_world()
        self.iterator = None

    def build(self, checkpoint: Optional[bytes] = None) -> None:
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy
        try:
            pipe = _build_pipeline(self.config, self.split, self.training, self.rank, self.world, self.device_id,
                                   checkpoint)
            # PARTIAL: the padding repeats are cut from the last batch of each process's share.
            self.iterator = DALIGenericIterator(pipe, ['images', 'labels'], reader_name=READER,
                                                last_batch_policy=LastBatchPolicy.PARTIAL, auto_reset=True)
        except RuntimeError as error:
            raise _data_error(error, self.split, self.what) from error

    def next(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """The next batch of this epoch; StopIteration at its end (the next call starts the next epoch)."""
        try:
            batch = next(self.iterator)[0]
        except RuntimeError as error:
            raise _data_error(error, self.split, self.what) from error
        return batch['images'], _labels(batch['labels'], self.split)

    def drain(self) -> None:
        """Read to the end of the current epoch."""
        while True:
            try:
                self.next()
            except StopIteration:
                return


class DaliTrainLoader:
    """This process's training batches, an ``engine.TrainLoader`` that keeps its own position
    (``engine.StatefulLoader``): ``len()`` batches per epoch, equal on every process, each ``(images,
    labels)``: float32 (B, 3, H, W) normalised, int64 (B,); images on the GPU for GPU pipelines,
    labels on the host.

    DALI's epoch of a process is its share of the split padded to a whole number of batches; the
    loader yields the first ``len()`` and reads the rest before the next epoch starts. The position
    (epoch, batches yielded in it, DALI's pipeline checkpoint) travels through ``state_dict``."""

    def __init__(self, config, split, device_id: Optional[int]):
        self.batch_size = config.DATA.BATCH_SIZE
        self.num_samples = _split_size(split)
        self.classes = split.classes
        self.source = _Batches(config, split, True, device_id, f'training data {_describe(split)}')
        rank, world = rank_world()
        self.batches_per_epoch = self.num_samples // world // self.batch_size
        if self.batches_per_epoch == 0:
            raise DataError(f'DATA.BATCH_SIZE {self.batch_size} per process x {world} process(es) is larger '
                            f'than the {self.num_samples} training images: lower --batch-size')
        # What a DALI checkpoint fits: the same data, processes, batch, device and pipeline graph.
        self.layout = json.dumps({
            'dali': _dali_version(), 'format': type(split).__name__, 'samples': self.num_samples, 'rank': rank,
            'world': world, 'batch': self.batch_size, 'seed': config.SEED, 'size': config.DATA.IMG_SIZE,
            'gpu': device_id is not None, 'interpolation': config.DATA.INTERPOLATION,
            'aug': [config.AUG.AUTO_AUGMENT, config.AUG.COLOR_JITTER, list(config.AUG.SCALE), config.AUG.HFLIP]})
        self.erasing = None
        if config.AUG.REPROB > 0:
            self.erasing = RandomErasing(config.AUG.REPROB, mode=config.AUG.REMODE, max_count=config.AUG.RECOUNT,
                                         device='cuda' if device_id is not None else 'cpu')
        self.checkpoint: Optional[bytes] = None  # DALI's checkpoint to build the pipeline from
        self.epoch = 0  # the epoch the loader is in
        self.position = 0  # batches of it counted as consumed (yielded, or skipped by set_epoch)
        self.dali_batches = 0  # batches read from DALI's current epoch (DALI is at an epoch start when 0)

    def __len__(self) -> int:
        return self.batches_per_epoch

    def _ensure_built(self) -> None:
        if self.source.iterator is None:
            self.source.build(self.checkpoint)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Get ready to yield epoch ``epoch`` from its batch ``start_batch`` on. DALI cannot skip to a
        sample: the position comes from the restored checkpoint. A request for the epoch after one in
        progress finishes that one first, as an uninterrupted run does; any other request that does
        not match the loader's position (a checkpoint of the PyTorch loader, of another number of
        processes, or none) is served from the next DALI epoch with a warning, yielding only the
        remaining ``len() - start_batch`` batches."""
        self._ensure_built()
        if (epoch, start_batch) == (self.epoch, self.position):
            return
        if epoch == self.epoch + 1 and start_batch == 0 and self.position > 0:
            self._finish_epoch()  # the engine left epoch self.epoch before its end (steps_per_epoch < len())
            return
        logger.warning(f'the DALI loader is at epoch {self.epoch} batch {self.position}, but epoch {epoch} is to go '
                       f'on from batch {start_batch}: DALI cannot skip to a sample, so the data order of this epoch is not '
                       f'the one of an uninterrupted run; its remaining {len(self) - start_batch} batches come from a '
                       'fresh DALI epoch')
        if self.dali_batches:
            self.source.drain()
        self.epoch, self.position, self.dali_batches = epoch, start_batch, 0

    def _finish_epoch(self) -> None:
        """Read the rest of DALI's epoch and stand at the start of the next one."""
        if self.dali_batches:
            self.source.drain()
        self.epoch, self.position, self.dali_batches = self.epoch + 1, 0, 0

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        self._ensure_built()
        while self.position < self.batches_per_epoch:
            images, labels = self.source.next()
            self.position += 1
            self.dali_batches += 1
            if self.erasing is not None:
                images = self.erasing(images)
            yield images, labels
        self._finish_epoch()

    def state_dict(self) -> dict:
        """This process's position as plain data: DALI's pipeline checkpoint (bytes; the iterator's
        accounts for the batches it prefetched, so it resumes right after the last batch yielded), the
        epoch and batches consumed, and what the checkpoint fits."""
        checkpoint = self.source.iterator.checkpoints()[0] if self.source.iterator is not None else self.checkpoint
        return {'dali': checkpoint, 'epoch': self.epoch, 'position': self.position,
                'dali_batches': self.dali_batches, 'layout': self.layout}

    def load_state_dict(self, state: dict) -> None:
        """Resume from ``state_dict()``'s position, before the first iteration. A checkpoint of other data,
        processes, batch size, device, pipeline or DALI version is not used (``set_epoch`` then warns)."""
        if self.source.iterator is not None:
            raise RuntimeError('load_state_dict must come before the DALI loader is first used')
        if state.get('layout') != self.layout:
            logger.warning('the saved DALI loader position belongs to other data, processes, batch size, device, '
                           'augmentation or DALI version; the loader starts afresh')
            return
        self.checkpoint = state['dali']
        self.epoch, self.position, self.dali_batches = state['epoch'], state['position'], state['dali_batches']


class DaliEvalLoader:
    """This process's evaluation batches: its contiguous share of the split, in order, every sample of
    the split once over all processes; the last batch may be smaller, and the number of batches may
    differ by one between processes."""

    def __init__(self, config, split, device_id: Optional[int]):
        rank, world = rank_world()
        self.num_samples = _split_size(split)
        self.classes = split.classes
        self.batch_size = config.DATA.BATCH_SIZE
        share = (rank + 1) * self.num_samples // world - rank * self.num_samples // world  # DALI's shard size
        self.length = math.ceil(share / self.batch_size)
        self.source = _Batches(config, split, False, device_id, f'validation data {_describe(split)}')
        self.in_epoch = False  # a pass was left before its end: the next one reads the rest first

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        if self.source.iterator is None:
            self.source.build()
        if self.in_epoch:
            self.source.drain()
        self.in_epoch = True
        while True:
            try:
                images, labels = self.source.next()
            except StopIteration:
                break
            if len(labels):  # a share one sample short of the others ends with a batch of padding only
                yield images, labels
        self.in_epoch = False


def _dali_version() -> str:
    import nvidia.dali
    return nvidia.dali.__version__


def build_dali_loaders(config, train, val) -> Tuple[DaliTrainLoader, DaliEvalLoader]:
    """(training loader, validation loader) of this process for ``train`` and ``val`` (each a
    :class:`FolderSplit` or :class:`ShardSplit`), decoding on the GPU unless DEVICE is cpu or no GPU
    is visible. Pipelines are built on first use."""
    _require_dali()
    gpu = config.DEVICE != 'cpu' and torch.cuda.is_available()
    device_id = torch.cuda.current_device() if gpu else None
    return DaliTrainLoader(config, train, device_id), DaliEvalLoader(config, val, device_id)


def check_settings(config) -> None:
    """The settings DALI's pipelines cannot follow, as a ConfigError (``classification.check_config``
    calls it with the config, before any data is read; it needs no DALI installed)."""
    if config.DATA.SKIP_CORRUPT:
        raise ConfigError('DATA.SKIP_CORRUPT cannot be followed by DATA.LOADER dali: DALI stops at an image it cannot '
                          'decode and does not say which; use DATA.LOADER torch to skip (and count) unreadable images')
    if config.DATA.INTERPOLATION not in INTERPOLATIONS:
        raise ConfigError(f'DATA.INTERPOLATION {config.DATA.INTERPOLATION} has no DALI counterpart: with DATA.LOADER '
                          f'dali use {", ".join(INTERPOLATIONS)}')
    if config.AUG.AUTO_AUGMENT != 'none':
        RandAugmentPolicy.parse(config.AUG.AUTO_AUGMENT)
