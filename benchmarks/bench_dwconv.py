"""Our depthwise-conv kernels against F.conv2d (cuDNN on a GPU, oneDNN on CPU) at FAT's real shapes.

Shapes: every depthwise conv that the FAT variants (``--variants``, default fat_b0..fat_b3) run at
``--img-size`` (224), derived from the variant table (``models.MODEL_ARGS`` over the ``FAT`` defaults):
each stage's positional-encoding and local-branch conv, the ConvFFN's conv at 4x width, and the 5x5
stride-2 cases (strided FFN, shortcut, FASA's refined downsampling chains). A shape that several layers
or variants share is measured once. Then a large-kernel sweep: kernels 7..31 at stride 1, at 128
channels on the first stage's map (56x56 at 224) and 256 channels on the third stage's (14x14)
(``--large-kernels``).

Batch 128 (CPU: 32). For every shape, dtype and layout: forward, backward and forward+backward times of
both (CUDA events on a GPU, after warm-up; ``--iters`` calls, fewer where they would take over 50 ms),
PyTorch's time / ours (above 1: ours is faster), and how far our output and gradients (input, weight,
bias) are from PyTorch's: max |ours - theirs| / max |theirs|, flagged above a per-dtype tolerance (fp32
compared with TF32 off; the timings keep PyTorch's defaults, as training does). On CPU ours differs
only in the weight and bias gradients (fp32).

    python -m benchmarks.bench_dwconv                       # fp16, bf16, fp32; NCHW and channels_last
    python -m benchmarks.bench_dwconv --dtype bf16 --layout channels_last --quick
    python -m benchmarks.bench_dwconv --variants fat_b0 --large-kernels 7 31 --json rows.jsonl
    python -m benchmarks.bench_dwconv --device cpu --variants fat_b0 --large-kernels --layout channels_last

The table's last column says whether MODEL.DWCONV_IMPL 'auto' picks ours (kernels.dwconv.preferred):
where it says yes, the fwd+bwd ratio must be at least 1. After the table, per layout and for all
layouts together, the ``PREFERRED_CASES`` value this run supports: the (kernel size, stride, dtype,
layout) cases where ours was at least ``--margin`` (1.05) times as fast forward + backward at every
measured shape, with no flagged difference; update PREFERRED_CASES (PREFERRED_CPU_CASES) in
kernels/dwconv from it.
"""
from __future__ import annotations

import argparse
import inspect
import json
import math
import sys
import time
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Sequence

import torch
import torch.nn.functional as F

if not __package__:  # run as a file, the project's modules would not be importable
    sys.exit('run it from the repository root as: python -m benchmarks.bench_dwconv ...')

from benchmarks.bench_models import FAT_MODELS, cpu_name  # noqa: E402

DTYPES = {'fp16': torch.float16, 'bf16': torch.bfloat16, 'fp32': torch.float32}
# Largest accepted max |ours - theirs| / max |theirs| per dtype: four units in the last place of fp16
# and bf16 (each side rounds its fp32 accumulator once); for fp32, 1e-4, far above what summing in
# another order gives. A wrong tap or halo gives differences of order 1.
TOLERANCES = {'fp16': 2.0 ** -8, 'bf16': 2.0 ** -5, 'fp32': 1e-4}
LARGE_KERNELS = tuple(range(7, 32, 2))
LAYOUTS = {'nchw': torch.contiguous_format, 'channels_last': torch.channels_last}
TIMED_MS = 50  # timed span per measurement: the full --iters for small shapes, fewer for kernels near 31


def half(size: int) -> int:
    """The map size after a stride-2 conv with padding k // 2 (odd k): ceil(size / 2)."""
    return (size + 1) // 2


