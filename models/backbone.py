"""FATBackbone: FAT as a dense-prediction backbone (detection, segmentation).

It returns the four pyramid maps of the spec (strides 4, 8, 16, 32; widths ``embed_dims``), each
normalised by its own GroupNorm(1, C), as the authors' detection/segmentation backbone does. It
loads this project's ImageNet checkpoints (or the authors'), dropping the classification head and
final norm, and can freeze the first stages and every BatchNorm for fine-tuning with small batches.
"""
from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn as nn
from timm.layers import freeze_batch_norm_2d

from utils import load_weights

from .fat import FAT, MODEL_ARGS
from .hub import read_weights


class FATBackbone(nn.Module):
    """FAT's four pyramid maps, each GroupNorm-normalised; ``out_channels`` and ``strides`` describe them.

    Args:
        out_indices: which stages' maps to return (and normalise).
        frozen_stages: -1 trains everything; 0 freezes the stem; k >= 1 freezes the stem and stages 0..k-1
            (their weights get no gradient and their BatchNorms stay in eval mode).
        freeze_bn: replace every BatchNorm by a frozen one (fixed statistics and affine), as is usual
            when fine-tuning with a few images per GPU.
        **fat_kwargs: the FAT architecture (see ``models.fat.FAT``); ``num_classes`` is ignored.
    """

    def __init__(self, out_indices: Sequence[int] = (0, 1, 2, 3), frozen_stages: int = -1, freeze_bn: bool = False,
                 **fat_kwargs):
        super().__init__()
        fat_kwargs.update(num_classes=0, global_pool='')
        self.body = FAT(**fat_kwargs)
        num_stages = len(self.body.stages)
        if not -1 <= frozen_stages <= num_stages:
            raise ValueError(f'frozen_stages must be in -1..{num_stages}, got {frozen_stages}')
        if not out_indices or any(not 0 <= i < num_stages for i in out_indices):
            raise ValueError(f'out_indices must be stage indices in 0..{num_stages - 1}, got {list(out_indices)}')
        self.out_indices = sorted(out_indices)
        self.body.prune_intermediate_layers(self.out_indices, prune_norm=True)
        self.out_channels: List[int] = [self.body.feature_info[i]['num_chs'] for i in self.out_indices]
        self.strides: List[int] = [self.body.feature_info[i]['reduction'] for i in self.out_indices]
        self.norms = nn.ModuleList(nn.GroupNorm(1, channels) for channels in self.out_channels)
        self.frozen_stages = frozen_stages
        if freeze_bn:
            self.body = freeze_batch_norm_2d(self.body)
        for module in self._frozen_modules():
            module.requires_grad_(False)

    @classmethod
    def from_variant(cls, variant: str, **kwargs) -> 'FATBackbone':
        """The backbone of a registered variant (fat_b0 .. fat_b3); ``kwargs`` as for the constructor."""
        if variant not in MODEL_ARGS:
            raise ValueError(f'unknown FAT variant {variant!r}; choose one of {", ".join(MODEL_ARGS)}')
        return cls(**{**MODEL_ARGS[variant], **kwargs})

    def _frozen_modules(self) -> List[nn.Module]:
        if self.frozen_stages < 0:
            return []
        return [self.body.stem, *self.body.stages[:self.frozen_stages]]

    def train(self, mode: bool = True) -> 'FATBackbone':
        """As nn.Module.train, but frozen stages keep their BatchNorm statistics (eval mode)."""
        super().train(mode)
        for module in self._frozen_modules():
            module.eval()
        return self

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        maps = self.body.forward_intermediates(x, self.out_indices, intermediates_only=True)
        return [norm(m) for norm, m in zip(self.norms, maps)]

    def load_pretrained(self, path: str) -> None:
        """Load ImageNet weights (``models.hub.read_weights``: a checkpoint of this project or the
        authors', a bare state dict, or a ``local-dir:``/``hf-hub:`` folder); the classification head
        and final norm are dropped, the map norms keep their initialisation. Raises CheckpointError
        naming the keys when the weights do not fit."""
        state = read_weights(path)
        # Stages beyond out_indices were pruned (their weights are left out); FrozenBatchNorm2d keeps no
        # num_batches_tracked.
        own = self.body.state_dict()
        load_weights(self.body, {k: v for k, v in state.items() if k in own}, path,
                     'this backbone (another FAT variant?)')
