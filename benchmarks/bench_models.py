"""Throughput and peak memory of FAT beside timm peers of similar ImageNet accuracy.

Every (model, mode, batch, size) runs in a fresh subprocess, so its peak memory is its own, and
all of them run in one invocation, so the numbers compare. Modes build on each other:

    eager          NCHW, as built
    channels_last  + channels_last weights and input
    fused          + BatchNorm folding / re-parameterisation (timm's reparameterize_model; inference)
    compiled       + torch.compile (inference on CPU also with inductor's weight freezing, which
                   prepacks conv weights and fuses activations and adds into oneDNN convs: the CPU
                   inference recipe PyTorch recommends, applied to every model alike)

``--task train`` times forward + backward + AdamW step (fused mode does not apply).
``fat_b0_literal`` is the spec written out op by op (benchmarks/literal_fat.py), NCHW eager only.

Usage:
    python benchmarks/bench_models.py                                  # inference table, CPU ~25 min
    python benchmarks/bench_models.py --task train --models fat_b0 fat_b0_literal --modes eager compiled
    python benchmarks/bench_models.py --task train --models fat_b0_literal fat_b0 --modes channels_last --repeat 5
    python benchmarks/bench_models.py --models fat_b0 --batch-size 1 --img-size 1024 --modes channels_last
    python benchmarks/bench_models.py --models fat_b0 fastvit_t8 --modes compiled \\
        --img-size 224 384 512 768 1024 --batch-size 1 --plot resolution.png
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch._inductor.config
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FAT_MODELS = ['fat_b0', 'fat_b1', 'fat_b2', 'fat_b3']
# timm models of similar ImageNet top-1: issue #2's set, then #6's additions
PEERS = ['edgenext_x_small', 'fastvit_t8', 'repvit_m0_9', 'efficientformerv2_s1', 'mobilevitv2_075',
         'edgenext_small', 'fastvit_t12', 'repvit_m1_1', 'mobilevitv2_100']
MODES = ['eager', 'channels_last', 'fused', 'compiled']
LITERAL_SUFFIX = '_literal'


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_name() -> str:
    """The processor's model name (Linux), else what the platform module knows."""
    try:
        with open('/proc/cpuinfo') as f:
            return next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
    except (OSError, StopIteration):
        return platform.processor() or 'cpu'


def build(name: str, mode: str, task: str, device: torch.device) -> torch.nn.Module:
    import timm
    from timm.utils.model import reparameterize_model

    import models  # noqa: F401  (registers fat_*)

    literal = name.endswith(LITERAL_SUFFIX)
    if literal and mode != 'eager':
        raise ValueError('the literal baseline runs in eager NCHW mode only')
    if mode == 'fused' and task == 'train':
        raise ValueError('fused (BatchNorm folding) is an inference mode')
    model = timm.create_model(name.removesuffix(LITERAL_SUFFIX)).train(task == 'train').to(device)
    if literal:
        from benchmarks.literal_fat import make_literal
        make_literal(model)
    if mode != 'eager':
        model = model.to(memory_format=torch.channels_last)
    if mode in ('fused', 'compiled') and task == 'infer':
        model = reparameterize_model(model, inplace=True)
    if mode == 'compiled':
        if device.type == 'cpu' and task == 'infer':
            torch._inductor.config.freezing = True
        model = torch.compile(model)
    return model


