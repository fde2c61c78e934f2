"""FAT: the Fully Adaptive Transformer family (fat_b0 .. fat_b3).

Qihang Fan, Huaibo Huang, Xiaoqiang Zhou, Ran He, "Lightweight Vision Transformer with
Bidirectional Interaction", NeurIPS 2023 (arXiv 2306.00396).

The token mixer is FASA (Fully Adaptive Self-Attention): a global branch where every pixel
attends to a learned, refined-downsampled copy of the map, a local branch (a large-kernel
depthwise conv of the queries) and a bidirectional interaction between the two,
``SiLU(local) * SiLU(global)``. The global branch runs on ``F.scaled_dot_product_attention`` and
never materialises the attention matrix.

Parameter names differ from the authors' release; ``checkpoint_filter_fn`` maps their layout.
"""

import math
import re
from functools import partial
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint
from timm.utils.model import reparameterize_model
from torch.nn.utils.fusion import fuse_conv_bn_weights

from .dwconv import DwConvImpl, create_dwconv, set_dwconv_impl

__all__ = ['FAT', 'checkpoint_filter_fn']


@torch.no_grad()
def fold_batchnorm(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """Fold an eval-mode ``bn`` that directly follows ``conv`` into the conv's weight and bias."""
    conv.weight, conv.bias = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps,
                                                  bn.weight, bn.bias)


@torch.no_grad()
def fold_identity(dwconv: nn.Conv2d) -> None:
    """Turn ``x + dwconv(x)`` into ``dwconv(x)`` (stride 1) by adding 1 at the kernel's centre."""
    k = dwconv.kernel_size[0]
    dwconv.weight[:, 0, k // 2, k // 2] += 1


class ConvNormAct(nn.Module):
    """3x3 conv + BatchNorm + ReLU, the stem's building block."""

    def __init__(self, in_chs: int, out_chs: int, stride: int):
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, 3, stride, 1)
        self.bn = nn.BatchNorm2d(out_chs)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))

    def reparameterize(self) -> None:
        """Fold the BatchNorm into the conv (inference only)."""
        if isinstance(self.bn, nn.BatchNorm2d):
            fold_batchnorm(self.conv, self.bn)
            self.bn = nn.Identity()