def fat_depthwise_convs(variant: str, img_size: int) -> List[tuple]:
    """(role, channels, size, kernel, stride) of every depthwise conv layer ``variant`` runs at
    ``img_size``, in forward order, from the variant table (``models.MODEL_ARGS`` over the ``FAT``
    defaults) and the layer defaults of ``models/fat.py``."""
    from models import FAT, MODEL_ARGS
    from models.fat import RefinedDownsample

    arch = {name: p.default for name, p in inspect.signature(FAT).parameters.items()}
    arch.update(MODEL_ARGS[variant])
    pool_kernel = inspect.signature(RefinedDownsample).parameters['kernel_size'].default
    size = half(half(img_size))  # the stem's two stride-2 3x3 convs
    convs = []
    num_stages = len(arch['depths'])
    for i in range(num_stages):
        dim, kernel, mlp_kernel = arch['embed_dims'][i], arch['kernel_sizes'][i], arch['mlp_kernel_sizes'][i]
        hidden = int(dim * arch['mlp_ratios'][i])
        for block in range(arch['depths'][i]):
            stride = 2 if block == arch['depths'][i] - 1 and i < num_stages - 1 else 1
            convs += [('cpe', dim, size, kernel, 1)]
            pooled = size
            for _ in range(int(math.log2(arch['window_sizes'][i]))):
                convs.append(('kv pool', dim, pooled, pool_kernel, 2))
                pooled = half(pooled)
            convs += [('local', dim, size, kernel, 1), ('ffn', hidden, size, mlp_kernel, stride)]
            if stride == 2:
                convs.append(('shortcut', dim, size, mlp_kernel, 2))
        if i < num_stages - 1:
            size = half(size)
    return convs


def benchmark_shapes(variants: Sequence[str], img_size: int, large_kernels: Sequence[int] = LARGE_KERNELS) -> List[dict]:
    """The shapes to measure: each distinct (channels, size, kernel, stride) of the variants' depthwise
    convs once, with its roles and how many layers of each variant use it, then the large-kernel sweep
    (``large_kernels`` at stride 1: 128 channels on the first stage's map, 256 on the third's)."""
    shapes: Dict[tuple, dict] = {}
    for variant in variants:
        for role, c, size, k, s in fat_depthwise_convs(variant, img_size):
            shape = shapes.setdefault((c, size, k, s), dict(channels=c, size=size, kernel=k, stride=s, roles=[],
                                                            layers={}))
            shape['roles'] = list(dict.fromkeys(shape['roles'] + [role]))
            shape['layers'][variant] = shape['layers'].get(variant, 0) + 1
    first_stage = half(half(img_size))
    third_stage = half(half(first_stage))
    for k in large_kernels:
        for c, size in ((128, first_stage), (256, third_stage)):
            shapes.setdefault((c, size, k, 1), dict(channels=c, size=size, kernel=k, stride=1, roles=[], layers={}))
            shapes[(c, size, k, 1)]['roles'].append('large kernel')
    for shape in shapes.values():
        shape['name'] = (f"{'/'.join(shape['roles'])} {shape['channels']}ch {shape['size']}px k{shape['kernel']}"
                         + ('/2' if shape['stride'] == 2 else ''))
    return list(shapes.values())


def time_ms(fn: Callable[[], object], iters: int, device: str, warmup: int = 3) -> float:
    """Mean ms of ``fn`` after ``warmup`` calls, over ``iters`` calls, or fewer (not under 3) where that
    many would take more than ``TIMED_MS``."""
    sync = torch.cuda.synchronize if device == 'cuda' else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(warmup):
        fn()
    sync()
    per_call_ms = (time.perf_counter() - start) * 1000 / max(warmup, 1)
    iters = min(iters, max(3, int(TIMED_MS / max(per_call_ms, 1e-3))))
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


def measure(op, x, w, b, stride, iters, warmup=3):
    """(forward, backward, forward+backward) ms of ``op``; backward is the difference."""
    out = op(x, w, b, stride)
    grad = torch.randn_like(out)
    fwd = time_ms(lambda: op(x, w, b, stride), iters, x.device.type, warmup)
    bwd_total = time_ms(lambda: torch.autograd.grad(op(x, w, b, stride), (x, w, b), grad), iters,
                        x.device.type, warmup)
    return fwd, bwd_total - fwd, bwd_total


