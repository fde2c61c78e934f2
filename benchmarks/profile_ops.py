"""Where inference time goes: convolutions, attention and the rest, per model, with conv efficiency.

For each model, in its fastest CPU mode by default (channels_last, BatchNorm folded, torch.compile with
weight freezing, as ``bench_models.py``'s 'compiled'), profiles a few batches and splits the profiled
time into convolutions, attention (SDPA), other matrix products, and everything else (norms,
activations, adds and copies; under torch.compile these run inside the compiled graph). It also counts
each category's multiply-accumulates with torch.utils.flop_counter, so the table shows how many GMAC/s
each model's convolutions reach. That answers whether a model is slow because it does more work or
because its work runs less efficiently.

Usage:
    python -m benchmarks.profile_ops                                # fat_b0, fastvit_t8, repvit_m0_9
    python -m benchmarks.profile_ops --models fat_b1 edgenext_small --mode fused
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]
if not __package__:  # run as a file, the project's modules would not be importable
    sys.exit('run it from the repository root as: python -m benchmarks.profile_ops ...')

from benchmarks.bench_models import build, cpu_name  # noqa: E402
from models.flops import macs_by_op  # noqa: E402
from utils import keep_freed_memory  # noqa: E402

CATEGORIES = ('convolution', 'attention', 'matmul', 'other')


def category(op_name: str) -> str:
    name = op_name.lower()
    if 'convolution' in name or name.startswith('aten::conv') or name == 'aten::_conv_depthwise2d':
        return 'convolution'
    if 'scaled_dot_product' in name or 'attention' in name:
        return 'attention'
    if 'linear' in name or name in ('aten::mm', 'aten::addmm', 'aten::bmm', 'aten::baddbmm', 'aten::matmul'):
        return 'matmul'
    return 'other'


def macs_by_category(model: torch.nn.Module, img_size: int) -> Counter:
    """Multiply-accumulates per image of one forward, by category (the model as given, before compiling)."""
    macs: Counter = Counter()
    for op, count in macs_by_op(model, (3, img_size, img_size)).items():
        macs[category(f'aten::{op}')] += count
    return macs


def time_by_category(model: torch.nn.Module, x: torch.Tensor, batches: int) -> tuple:
    """(wall seconds per batch unprofiled, Counter of profiled self-CPU seconds per batch by category)."""
    with torch.inference_mode():
        for _ in range(3):
            model(x)
        start = time.perf_counter()
        for _ in range(batches):
            model(x)
        wall = (time.perf_counter() - start) / batches
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(batches):
                model(x)
    seconds: Counter = Counter()
    for event in prof.key_averages():
        seconds[category(event.key)] += event.self_cpu_time_total / 1e6 / batches
    return wall, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--models', nargs='+', default=['fat_b0', 'fastvit_t8', 'repvit_m0_9'])
    parser.add_argument('--mode', default='compiled', choices=['channels_last', 'fused', 'compiled'])
    parser.add_argument('--batch-size', type=int, default=32)
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--batches', type=int, default=5)
    args = parser.parse_args()
    keep_freed_memory()
    print(f'# {time.strftime("%Y-%m-%d")}, {cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}, '
          f'fp32, {args.mode}, batch {args.batch_size}, {args.img_size}px; ms per batch (profiled self time)')
    columns = ['model', 'img/s', 'conv GMACs/img', 'conv ms', 'conv GMAC/s', 'attention ms', 'matmul ms', 'other ms']
    print('| ' + ' | '.join(columns) + ' |')
    print('|' + '|'.join('---' for _ in columns) + '|')
    for name in args.models:
        x = torch.randn(args.batch_size, 3, args.img_size, args.img_size).to(memory_format=torch.channels_last)
        model = build(name, args.mode, 'infer', torch.device('cpu'), batch_size=args.batch_size, img_size=args.img_size)
        macs = macs_by_category(getattr(model, '_orig_mod', model), args.img_size)
        wall, seconds = time_by_category(model, x, args.batches)
        conv_rate = macs['convolution'] * args.batch_size / seconds['convolution'] / 1e9
        cells = [name, f'{args.batch_size / wall:.1f}', f'{macs["convolution"] / 1e9:.3f}',
                 f'{seconds["convolution"] * 1e3:.0f}', f'{conv_rate:.0f}'] + [
                 f'{seconds[c] * 1e3:.0f}' for c in CATEGORIES[1:]]
        print('| ' + ' | '.join(cells) + ' |', flush=True)


if __name__ == '__main__':
    main()