class Stem(nn.Module):
    """Overlapping patch embedding to stride 4: four 3x3 convs, a 1x1 projection and GroupNorm."""

    def __init__(self, in_chans: int, dim: int):
        super().__init__()
        self.conv1 = ConvNormAct(in_chans, dim // 2, 2)
        self.conv2 = ConvNormAct(dim // 2, dim, 2)
        self.conv3 = ConvNormAct(dim, dim, 1)
        self.conv4 = ConvNormAct(dim, dim, 1)
        self.proj = nn.Conv2d(dim, dim, 1)
        self.norm = nn.GroupNorm(1, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv4(self.conv3(self.conv2(self.conv1(x))))
        return self.norm(self.proj(x))


class RefinedDownsample(nn.Sequential):
    """Learned pooling by ``window`` (a power of two) for FASA's keys and values.

    ``log2(window)`` steps of [depthwise 5x5 stride 2 + BatchNorm], a 1x1 conv between consecutive
    steps, no activation. Each step maps H to ceil(H / 2), so any input size works.
    """

    def __init__(self, dim: int, window: int, kernel_size: int = 5):
        steps = int(math.log2(window))
        if window < 2 or 2 ** steps != window:
            raise ValueError(f'refined downsampling needs a window that is a power of two >= 2, got {window}')
        layers: List[nn.Module] = []
        for i in range(steps):
            if i > 0:
                layers.append(nn.Conv2d(dim, dim, 1))
            layers += [create_dwconv(dim, kernel_size, 2), nn.BatchNorm2d(dim)]
        super().__init__(*layers)

    def reparameterize(self) -> None:
        """Fold each BatchNorm into the depthwise conv before it (inference only)."""
        for i, module in enumerate(self):
            if isinstance(module, nn.BatchNorm2d):
                fold_batchnorm(self[i - 1], module)
                self[i] = nn.Identity()


class FASA(nn.Module):
    """Fully Adaptive Self-Attention: global attention to pooled keys, a local depthwise branch,
    and the bidirectional interaction ``SiLU(local) * SiLU(global)``."""

    def __init__(self, dim: int, num_heads: int, kernel_size: int, window_size: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f'FASA width {dim} is not divisible by its {num_heads} heads')
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q = nn.Conv2d(dim, dim, 1)
        self.kv = nn.Conv2d(dim, 2 * dim, 1)
        self.local = create_dwconv(dim, kernel_size, 1)
        self.proj = nn.Conv2d(dim, dim, 1)
        self.kv_pool = RefinedDownsample(dim, window_size) if window_size > 1 else nn.Identity()

    def _to_heads(self, x: torch.Tensor, groups: int) -> torch.Tensor:
        """(B, groups*C, H, W) -> (B, groups, heads, H*W, d), head dim last with stride 1.

        From a channels_last map this is a view; from NCHW it is one copy. Either way SDPA gets
        unit stride in the head dim, which its CPU flash kernel needs (else it materialises the
        attention matrix)."""
        b, _, h, w = x.shape
        x = x.permute(0, 2, 3, 1).contiguous().view(b, h * w, groups, self.num_heads, self.head_dim)
        return x.permute(0, 2, 3, 1, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q = self.q(x)
        kv = self._to_heads(self.kv(self.kv_pool(x)), 2)
        g = F.scaled_dot_product_attention(self._to_heads(q, 1)[:, 0], kv[:, 0], kv[:, 1])
        g = g.transpose(1, 2).reshape(b, h, w, c).permute(0, 3, 1, 2)
        l = self.local(q)
        return self.proj(F.silu(l) * F.silu(g))


class ConvFFN(nn.Module):
    """1x1 expand, GELU, depthwise 5x5 (residual at stride 1, strided at 2), BatchNorm, 1x1 project.

    GELU, the depthwise conv and its residual are one module (``GeluDepthwiseConv2d``), which
    ``choose_kernels`` makes one CPU op where our kernel trains it: one activation fewer for backward.
    """

    def __init__(self, dim: int, hidden_dim: int, out_dim: int, kernel_size: int, stride: int):
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden_dim, 1)
        self.dwconv = create_dwconv(hidden_dim, kernel_size, stride, gelu_input=True, residual=stride == 1)
        self.norm = nn.BatchNorm2d(hidden_dim)
        self.fc2 = nn.Conv2d(hidden_dim, out_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.norm(self.dwconv(self.fc1(x))))

    def reparameterize(self) -> None:
        """Fold the depthwise residual and the BatchNorm into the depthwise conv (inference only)."""
        if self.dwconv.residual:
            fold_identity(self.dwconv)
            self.dwconv.residual = False
        if isinstance(self.norm, nn.BatchNorm2d):
            fold_batchnorm(self.dwconv, self.norm)
            self.norm = nn.Identity()


class StridedShortcut(nn.Sequential):
    """The residual path of a stride-2 block: depthwise 5x5 stride 2, BatchNorm, 1x1 to the new width."""

    def __init__(self, dim: int, out_dim: int, kernel_size: int):
        super().__init__(create_dwconv(dim, kernel_size, 2), nn.BatchNorm2d(dim), nn.Conv2d(dim, out_dim, 1))

    def reparameterize(self) -> None:
        """Fold the BatchNorm into the depthwise conv (inference only)."""
        if isinstance(self[1], nn.BatchNorm2d):
            fold_batchnorm(self[0], self[1])
            self[1] = nn.Identity()


class FATBlock(nn.Module):
    """Conditional positional encoding, FASA and ConvFFN, each residual.

    With ``stride=2`` the block also downsamples and widens to ``out_dim``: its FFN and shortcut
    are strided, so the stage needs no separate downsampling layer.
    """

    def __init__(self, dim: int, out_dim: int, num_heads: int, kernel_size: int, window_size: int,
                 mlp_kernel_size: int, mlp_ratio: float, stride: int, drop_path: float = 0.):
        super().__init__()
        if stride == 1 and out_dim != dim:
            raise ValueError(f'a stride-1 FAT block keeps its width; got {dim} -> {out_dim}')
        self.cpe = create_dwconv(dim, kernel_size, 1)
        self.cpe_residual = True
        self.norm1 = nn.GroupNorm(1, dim)
        self.attn = FASA(dim, num_heads, kernel_size, window_size)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = nn.GroupNorm(1, dim)
        self.mlp = ConvFFN(dim, int(dim * mlp_ratio), out_dim, mlp_kernel_size, stride)
        self.shortcut = StridedShortcut(dim, out_dim, mlp_kernel_size) if stride == 2 else nn.Identity()

    def forward_mixer(self, x: torch.Tensor) -> torch.Tensor:
        """Positional encoding and attention: the block's first half (the dense-prediction tap)."""
        x = x + self.cpe(x) if self.cpe_residual else self.cpe(x)
        return x + self.drop_path(self.attn(self.norm1(x)))

    def forward_ffn(self, x: torch.Tensor) -> torch.Tensor:
        """The block's second half: (strided) shortcut plus ConvFFN."""
        return self.shortcut(x) + self.drop_path(self.mlp(self.norm2(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_ffn(self.forward_mixer(x))

    def reparameterize(self) -> None:
        """Fold the positional encoding's residual into its conv (inference only)."""
        if self.cpe_residual:
            fold_identity(self.cpe)
            self.cpe_residual = False


class FATStage(nn.Module):
    """``depth`` FAT blocks; the last one has ``stride`` and maps ``dim`` to ``out_dim``."""

    def __init__(self, dim: int, out_dim: int, depth: int, num_heads: int, kernel_size: int, window_size: int,
                 mlp_kernel_size: int, mlp_ratio: float, stride: int, drop_path: Sequence[float]):
        super().__init__()
        block = partial(FATBlock, num_heads=num_heads, kernel_size=kernel_size, window_size=window_size,
                        mlp_kernel_size=mlp_kernel_size, mlp_ratio=mlp_ratio)
        self.blocks = nn.Sequential(*[
            block(dim, out_dim if last else dim, stride=stride if last else 1, drop_path=drop_path[i])
            for i, last in ((i, i == depth - 1) for i in range(depth))])
        self.grad_checkpointing = False

    def _run(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
            return checkpoint(block, x)
        return block(x)

    def forward_with_tap(self, x: torch.Tensor, run_last_ffn: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
        """Run the stage; also return its pyramid map: the last block's activation after attention
        (before its strided FFN) when it downsamples, else the stage output."""
        for block in self.blocks[:-1]:
            x = self._run(block, x)
        last = self.blocks[-1]
        if isinstance(last.shortcut, nn.Identity):
            x = self._run(last, x)
            return x, x
        tap = self._run(last.forward_mixer, x)
        return (self._run(last.forward_ffn, tap) if run_last_ffn and last.mlp is not None else tap), tap

    def drop_last_ffn(self) -> None:
        """Delete the last block's strided second half, unused when this stage's tap is the last output."""
        last = self.blocks[-1]
        if not isinstance(last.shortcut, nn.Identity):
            last.norm2 = last.mlp = last.shortcut = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript takes no module arguments (and no checkpointing)
            return self.blocks(x)
        for block in self.blocks:
            x = self._run(block, x)
        return x


class FAT(nn.Module):
    """Fully Adaptive Transformer: a stride-4 stem, four FAT stages, GroupNorm, average pool, linear head.

    Args:
        in_chans: input image channels.
        num_classes: classifier outputs; 0 for no classifier (features only).
        embed_dims, depths, num_heads: per-stage width, number of blocks and attention heads.
        kernel_sizes: per-stage kernel of the positional encoding and FASA's local branch.
        window_sizes: per-stage pooling factor of FASA's keys and values (1 = no pooling).
        mlp_kernel_sizes, mlp_ratios: per-stage ConvFFN depthwise kernel and expansion.
        drop_rate: dropout before the classifier.
        drop_path_rate: stochastic depth, linear from 0 over all blocks.
        global_pool: 'avg' or '' (no pooling).
        dwconv_impl: 'auto' | 'torch' | 'cuda', set on every depthwise conv once built (``models.dwconv``).
        reparameterized: build the deploy form (``reparameterize()``'s modules), to load folded weights.
    """

    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 1000,
            embed_dims: Sequence[int] = (32, 80, 160, 256),
            depths: Sequence[int] = (2, 2, 6, 2),
            num_heads: Sequence[int] = (2, 5, 10, 16),
            kernel_sizes: Sequence[int] = (3, 5, 7, 9),
            window_sizes: Sequence[int] = (8, 4, 2, 1),
            mlp_kernel_sizes: Sequence[int] = (5, 5, 5, 5),
            mlp_ratios: Sequence[float] = (4, 4, 4, 4),
            drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            global_pool: str = 'avg',
            dwconv_impl: DwConvImpl = 'auto',
            reparameterized: bool = False,
    ):
        super().__init__()
        num_stages = len(depths)
        for name, value in dict(embed_dims=embed_dims, num_heads=num_heads, kernel_sizes=kernel_sizes,
                                window_sizes=window_sizes, mlp_kernel_sizes=mlp_kernel_sizes,
                                mlp_ratios=mlp_ratios).items():
            if len(value) != num_stages:
                raise ValueError(f'{name} has {len(value)} entries but depths has {num_stages} stages')
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.grad_checkpointing = False

        self.stem = Stem(in_chans, embed_dims[0])
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device='cpu').tolist()
        stages, self.feature_info = [], []
        for i in range(num_stages):
            last = i == num_stages - 1
            first_block = sum(depths[:i])
            stages.append(FATStage(
                embed_dims[i], embed_dims[i] if last else embed_dims[i + 1], depths[i], num_heads[i],
                kernel_sizes[i], window_sizes[i], mlp_kernel_sizes[i], mlp_ratios[i], stride=1 if last else 2,
                drop_path=dpr[first_block:first_block + depths[i]]))
            self.feature_info.append(dict(num_chs=embed_dims[i], reduction=4 * 2 ** i, module=f'stages.{i}'))
        self.stages = nn.Sequential(*stages)
        self.num_features = self.head_hidden_size = embed_dims[-1]
        self.norm = nn.GroupNorm(1, self.num_features)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        set_dwconv_impl(self, dwconv_impl)
        if reparameterized:
            self.eval().reparameterize().train()

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        """Parameter names exempt from weight decay beyond norms and biases: none in FAT."""
        return set()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """Regexes grouping parameters by depth, for layer-wise LR decay."""
        return dict(
            stem=r'^stem',
            blocks=r'^stages\.(\d+)' if coarse else [(r'^stages\.(\d+)\.blocks\.(\d+)', None), (r'^norm', (99999,))],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in backward to save memory."""
        self.grad_checkpointing = enable
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Replace the classifier with a fresh one of ``num_classes`` outputs (0: none)."""
        self.num_classes = num_classes
        if global_pool is not None:
            if global_pool not in ('avg', ''):
                raise ValueError(f"FAT supports global_pool 'avg' or '', got {global_pool!r}")
            self.global_pool = global_pool
        device = self.stem.proj.weight.device
        self.head = nn.Linear(self.num_features, num_classes, device=device) if num_classes > 0 else nn.Identity()

    @torch.no_grad()
    def reparameterize(self) -> 'FAT':
        """Deploy form: fold every BatchNorm that follows a conv, and the depthwise residuals of the
        positional encoding and the stride-1 FFNs, into the convs. Eval only; returns self."""
        if self.training:
            raise RuntimeError('reparameterize() folds BatchNorm running statistics: call model.eval() first')
        return reparameterize_model(self, inplace=True)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """The four pyramid maps (strides 4, 8, 16, 32; widths embed_dims) and optionally the output.

        The map of a downsampling stage is taken inside its last block, after attention and before
        the strided FFN, as the authors' dense-prediction backbone does.

        Args:
            indices: take the last n stages if int, all if None, else the listed stage indices.
            norm: apply the final norm to the last stage's map.
            stop_early: stop after the last requested stage.
            intermediates_only: return only the maps.
        """
        if output_fmt != 'NCHW':
            raise ValueError(f"FAT's intermediates are NCHW maps, got output_fmt={output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        last_index = len(self.stages) - 1
        stop = max_index if (stop_early or intermediates_only) else last_index
        intermediates = []
        x = self.stem(x)
        for i, stage in enumerate(self.stages[:stop + 1]):
            x, tap = stage.forward_with_tap(x, run_last_ffn=i < stop or not intermediates_only)
            if i in take_indices:
                intermediates.append(self.norm(tap) if norm and i == last_index else tap)
        if intermediates_only:
            return intermediates
        if stop == last_index:
            x = self.norm(x)
        return x, intermediates

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        """Drop the stages, norm and head that ``indices`` do not need."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[:max_index + 1]
        if max_index < len(self.feature_info) - 1:
            self.stages[-1].drop_last_ffn()
        if prune_norm or max_index < len(self.feature_info) - 1:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.stages(self.stem(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == 'avg':
            x = x.mean((2, 3))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# The authors' parameter names -> ours, applied in order.
_OFFICIAL_KEY_RENAMES = (
    (r'^patch_embed\.conv(\d)\.conv\.0\.', r'stem.conv\1.conv.'),
    (r'^patch_embed\.conv(\d)\.conv\.1\.', r'stem.conv\1.bn.'),
    (r'^patch_embed\.conv5\.', 'stem.proj.'),
    (r'^patch_embed\.layernorm\.', 'stem.norm.'),
    (r'^layers\.(\d+)\.blocks\.', r'stages.\1.blocks.'),
    (r'\.attn\.local_mixer\.', '.attn.local.'),
    (r'\.attn\.mixer\.', '.attn.proj.'),
    (r'\.ffn\.bn\.', '.mlp.norm.'),
    (r'\.ffn\.', '.mlp.'),
    (r'\.downsample\.', '.shortcut.'),
)
_OFFICIAL_POOL_KEY = re.compile(r'\.attn\.pool\.(conv|bn|linear)(\d+)\.')
_POOL_OFFSET = {'conv': 0, 'bn': 1, 'linear': 2}


def _rename_official_key(key: str) -> str:
    for pattern, replacement in _OFFICIAL_KEY_RENAMES:
        key = re.sub(pattern, replacement, key)
    return _OFFICIAL_POOL_KEY.sub(
        lambda m: f'.attn.kv_pool.{3 * int(m.group(2)) + _POOL_OFFSET[m.group(1)]}.', key)


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: Optional[nn.Module] = None) -> Dict[str, torch.Tensor]:
    """Accept this project's and the authors' checkpoints, bare or wrapped.

    Unwraps ``{'model': ...}`` / ``{'state_dict': ...}`` and DDP's ``module.`` prefix, and maps the
    authors' key layout (``patch_embed``, ``layers.i``, ``attn.pool.convN`` ...) to this model's.
    """
    for wrapper in ('model', 'state_dict'):
        if wrapper in state_dict and isinstance(state_dict[wrapper], dict):
            state_dict = state_dict[wrapper]
            break
    out = {}
    for key, value in state_dict.items():
        key = key[len('module.'):] if key.startswith('module.') else key
        out[_rename_official_key(key)] = value
    return out


def _create_fat(variant: str, pretrained: bool = False, **kwargs) -> FAT:
    out_indices = kwargs.pop('out_indices', (0, 1, 2, 3))
    return build_model_with_cfg(
        FAT, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls='getter'),
        **kwargs,
    )


def _cfg(**kwargs) -> Dict[str, Any]:
    return {
        'url': '', 'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
        'crop_pct': 0.875, 'interpolation': 'bicubic', 'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'stem.conv1.conv', 'classifier': 'head', 'license': 'mit',
        'paper_ids': 'arXiv:2306.00396', 'paper_name': 'Lightweight Vision Transformer with Bidirectional Interaction',
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    'fat_b0.untrained': _cfg(),
    'fat_b1.untrained': _cfg(),
    'fat_b2.untrained': _cfg(),
    'fat_b3.untrained': _cfg(),
})

# Per-variant architecture (paper, Table 1); the recipe's drop path lives in the configs.
MODEL_ARGS = {
    'fat_b0': dict(embed_dims=(32, 80, 160, 256), depths=(2, 2, 6, 2), num_heads=(2, 5, 10, 16)),
    'fat_b1': dict(embed_dims=(48, 96, 192, 384), depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)),
    'fat_b2': dict(embed_dims=(64, 128, 256, 512), depths=(2, 2, 6, 2), num_heads=(2, 4, 8, 16)),
    'fat_b3': dict(embed_dims=(64, 128, 256, 512), depths=(4, 4, 16, 4), num_heads=(2, 4, 8, 16)),
}


@register_model
def fat_b0(pretrained: bool = False, **kwargs) -> FAT:
    """FAT-B0: 4.5M parameters, 0.75 GMACs, 77.6% ImageNet top-1 (paper)."""
    return _create_fat('fat_b0', pretrained, **dict(MODEL_ARGS['fat_b0'], **kwargs))


@register_model
def fat_b1(pretrained: bool = False, **kwargs) -> FAT:
    """FAT-B1: 7.8M parameters, 1.24 GMACs, 80.1% ImageNet top-1 (paper)."""
    return _create_fat('fat_b1', pretrained, **dict(MODEL_ARGS['fat_b1'], **kwargs))


@register_model
def fat_b2(pretrained: bool = False, **kwargs) -> FAT:
    """FAT-B2: 13.5M parameters, 2.13 GMACs, 81.9% ImageNet top-1 (paper)."""
    return _create_fat('fat_b2', pretrained, **dict(MODEL_ARGS['fat_b2'], **kwargs))


@register_model
def fat_b3(pretrained: bool = False, **kwargs) -> FAT:
    """FAT-B3: 29.2M parameters, 4.63 GMACs, 83.6% ImageNet top-1 (paper)."""
    return _create_fat('fat_b3', pretrained, **dict(MODEL_ARGS['fat_b3'], **kwargs))