def reference_conv(x, w, b, s):
    return F.conv2d(x, w, b, s, w.shape[-1] // 2, 1, x.shape[1])


def relative_differences(ours, reference, x, w, b, stride) -> Dict[str, float]:
    """max |ours - reference| / max |reference| for the output and the input, weight and bias
    gradients; fp32 in full precision (cuDNN's TF32 off)."""
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = tf32 and x.dtype != torch.float32
    try:
        grad = torch.randn_like(reference(x, w, b, stride))
        results = []
        for op in (ours, reference):
            out = op(x, w, b, stride)
            results.append((out, *torch.autograd.grad(out, (x, w, b), grad)))
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    return {name: ((a.float() - r.float()).abs().max() / r.float().abs().max().clamp_min(1e-30)).item()
            for name, a, r in zip(('output', 'grad_input', 'grad_weight', 'grad_bias'), *results)}


def benchmark_rows(shapes: List[dict], dtypes: Sequence[str], layouts: Sequence[str], batch: int, device: str,
                   iters: int, warmup: int = 3) -> Iterator[dict]:
    """Measure every shape in every dtype and layout; yield one row per case as it is measured (an
    ``error`` entry instead of figures where it failed)."""
    import kernels.dwconv as dwconv

    for dtype_name in dtypes:
        dtype = DTYPES[dtype_name]
        for layout in layouts:
            for shape in shapes:
                c, size, k, s = shape['channels'], shape['size'], shape['kernel'], shape['stride']
                row = dict(shape, dtype=dtype_name, layout=layout, batch=batch,
                           auto=dwconv.preferred(k, s, dtype, device, layout == 'channels_last'))
                try:
                    x = torch.randn(batch, c, size, size, device=device, dtype=dtype)
                    x = x.to(memory_format=LAYOUTS[layout]).requires_grad_()
                    w = torch.randn(c, 1, k, k, device=device, dtype=dtype, requires_grad=True)
                    b = torch.randn(c, device=device, dtype=dtype, requires_grad=True)
                    ref = measure(reference_conv, x, w, b, s, iters, warmup)
                    ours = measure(dwconv.depthwise_conv2d, x, w, b, s, iters, warmup)
                    row.update(ref_ms=ref, ours_ms=ours, ratio_fwd=ref[0] / ours[0], ratio_bwd=ref[1] / ours[1],
                               ratio=ref[2] / ours[2])
                    row['difference'] = relative_differences(dwconv.depthwise_conv2d, reference_conv, x, w, b, s)
                    row['max_difference'] = max(row['difference'].values())
                    row['mismatch'] = not row['max_difference'] <= TOLERANCES[dtype_name]  # NaN too
                except Exception as error:  # one failing case (out of memory, a kernel error) is a row
                    row['error'] = f'{type(error).__name__}: {error}'.splitlines()[0]
                yield row


def table_header(reference: str) -> List[str]:
    return [f'| shape | dtype | layout | {reference} fwd+bwd ms | ours fwd+bwd ms | fwd ratio | bwd ratio '
            '| fwd+bwd ratio | max rel. difference | auto picks ours |',
            '|---|---|---|---|---|---|---|---|---|---|']


def table_row(row: dict) -> str:
    head = f"| {row['name']} | {row['dtype']} | {row['layout']} |"
    auto = 'yes' if row['auto'] else 'no'
    if 'error' in row:
        return f"{head} {row['error']} | | | | | | {auto} |"
    flag = ' **above tolerance**' if row['mismatch'] else ''
    return (f"{head} {row['ref_ms'][2]:.3f} | {row['ours_ms'][2]:.3f} | {row['ratio_fwd']:.2f} | "
            f"{row['ratio_bwd']:.2f} | {row['ratio']:.2f} | {row['max_difference']:.2g}{flag} | {auto} |")


def case_summary(rows: List[dict], layout: str) -> Dict[tuple, dict]:
    """Per (kernel, stride, dtype) in ``layout``: the lowest and highest fwd+bwd ratio over its shapes,
    the number of shapes, and whether any row failed or was flagged."""
    cases: Dict[tuple, dict] = {}
    for row in rows:
        if row['layout'] != layout:
            continue
        case = cases.setdefault((row['kernel'], row['stride'], row['dtype']),
                                dict(min_ratio=math.inf, max_ratio=0.0, shapes=0, clean=True))
        case['shapes'] += 1
        if 'error' in row or row['mismatch']:
            case['clean'] = False
        else:
            case['min_ratio'] = min(case['min_ratio'], row['ratio'])
            case['max_ratio'] = max(case['max_ratio'], row['ratio'])
    return cases


def proposed_preferred_cases(rows: List[dict], layouts: Sequence[str], margin: float = 1.05) -> tuple:
    """The ``PREFERRED_CASES`` value (kernels/dwconv) these rows support in ``layouts``: each (kernel,
    stride, dtype, layout) whose every shape ran clean with ours at least ``margin`` times as fast
    forward + backward, grouped as ((kernel sizes), (strides), (dtypes), (layouts)) entries."""
    dtypes, all_layouts = list(DTYPES), list(LAYOUTS)  # grouped by index, so that they sort in this order
    entries = [((k,), (s,), (dtypes.index(d),), (all_layouts.index(layout),)) for layout in layouts
               for (k, s, d), case in case_summary(rows, layout).items() if case['clean'] and case['min_ratio'] >= margin]
    for axis in range(4):  # merge the entries that differ along this axis only
        merged: Dict[tuple, set] = {}
        for entry in entries:
            merged.setdefault(entry[:axis] + entry[axis + 1:], set()).update(entry[axis])
        entries = [rest[:axis] + (tuple(sorted(values)),) + rest[axis:] for rest, values in merged.items()]
    return tuple((ks, ss, tuple(DTYPES[dtypes[d]] for d in ds), tuple(all_layouts[i] for i in ls))
                 for ks, ss, ds, ls in sorted(entries))


def format_cases(cases: tuple, name: str = 'PREFERRED_CASES') -> str:
    """``cases`` as the Python source of an assignment to ``name``."""
    def source(items: list) -> str:
        return '(' + ', '.join(items) + (',)' if len(items) == 1 else ')')
    return f'{name} = ' + source([source([source([repr(v) if isinstance(v, str) else str(v) for v in values])
                                          for values in entry]) for entry in cases])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--dtype', choices=list(DTYPES), nargs='+', default=list(DTYPES))
    parser.add_argument('--layout', choices=list(LAYOUTS), nargs='+', default=list(LAYOUTS))
    parser.add_argument('--batch', type=int, help='default 128 on a GPU, 32 on CPU')
    parser.add_argument('--device', choices=['cuda', 'cpu'], default='cuda')
    parser.add_argument('--variants', nargs='*', default=FAT_MODELS,
                        help='FAT variants whose depthwise-conv shapes to measure (none: leave them out)')
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--large-kernels', nargs='*', type=int, default=list(LARGE_KERNELS),
                        help='kernel sizes of the large-kernel sweep (none: leave it out)')
    parser.add_argument('--quick', action='store_true', help='fewer iterations')
    parser.add_argument('--iters', type=int, help='timed iterations per measurement (overrides --quick)')
    parser.add_argument('--margin', type=float, default=1.05,
                        help='fwd+bwd ratio a case needs at every shape to be proposed for PREFERRED_CASES')
    parser.add_argument('--json', type=Path, help='also write each row here as a JSON line, as it is measured')
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
    iters = args.iters or ((10 if args.quick else 50) if args.device == 'cuda' else (2 if args.quick else 5))
    shapes = benchmark_shapes(args.variants, args.img_size, args.large_kernels)
    print(f'# {time.strftime("%Y-%m-%d")}, {device_name}, torch {torch.__version__}, batch {batch}, '
          f'{len(shapes)} shapes; ratio = {reference} ms / ours ms (above 1: ours faster); difference = '
          f'max |ours - {reference}| / max |{reference}| over output and gradients')
    print('\n'.join(table_header(reference)))
    rows = []
    json_file = args.json.open('w') if args.json else None
    for row in benchmark_rows(shapes, args.dtype, args.layout, batch, args.device, iters, min(3, iters)):
        rows.append(row)
        print(table_row(row), flush=True)
        if json_file:
            json_file.write(json.dumps(row) + '\n')
            json_file.flush()
    if json_file:
        json_file.close()
    name = 'PREFERRED_CASES' if args.device == 'cuda' else 'PREFERRED_CPU_CASES'
    print(f'\nCases where ours was at least {args.margin}x {reference} forward + backward at every shape, with no '
          'difference flagged:')
    for layouts in [[layout] for layout in args.layout] + ([args.layout] if len(args.layout) > 1 else []):
        print(f"{' and '.join(layouts)}:\n    {format_cases(proposed_preferred_cases(rows, layouts, args.margin), name)}")


if __name__ == '__main__':
    main()
