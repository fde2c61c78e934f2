"""Checkpoints, distributed set-up and reductions, and small helpers for main.py."""
from __future__ import annotations

import glob
import logging
import os
import resource
from typing import Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn

from models import checkpoint_filter_fn

CHECKPOINT_LAST = 'ckpt_last.pth'
CHECKPOINT_BEST = 'ckpt_best.pth'


# --- distributed -------------------------------------------------------------------------------

def init_distributed(device_name: str) -> Tuple[int, int, torch.device]:
    """(rank, world size, device). Under torchrun (single or multi node) joins the process group,
    NCCL on CUDA and gloo on CPU; a plain ``python main.py`` runs as one process without one."""
    use_cuda = device_name == 'cuda' or (not device_name and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError('DEVICE is cuda but no CUDA device is visible; use --device cpu')
    local_rank = int(os.environ.get('LOCAL_RANK', 0))
    device = torch.device('cuda', local_rank) if use_cuda else torch.device('cpu')
    if use_cuda:
        torch.cuda.set_device(device)
    if 'RANK' in os.environ and int(os.environ.get('WORLD_SIZE', 1)) > 1:
        dist.init_process_group('nccl' if use_cuda else 'gloo', device_id=device if use_cuda else None)
        return dist.get_rank(), dist.get_world_size(), device
    return 0, 1, device


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all processes (in place, returned)."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module inside DDP and torch.compile wrappers."""
    model = getattr(model, '_orig_mod', model)
    model = getattr(model, 'module', model)
    return getattr(model, '_orig_mod', model)


def memory_used_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated, or the process's peak resident memory on CPU, in MB."""
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --- checkpoints -------------------------------------------------------------------------------

def atomic_save(obj: dict, path: str) -> None:
    """torch.save to a temporary file beside ``path``, flushed to disk, then renamed over it: a
    crash leaves either the old file or the new one, never a torn one."""
    tmp = f'{path}.tmp{os.getpid()}'
    try:
        with open(tmp, 'wb') as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    dir_fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_checkpoint(out_dir: str, state: dict, epoch: int, is_best: bool, save_freq: int, total_epochs: int,
                    logger: logging.Logger) -> None:
    """Write ckpt_epoch_N.pth every ``save_freq`` epochs, ckpt_best.pth when ``is_best``, and always
    ckpt_last.pth, last, so that it is the newest file."""
    if save_freq > 0 and ((epoch + 1) % save_freq == 0 or epoch + 1 == total_epochs):
        atomic_save(state, os.path.join(out_dir, f'ckpt_epoch_{epoch}.pth'))
    if is_best:
        atomic_save(state, os.path.join(out_dir, CHECKPOINT_BEST))
    last = os.path.join(out_dir, CHECKPOINT_LAST)
    atomic_save(state, last)
    logger.info(f'saved {last} (epoch {epoch})')


def find_resume_checkpoint(out_dir: str) -> Optional[str]:
    """The newest training checkpoint in ``out_dir`` (ckpt_best.pth aside), or None."""
    candidates = [p for p in glob.glob(os.path.join(out_dir, 'ckpt_*.pth'))
                  if os.path.basename(p) != CHECKPOINT_BEST]
    return max(candidates, key=os.path.getmtime) if candidates else None


def load_checkpoint_file(path: str) -> dict:
    """Load a checkpoint without running code from it (weights_only)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f'checkpoint not found: {path}')
    return torch.load(path, map_location='cpu', weights_only=True)


def load_model_weights(model: nn.Module, path: str, logger: logging.Logger, drop_head: bool = False) -> dict:
    """Load weights from this project's checkpoints, the authors' ({'model': ...} with their keys)
    or a bare state dict. ``drop_head`` re-initialises a classifier of another class count (fine-tuning);
    otherwise any mismatch is an error naming the keys. Returns the raw checkpoint."""
    checkpoint = load_checkpoint_file(path)
    state = checkpoint_filter_fn(checkpoint)
    own = model.state_dict()
    if drop_head:
        for key in [k for k in state if k.startswith('head.') and k in own and state[k].shape != own[k].shape]:
            logger.info(f'{path}: {key} {tuple(state[key].shape)} does not fit {tuple(own[key].shape)}; '
                        'the classifier is re-initialised for fine-tuning')
            state[key] = own[key]
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or mismatched:
        details = '; '.join(f'{label}: {", ".join(keys[:8])}{" ..." if len(keys) > 8 else ""}'
                            for label, keys in (('missing', missing), ('unexpected', unexpected),
                                                ('shape mismatch', [f'{k} {tuple(state[k].shape)} vs '
                                                                    f'{tuple(own[k].shape)}' for k in mismatched]))
                            if keys)
        raise ValueError(f'{path} does not fit this model (MODEL.FAT / MODEL.NUM_CLASSES): {details}')
    model.load_state_dict(state)
    logger.info(f'loaded weights from {path}')
    return checkpoint
