"""A literal eager FAT: the spec's formulas written out op by op, kept as the speed baseline.

Same parameters as ``models.FAT``; only FASA's forward differs: the attention matrix is
materialised (``softmax(q k^T * d^-0.5) v``), the interaction is computed as the reference
writes it (``l * sigmoid(l) * sigmoid(g) * g``, four separate elementwise ops), and heads are
split with NCHW reshapes as the authors do. Depthwise convs are PyTorch's own (``F.conv2d`` and
its gradients), never the project's kernels. Used in NCHW only.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from models.dwconv import set_dwconv_impl
from models.fat import FASA


class LiteralFASA(FASA):
    """FASA computed the way the reference implementation writes it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        m, d = self.num_heads, self.head_dim
        q = self.q(x)
        kv = self.kv(self.kv_pool(x))
        n = kv.shape[-2] * kv.shape[-1]
        k, v = kv.reshape(b, 2, m, d, n).permute(1, 0, 2, 4, 3)
        attn = (q.reshape(b, m, d, h * w).transpose(-1, -2) @ k.transpose(-1, -2)) * d ** -0.5
        g = (attn.softmax(-1) @ v).transpose(-1, -2).reshape(b, c, h, w)
        l = self.local(q)
        l = l * torch.sigmoid(l)
        l = l * torch.sigmoid(g)
        return self.proj(l * g)


def make_literal(model: nn.Module) -> nn.Module:
    """Switch every FASA of ``model`` to the literal forward and every depthwise conv to PyTorch's,
    in place; parameters are shared."""
    for module in model.modules():
        if isinstance(module, FASA):
            module.__class__ = LiteralFASA
    return set_dwconv_impl(model, 'torch')