def make_step(model: torch.nn.Module, task: str, x: torch.Tensor):
    """One unit of timed work: an inference forward, or a full training step."""
    if task == 'infer':
        def step():
            with torch.inference_mode():
                model(x)
        return step
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    target = torch.randint(0, 1000, (x.shape[0],), device=x.device)

    def step():
        loss = F.cross_entropy(model(x), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def measure(name: str, mode: str, task: str, batch_size: int, img_size: int, device: str, min_seconds: float,
            malloc: str) -> dict:
    """Run in a worker process: build, warm up, time; return img/s and memory."""
    dev = torch.device(device)
    if dev.type == 'cpu' and malloc == 'heap':
        from utils import keep_freed_memory
        keep_freed_memory()
    sync = torch.cuda.synchronize if dev.type == 'cuda' else (lambda: None)
    model = build(name, mode, task, dev)
    x = torch.randn(batch_size, 3, img_size, img_size, device=dev)
    if mode != 'eager':
        x = x.to(memory_format=torch.channels_last)
    step = make_step(model, task, x)
    rss_before = peak_rss_mb()
    if dev.type == 'cuda':
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    step()  # includes compilation for 'compiled'
    sync()
    first_call = time.perf_counter() - t0
    step()
    sync()
    iters, t0 = 0, time.perf_counter()
    while iters < 3 or time.perf_counter() - t0 < min_seconds:
        step()
        iters += 1
    sync()
    elapsed = time.perf_counter() - t0
    result = dict(model=name, mode=mode, task=task, batch=batch_size, img=img_size,
                  img_s=batch_size * iters / elapsed, latency_s=elapsed / iters, first_call_s=first_call,
                  peak_rss_mb=peak_rss_mb(), extra_rss_mb=peak_rss_mb() - rss_before)
    if dev.type == 'cuda':
        result['peak_cuda_mb'] = torch.cuda.max_memory_allocated() / 2 ** 20
    return result


def run_worker(args: argparse.Namespace, name: str, mode: str, batch_size: int, img_size: int) -> dict:
    cmd = [sys.executable, __file__, '--worker', name, mode, '--task', args.task, '--batch-size', str(batch_size),
           '--img-size', str(img_size), '--device', args.device, '--min-seconds', str(args.min_seconds),
           '--threads', str(args.threads), '--malloc', args.malloc]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        return dict(model=name, mode=mode, batch=batch_size, img=img_size, error=lines[-1] if lines else 'failed')
    return json.loads(proc.stdout.strip().splitlines()[-1])


def median_runs(runs: list) -> list:
    """One result per (model, mode, batch, size): the run with the median throughput (``--repeat``
    runs the whole list again, interleaved, so a slow spell of a shared machine hits every model)."""
    groups: dict = {}
    for r in runs:
        groups.setdefault((r['model'], r['mode'], r['batch'], r['img']), []).append(r)
    results = []
    for group in groups.values():
        ok = sorted((r for r in group if 'error' not in r), key=lambda r: r['img_s'])
        results.append(dict(ok[(len(ok) - 1) // 2], runs=len(ok)) if ok else group[0])
    return results


def print_table(results: list, modes: list) -> None:
    """Markdown table: img/s per mode, then the best mode with its peak memory."""
    mem_key = 'peak_cuda_mb' if any('peak_cuda_mb' in r for r in results) else 'peak_rss_mb'
    columns = ['model', 'batch', 'size'] + modes + ['best img/s', 'best mode', f'{mem_key} (best)', 'extra RSS MB']
    print('| ' + ' | '.join(columns) + ' |')
    print('|' + '|'.join('---' for _ in columns) + '|')
    rows: dict = {}
    for r in results:
        rows.setdefault((r['model'], r['batch'], r['img']), {})[r['mode']] = r
    for (name, batch, img), per_mode in rows.items():
        ok = {m: r for m, r in per_mode.items() if 'error' not in r}
        cells = [f"{ok[m]['img_s']:.1f}" if m in ok else ('n/a' if m in per_mode else '') for m in modes]
        best = max(ok.values(), key=lambda r: r['img_s'], default=None)
        cells += ([f"{best['img_s']:.1f}", best['mode'], f"{best[mem_key]:.0f}", f"{best['extra_rss_mb']:.0f}"]
                  if best else ['-'] * 4)
        print('| ' + ' | '.join([name, str(batch), str(img)] + cells) + ' |')


def plot(results: list, path: Path, title: str) -> None:
    """Throughput against image size (or batch size, whichever varies), one line per model/mode."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    ok = [r for r in results if 'error' not in r]
    x_key = 'img' if len({r['img'] for r in ok}) > 1 else 'batch'
    fig, ax = plt.subplots(figsize=(8, 5))
    for name_mode in dict.fromkeys((r['model'], r['mode']) for r in ok):
        pts = sorted((r[x_key], r['img_s']) for r in ok if (r['model'], r['mode']) == name_mode)
        ax.plot(*zip(*pts), marker='o', label=f'{name_mode[0]} ({name_mode[1]})')
    ax.set_xlabel('image size (px)' if x_key == 'img' else 'batch size')
    ax.set_ylabel('images / s')
    ax.set_yscale('log')
    ax.grid(True, which='both', alpha=0.3)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--task', choices=['infer', 'train'], default='infer')
    parser.add_argument('--models', nargs='+', default=FAT_MODELS + PEERS)
    parser.add_argument('--modes', nargs='+', default=MODES, choices=MODES)
    parser.add_argument('--batch-size', type=int, nargs='+', default=[32])
    parser.add_argument('--img-size', type=int, nargs='+', default=[224])
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--threads', type=int, default=os.cpu_count())
    parser.add_argument('--min-seconds', type=float, default=5.0, help='timed duration per measurement')
    parser.add_argument('--malloc', choices=['heap', 'system'], default='heap',
                        help="CPU: 'heap' keeps large freed blocks for reuse as main.py does (utils.keep_freed_memory) "
                             "for every model alike; 'system' leaves glibc's default")
    parser.add_argument('--repeat', type=int, default=1,
                        help='run every measurement this many times, interleaved; the table gives the median')
    parser.add_argument('--json', type=Path, help='also write the raw results here')
    parser.add_argument('--plot', type=Path, help='also draw throughput against the swept size to this PNG')
    parser.add_argument('--worker', nargs=2, metavar=('MODEL', 'MODE'), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    if args.worker:
        print(json.dumps(measure(*args.worker, args.task, args.batch_size[0], args.img_size[0], args.device,
                                 args.min_seconds, args.malloc)))
        return

    device_name = torch.cuda.get_device_name() if args.device == 'cuda' else cpu_name()
    task = 'inference' if args.task == 'infer' else 'training step (fwd+bwd+AdamW)'
    malloc = '' if args.device == 'cuda' else f'malloc {args.malloc}, '
    title = (f'{time.strftime("%Y-%m-%d")}, {device_name}, {args.threads} threads, torch {torch.__version__}, '
             f'fp32, {malloc}{task} img/s')
    print('# ' + title)
    modes = [m for m in args.modes if not (m == 'fused' and args.task == 'train')]
    runs = []
    for _ in range(args.repeat):
        for name in args.models:
            for batch_size in args.batch_size:
                for img_size in args.img_size:
                    for mode in (['eager'] if name.endswith(LITERAL_SUFFIX) else modes):
                        r = run_worker(args, name, mode, batch_size, img_size)
                        runs.append(r)
                        print(f"  {name:<22} {mode:<14} b{batch_size:<4} {img_size:<5} " + (
                            f"{r['img_s']:8.1f} img/s {r['latency_s'] * 1000:9.1f} ms/step  first {r['first_call_s']:5.1f} s  "
                            f"peak RSS {r['peak_rss_mb']:.0f} MB (+{r['extra_rss_mb']:.0f})" if 'error' not in r
                            else f"error: {r['error']}"), flush=True)
    results = median_runs(runs)
    print()
    print_table(results, modes)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    if args.plot:
        plot(results, args.plot, title)


if __name__ == '__main__':
    main()
