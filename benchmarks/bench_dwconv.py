"""Our depthwise-conv kernels against F.conv2d (cuDNN on a GPU, oneDNN on CPU) at FAT's real shapes.

Batch 128 (CPU: 32) at 224x224: each stage's positional-encoding / local-branch conv (FAT-B0 widths, kernels
3/5/7/9), the ConvFFN's 5x5 at 4x width, and the 5x5 stride-2 cases (shortcut, strided FFN, refined
downsampling). Times forward, backward and forward+backward after warm-up (CUDA events on a GPU),
and prints PyTorch's time / ours (above 1: ours is faster). On CPU ours differs only in the weight and
bias gradients (fp32).

    python benchmarks/bench_dwconv.py                       # fp16, bf16, fp32; NCHW and channels_last
    python benchmarks/bench_dwconv.py --dtype bf16 --layout channels_last --quick
    python benchmarks/bench_dwconv.py --device cpu --layout channels_last

The last column says whether MODEL.DWCONV_IMPL 'auto' picks ours (kernels.dwconv.preferred): where it
says yes, the fwd+bwd ratio must be at least 1; update PREFERRED_CASES (PREFERRED_CPU_CASES) in
kernels/dwconv from this table.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_models import cpu_name  # noqa: E402

DTYPES = {'fp16': torch.float16, 'bf16': torch.bfloat16, 'fp32': torch.float32}
WIDTHS = (32, 80, 160, 256)
SIZES = (56, 28, 14, 7)


def fat_shapes() -> list:
    """(name, channels, size, kernel, stride) of every depthwise conv kind in FAT-B0 at 224x224."""
    shapes = []
    for stage, (c, hw, k) in enumerate(zip(WIDTHS, SIZES, (3, 5, 7, 9))):
        shapes.append((f's{stage} cpe/local k{k}', c, hw, k, 1))
        shapes.append((f's{stage} ffn 5x5', 4 * c, hw, 5, 1))
        if stage < 3:
            shapes.append((f's{stage} shortcut 5x5/2', c, hw, 5, 2))
            shapes.append((f's{stage} ffn 5x5/2', 4 * c, hw, 5, 2))
    for c, hw in zip(WIDTHS[:3], SIZES[:3]):
        while hw > 7:  # refined downsampling chains down to 7x7
            shapes.append((f'pool {c}@{hw} 5x5/2', c, hw, 5, 2))
            hw = (hw + 1) // 2
    return shapes


def time_ms(fn, iters: int, device: str) -> float:
    for _ in range(3):
        fn()
    if device == 'cpu':
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - start) * 1000 / iters
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def measure(op, x, w, b, stride, iters):
    out = op(x, w, b, stride)
    grad = torch.randn_like(out)
    fwd = time_ms(lambda: op(x, w, b, stride), iters, x.device.type)
    bwd_total = time_ms(lambda: torch.autograd.grad(op(x, w, b, stride), (x, w, b), grad), iters,
                        x.device.type)
    return fwd, bwd_total - fwd, bwd_total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--dtype', choices=list(DTYPES), nargs='+', default=list(DTYPES))
    parser.add_argument('--layout', choices=['nchw', 'channels_last'], nargs='+', default=['nchw', 'channels_last'])
    parser.add_argument('--batch', type=int, help='default 128 on a GPU, 32 on CPU')
    parser.add_argument('--device', choices=['cuda', 'cpu'], default='cuda')
    parser.add_argument('--quick', action='store_true', help='fewer iterations')
    args = parser.parse_args()
    import kernels.dwconv as dwconv
    if args.device == 'cuda':
        if not torch.cuda.is_available():
            print('bench_dwconv: no CUDA GPU is visible, so there is nothing to time; run it on a GPU machine '
                  '(or use --device cpu).')
            return
        torch.backends.cudnn.benchmark = True
        device_name, reference = torch.cuda.get_device_name(), 'cuDNN'
    else:
        args.dtype = [d for d in args.dtype if d == 'fp32']
        device_name, reference = f'{cpu_name()}, {torch.get_num_threads()} threads', 'oneDNN'
    if not dwconv.is_usable(torch.device(args.device)):
        print('bench_dwconv: our kernels are not usable on this device (see the warning above).')
        return
    batch = args.batch or (128 if args.device == 'cuda' else 32)
    iters = (10 if args.quick else 50) if args.device == 'cuda' else (2 if args.quick else 5)
    cudnn = lambda x, w, b, s: F.conv2d(x, w, b, s, w.shape[-1] // 2, 1, x.shape[1])  # noqa: E731
    print(f'# {time.strftime("%Y-%m-%d")}, {device_name}, torch {torch.__version__}, batch {batch}; '
          f'ratio = {reference} ms / ours ms (above 1: ours faster)')
    print(f'| shape | dtype | layout | {reference} fwd+bwd ms | ours fwd+bwd ms | fwd ratio | bwd ratio '
          '| fwd+bwd ratio | auto picks ours |')
    print('|---|---|---|---|---|---|---|---|---|')
    for dtype_name in args.dtype:
        for layout in args.layout:
            fmt = torch.channels_last if layout == 'channels_last' else torch.contiguous_format
            for name, c, hw, k, s in fat_shapes():
                dtype = DTYPES[dtype_name]
                x = torch.randn(batch, c, hw, hw, device=args.device, dtype=dtype).to(memory_format=fmt)
                x.requires_grad_()
                w = torch.randn(c, 1, k, k, device=args.device, dtype=dtype, requires_grad=True)
                b = torch.randn(c, device=args.device, dtype=dtype, requires_grad=True)
                ref = measure(cudnn, x, w, b, s, iters)
                ours = measure(dwconv.depthwise_conv2d, x, w, b, s, iters)
                auto = 'yes' if dwconv.preferred(k, s, dtype, args.device) else 'no'
                print(f'| {name} | {dtype_name} | {layout} | {ref[2]:.3f} | {ours[2]:.3f} | {ref[0] / ours[0]:.2f} | '
                      f'{ref[1] / ours[1]:.2f} | {ref[2] / ours[2]:.2f} | {auto} |', flush=True)
                del x, w, b


if __name__ == '__main__':
    main()
