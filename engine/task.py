"""What a task supplies to the engine (:class:`Task`, :class:`TaskData`), and where one process of a
run stands (:class:`Session`)."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Dict, Iterable, Iterator, Optional, Protocol, Tuple, runtime_checkable

import torch
import torch.nn as nn

from utils import FolderLock


@dataclass
class Session:
    """One process's part of a run: its config, place among the processes, device, folder and log."""
    config: object
    rank: int
    world_size: int
    device: torch.device
    out_dir: str
    logger: logging.Logger
    run_lock: Optional[FolderLock] = None  # the run folder's lock, held by a training run's rank 0


@runtime_checkable
class TrainLoader(Protocol):
    """A process's training batches, resumable at a batch: what ``TaskData.train`` is. The engine
    counts its position in the batches this loader yields, never in samples. ``data.build_train_loader``
    (PyTorch's) and ``classification.dali.DaliTrainLoader`` implement it."""

    def __len__(self) -> int:
        """Batches per epoch: the same on every process, whatever ``set_epoch`` was told."""

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """The next iteration yields epoch ``epoch`` from its batch ``start_batch`` on (the ones before
        were trained on before a resume)."""

    def __iter__(self) -> Iterator:
        """The batches of the epoch ``set_epoch`` named, from its ``start_batch``."""


@runtime_checkable
class StatefulLoader(Protocol):
    """A :class:`TrainLoader` that keeps its own position in the checkpoints (DALI's, which cannot
    start an epoch at a batch): the engine saves ``state_dict()`` per process and gives it back to
    ``load_state_dict`` on resume, before ``set_epoch``."""

    def state_dict(self) -> dict:
        """This process's position, as plain data."""

    def load_state_dict(self, state: dict) -> None:
        """Resume from ``state_dict()``'s position."""


@dataclass
class TaskData:
    """A task's data for this process."""
    train: TrainLoader
    val: Iterable  # data.build_eval_loader: every sample once over all processes
    identity: dict  # what makes the data set itself (classes, size): a run folder holds one
    description: str  # one line for the log


class Task:
    """What a task supplies: its data, model, loss and metric. ``session`` gives its config, device
    and log."""

    #: the key of ``evaluate``'s result that picks ckpt_best.pth (higher is better)
    primary_metric: str = ''
    #: the config sections whose keys make what a run trains: named when a run folder or --resume differs
    identity_sections: Tuple[str, ...] = ('MODEL.', 'DATA.')
    #: config keys that say how a run of this task is launched, beyond the engine's own
    #: (``checkpoints.LAUNCH_KEYS``): never reported as changed on resume
    launch_keys: Tuple[str, ...] = ()

    def __init__(self, session: Session):
        self.session = session
        self.config = session.config
        self.device = session.device
        self.logger = session.logger

    def check_config(self) -> None:
        """Raise ValueError naming what in the config cannot work (an architecture that cannot be
        built), before the run folder is claimed and any data is read. Nothing by default."""

    def build_data(self) -> TaskData:
        """Training and evaluation data; may set config keys that follow the data (class count). It
        runs in a thread while the processes wait for each other (``utils.prepare_together``): it may
        take long on one process, and must not use the process group."""
        raise NotImplementedError

    def build_model(self) -> nn.Module:
        """The network on the CPU, pretrained weights loaded when MODEL.PRETRAINED is given."""
        raise NotImplementedError

    def on_device(self, model: nn.Module) -> None:
        """Called by every process once ``model`` is on the run's device and memory format, before
        DDP and ``torch.compile`` wrap it: the place to choose its kernels. May use the process group;
        nothing by default."""

    def images_to_device(self, images: torch.Tensor) -> torch.Tensor:
        """A batch of images on the run's device, channels_last with CHANNELS_LAST (as the model is)."""
        images = images.to(self.device, non_blocking=True)
        return images.contiguous(memory_format=torch.channels_last) if self.config.CHANNELS_LAST else images

    def loss(self, model: nn.Module, batch) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """(total loss, its parts) of one training batch; runs under the engine's autocast."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module, loader) -> Dict[str, float]:
        """Metrics over the whole evaluation set, the same on every process; runs in eval mode under
        the engine's ``no_grad`` and autocast."""
        raise NotImplementedError

    def summary(self, metrics: Dict[str, float]) -> str:
        """The log line of an evaluation."""
        return ', '.join(f'{name} {value:.4f}' for name, value in metrics.items())

    def identity(self) -> dict:
        """What else the run's checkpoints must share beyond the architecture and the data (called
        after ``build_data``): a run is never resumed with other entries, e.g. another distillation
        teacher. Empty by default."""
        return {}

    def weights(self, checkpoint: dict) -> dict:
        """The model's state dict inside a checkpoint file."""
        return checkpoint.get('model', checkpoint)

    def for_inference(self, model: nn.Module) -> nn.Module:
        """The model that --eval runs (after its weights are loaded)."""
        return model
