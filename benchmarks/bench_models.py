"""Throughput and peak memory of FAT beside timm peers of similar ImageNet accuracy.

Every (model, mode, batch, size) runs in a fresh subprocess, so its peak memory is its own, and
all of them run in one invocation, so the numbers compare (``--share-process``: all in one worker
process, started again after a measurement that fails; faster on a GPU, where import and CUDA start-up
dominate, and the peak CUDA memory is still each measurement's own, but the peak RSS is the process's).
Modes build on each other:

    eager          NCHW, as built
    channels_last  + channels_last weights and input
    fused          + BatchNorm folding / re-parameterisation (timm's reparameterize_model; inference)
    compiled       + torch.compile (inference on CPU also with inductor's weight freezing, which
                   prepacks conv weights and fuses activations and adds into oneDNN convs: the CPU
                   inference recipe PyTorch recommends, applied to every model alike)

and, on request (CPU inference, fp32; needs benchmarks/requirements.txt):

    onnxruntime    fused's re-parameterised model, NCHW (an ONNX graph has one layout), exported with
                   torch.onnx's dynamo exporter with a dynamic batch dimension and run by ONNX Runtime's
                   CPU provider at its full graph optimisation, with the same thread count; its logits
                   are checked against PyTorch's before timing. FAT exports with ``--dwconv-impl torch``
                   (our depthwise kernels are not exported).

``--task train`` times forward + backward + AdamW step (fused mode does not apply; AdamW is fused on
CUDA). ``--amp bf16`` / ``fp16`` runs under ``torch.autocast`` on the device (fp16 training with loss
scaling). ``--dwconv-impl torch cuda`` measures each FAT model once per depthwise-conv implementation
(``MODEL.DWCONV_IMPL``; ours stays in compiled graphs as the ``torch.ops.fat`` operator). On CUDA,
``cudnn.benchmark`` is on. ``fat_b0_literal`` is the spec written out op by op
(benchmarks/literal_fat.py), NCHW eager only. At batch 1 the table gives each mode's latency too.

Usage:
    python -m benchmarks.bench_models                                  # inference table, CPU ~25 min
    python -m benchmarks.bench_models --task train --models fat_b0 fat_b0_literal --modes eager compiled
    python -m benchmarks.bench_models --task train --models fat_b0_literal fat_b0 --modes channels_last --repeat 5
    python -m benchmarks.bench_models --models fat_b0 --batch-size 1 --img-size 1024 --modes channels_last
    python -m benchmarks.bench_models --models fat_b0 fastvit_t8 --modes fused compiled onnxruntime \\
        --batch-size 1 32 --dwconv-impl torch --repeat 2                     # deploying on CPU
    python -m benchmarks.bench_models --models fat_b0 fastvit_t8 --modes compiled \\
        --img-size 224 384 512 768 1024 --batch-size 1 --plot resolution.png
    python -m benchmarks.bench_models --task train --amp bf16 --batch-size 128 --models fat_b0 fastvit_t8 \\
        --modes channels_last --dwconv-impl torch cuda --share-process         # GPU
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator, List, Tuple

import torch
import torch._dynamo
import torch._inductor.config
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if not __package__:  # run as a file, the project's modules would not be importable
    sys.exit('run it from the repository root as: python -m benchmarks.bench_models ...')

FAT_MODELS = ['fat_b0', 'fat_b1', 'fat_b2', 'fat_b3']
# timm models of similar ImageNet top-1: issue #2's set, then #6's additions
PEERS = ['edgenext_x_small', 'fastvit_t8', 'repvit_m0_9', 'efficientformerv2_s1', 'mobilevitv2_075',
         'edgenext_small', 'fastvit_t12', 'repvit_m1_1', 'mobilevitv2_100']
MODES = ['eager', 'channels_last', 'fused', 'compiled']  # the default set
EXPORT_MODES = ['onnxruntime']  # on request
CHANNELS_LAST_MODES = ('channels_last', 'fused', 'compiled')
INFERENCE_MODES = ('fused', 'onnxruntime')
ORT_TOLERANCE = 1e-4  # max |ONNX Runtime logits - PyTorch logits| (fp32) above which a result is flagged
AMP_DTYPES = {'none': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}
LITERAL_SUFFIX = '_literal'
WORKER = [sys.executable, '-m', 'benchmarks.bench_models']  # a measurement process, run from the repository root
RESULT_PREFIX = 'RESULT '  # marks a worker's result lines among whatever else it prints


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_name() -> str:
    """The processor's model name (Linux), else what the platform module knows."""
    try:
        with open('/proc/cpuinfo') as f:
            return next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
    except (OSError, StopIteration):
        return platform.processor() or 'cpu'


def build(name: str, mode: str, task: str, device: torch.device, dwconv_impl: str = 'auto', batch_size: int = 1,
          img_size: int = 224, amp: str = 'none') -> torch.nn.Module:
    """``name`` in ``mode`` on ``device``, its depthwise-conv kernels chosen for ``batch_size`` images of
    ``img_size`` under ``amp`` as a run chooses them (``models.choose_kernels``, before any compile)."""
    import timm
    from timm.utils.model import reparameterize_model

    import models  # registers fat_* with timm

    literal = name.endswith(LITERAL_SUFFIX)
    if literal and mode != 'eager':
        raise ValueError('the literal baseline runs in eager NCHW mode only')
    if mode in INFERENCE_MODES and task == 'train':
        raise ValueError(f'{mode} is an inference mode')
    if mode == 'onnxruntime' and device.type != 'cpu':
        raise ValueError("the onnxruntime mode runs on CPU (ONNX Runtime's CPUExecutionProvider)")
    base = name.removesuffix(LITERAL_SUFFIX)
    if dwconv_impl != 'auto' and base not in models.MODEL_ARGS:
        raise ValueError(f'{name} has no depthwise-conv implementation to choose (only FAT models do)')
    kwargs = dict(dwconv_impl=dwconv_impl) if base in models.MODEL_ARGS else {}
    model = timm.create_model(base, **kwargs).train(task == 'train').to(device)
    if literal:
        from benchmarks.literal_fat import make_literal
        make_literal(model)
    if mode in CHANNELS_LAST_MODES:
        model = model.to(memory_format=torch.channels_last)
    models.choose_kernels(model, (3, img_size, img_size), batch_size, training=task == 'train', dtype=AMP_DTYPES[amp],
                          channels_last=mode in CHANNELS_LAST_MODES)
    if mode in ('fused', 'compiled', 'onnxruntime') and task == 'infer':
        model = reparameterize_model(model, inplace=True)
    if mode == 'compiled':
        if device.type == 'cpu' and task == 'infer':
            torch._inductor.config.freezing = True
        model = torch.compile(model)
    return model


def make_step(model: torch.nn.Module, task: str, x: torch.Tensor, amp: str = 'none'):
    """One unit of timed work: an inference forward, or a full training step, under autocast to ``amp``."""
    autocast = lambda: torch.autocast(x.device.type, AMP_DTYPES[amp], enabled=amp != 'none')  # noqa: E731
    if task == 'infer':
        def step():
            with torch.inference_mode(), autocast():
                model(x)
        return step
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=x.is_cuda)
    scaler = torch.amp.GradScaler(x.device.type, enabled=amp == 'fp16')
    target = torch.randint(0, 1000, (x.shape[0],), device=x.device)

    def step():
        with autocast():
            loss = F.cross_entropy(model(x), target)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
    return step


class ExportError(RuntimeError):
    """torch.onnx.export failed; the table says 'export failed' for it."""


def onnxruntime_step(model: torch.nn.Module, x: torch.Tensor) -> Tuple[Callable[[], None], dict]:
    """Export ``model`` with torch.onnx's dynamo exporter, the batch dimension dynamic (one file serves
    every batch size), open it in ONNX Runtime's CPU provider at full graph optimisation with PyTorch's
    thread count, and compare its logits with ``model``'s on ``x``. Returns the timed step (one run on
    ``x``) and the export's figures: seconds, opset, max |logits difference|."""
    import onnxruntime

    example = torch.randn(2, *x.shape[1:])  # torch.export specialises a batch of 1 into the graph
    t0 = time.perf_counter()
    try:
        program = torch.onnx.export(model, (example,), dynamo=True, dynamic_shapes=({0: torch.export.Dim('batch')},))
    except Exception as error:
        while error.__cause__ is not None:  # the exporter wraps the failing step's own error
            error = error.__cause__
        raise ExportError(f'{type(error).__name__}: {error}'.strip().splitlines()[0]) from error
    export_s = time.perf_counter() - t0
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as folder:
        path = str(Path(folder) / 'model.onnx')
        program.save(path)
        session = onnxruntime.InferenceSession(path, options, providers=['CPUExecutionProvider'])
    feed = {session.get_inputs()[0].name: x.numpy()}
    with torch.inference_mode():
        expected = model(x)
    max_abs_diff = (torch.from_numpy(session.run(None, feed)[0]) - expected).abs().max().item()
    opset = next(o.version for o in program.model_proto.opset_import if o.domain == '')
    return (lambda: session.run(None, feed)), dict(export_s=export_s, opset=opset, max_abs_diff=max_abs_diff)


def measure(name: str, mode: str, task: str, batch_size: int, img_size: int, device: str, min_seconds: float,
            malloc: str, amp: str = 'none', dwconv_impl: str = 'auto') -> dict:
    """Run in a worker process: build, warm up, time; return img/s and memory."""
    dev = torch.device(device)
    if dev.type == 'cpu' and malloc == 'heap':
        from utils import keep_freed_memory
        keep_freed_memory()
    sync = torch.cuda.synchronize if dev.type == 'cuda' else (lambda: None)
    model = build(name, mode, task, dev, dwconv_impl, batch_size, img_size, amp)
    x = torch.randn(batch_size, 3, img_size, img_size, device=dev)
    if mode in CHANNELS_LAST_MODES:
        x = x.to(memory_format=torch.channels_last)
    rss_before = peak_rss_mb()  # so the exporter's memory counts, as the compiler's does in 'compiled'
    exported = {}
    if mode == 'onnxruntime':
        if amp != 'none':
            raise ValueError('the onnxruntime mode runs the fp32 graph: leave --amp at none')
        step, exported = onnxruntime_step(model, x)
    else:
        step = make_step(model, task, x, amp)
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
    result = dict(model=name, mode=mode, task=task, batch=batch_size, img=img_size, amp=amp, dwconv_impl=dwconv_impl,
                  img_s=batch_size * iters / elapsed, latency_s=elapsed / iters, first_call_s=first_call,
                  peak_rss_mb=peak_rss_mb(), extra_rss_mb=peak_rss_mb() - rss_before, **exported)
    if dev.type == 'cuda':
        result['peak_cuda_mb'] = torch.cuda.max_memory_allocated() / 2 ** 20
    return result


def measurement_specs(names: List[str], modes: List[str], batch_sizes: List[int], img_sizes: List[int],
                      dwconv_impls: List[str]) -> List[dict]:
    """Every (model, batch, size, mode, depthwise-conv implementation) to measure, in table order: the
    literal baseline in eager mode only, implementations other than 'auto' for FAT models only."""
    from models import MODEL_ARGS

    specs = []
    for name in names:
        for batch_size in batch_sizes:
            for img_size in img_sizes:
                for mode in (['eager'] if name.endswith(LITERAL_SUFFIX) else modes):
                    for impl in dwconv_impls if name in MODEL_ARGS else ['auto']:
                        specs.append(dict(model=name, mode=mode, batch=batch_size, img=img_size, dwconv_impl=impl))
    return specs


def _worker_loop(specs: List[dict], task: str, device: str, min_seconds: float, malloc: str, amp: str) -> None:
    """A worker process: measure each spec in turn, printing one result line each as it is done. The
    first failure is printed as that spec's result and ends the process (a CUDA error can leave the
    device unusable), so the parent starts a fresh worker for the rest."""
    for spec in specs:
        try:
            result = measure(spec['model'], spec['mode'], task, spec['batch'], spec['img'], device, min_seconds,
                             malloc, amp, spec['dwconv_impl'])
        except Exception as error:
            print(RESULT_PREFIX + json.dumps(dict(spec, error=f'{type(error).__name__}: {error}'.splitlines()[0])),
                  flush=True)
            sys.exit(1)
        print(RESULT_PREFIX + json.dumps(result), flush=True)
        gc.collect()
        torch._dynamo.reset()  # compiled code keeps its model alive otherwise
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def run_measurements(specs: List[dict], task: str, device: str, min_seconds: float, threads: int, malloc: str,
                     amp: str = 'none', share_process: bool = False) -> Iterator[dict]:
    """Measure ``specs`` (from ``measurement_specs``) in worker processes, one per spec, or with
    ``share_process`` one for all (a fresh one after a failure); yield each result as it comes. A worker
    that dies without reporting gives its current spec an ``error`` naming its exit code and last line."""
    pending = list(specs)
    while pending:
        batch = pending if share_process else pending[:1]
        cmd = [*WORKER, '--worker', json.dumps(batch), '--task', task, '--device', device,
               '--min-seconds', str(min_seconds), '--threads', str(threads), '--malloc', malloc, '--amp', amp]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
        done, reported_failure, last_line = 0, False, 'failed'
        for line in proc.stdout:
            if line.startswith(RESULT_PREFIX):
                result = json.loads(line[len(RESULT_PREFIX):])
                done, reported_failure = done + 1, 'error' in result
                yield result
            elif line.strip():
                last_line = line.strip()
        proc.wait()
        if done < len(batch) and not reported_failure:  # it died in the middle of a measurement
            yield dict(batch[done], error=f'worker exited with {proc.returncode}: {last_line}')
            done += 1
        pending = pending[done:]


def format_result(r: dict) -> str:
    """One measurement as a progress line."""
    label = r['model'] + (f" [dwconv {r['dwconv_impl']}]" if r['dwconv_impl'] != 'auto' else '')
    head = f"  {label:<30} {r['mode']:<14} b{r['batch']:<4} {r['img']:<5} "
    if 'error' in r:
        return head + f"error: {r['error']}"
    memory = (f"peak CUDA {r['peak_cuda_mb']:.0f} MB" if 'peak_cuda_mb' in r
              else f"peak RSS {r['peak_rss_mb']:.0f} MB (+{r['extra_rss_mb']:.0f})")
    exported = (f"  export {r['export_s']:.0f} s, opset {r['opset']}, max |logits - PyTorch's| {r['max_abs_diff']:.1e}"
                + (f' ABOVE {ORT_TOLERANCE:g}' if r['max_abs_diff'] > ORT_TOLERANCE else '') if 'opset' in r else '')
    return head + (f"{r['img_s']:8.1f} img/s {r['latency_s'] * 1000:9.1f} ms/step  first {r['first_call_s']:5.1f} s  "
                   + memory + exported)


def median_runs(runs: list) -> list:
    """One result per (model, mode, batch, size): the run with the median throughput (``--repeat``
    runs the whole list again, interleaved, so a slow spell of a shared machine hits every model)."""
    groups: dict = {}
    for r in runs:
        groups.setdefault((r['model'], r['mode'], r['batch'], r['img'], r['dwconv_impl']), []).append(r)
    results = []
    for group in groups.values():
        ok = sorted((r for r in group if 'error' not in r), key=lambda r: r['img_s'])
        results.append(dict(ok[(len(ok) - 1) // 2], runs=len(ok)) if ok else group[0])
    return results


def table_lines(results: list, modes: list) -> List[str]:
    """Markdown table: img/s per mode (at batch 1 with the latency), then the best mode with its peak
    memory (CUDA memory on a GPU, else resident memory and its growth over the built model); one row per
    model (and depthwise-conv implementation where it is not 'auto'), batch and size."""
    mem_keys = ['peak_cuda_mb'] if any('peak_cuda_mb' in r for r in results) else ['peak_rss_mb', 'extra_rss_mb']
    columns = ['model', 'batch', 'size'] + modes + ['best img/s', 'best mode'] + [f'{k} (best)' for k in mem_keys]
    lines = ['| ' + ' | '.join(columns) + ' |', '|' + '|'.join('---' for _ in columns) + '|']
    rows: dict = {}
    for r in results:
        rows.setdefault((_row_label(r), r['batch'], r['img']), {})[r['mode']] = r
    for (name, batch, img), per_mode in rows.items():
        ok = {m: r for m, r in per_mode.items() if 'error' not in r}
        cells = [f"{ok[m]['img_s']:.1f}" + (f" ({ok[m]['latency_s'] * 1000:.1f} ms)" if batch == 1 else '')
                 if m in ok else _failure_cell(per_mode.get(m)) for m in modes]
        best = max(ok.values(), key=lambda r: r['img_s'], default=None)
        cells += ([f"{best['img_s']:.1f}", best['mode']] + [f"{best[k]:.0f}" for k in mem_keys]
                  if best else ['-'] * (2 + len(mem_keys)))
        lines.append('| ' + ' | '.join([name, str(batch), str(img)] + cells) + ' |')
    return lines


def _row_label(r: dict) -> str:
    return r['model'] + (f" (dwconv {r['dwconv_impl']})" if r['dwconv_impl'] != 'auto' else '')


def _failure_cell(result) -> str:
    if result is None:
        return ''
    return 'export failed' if result['error'].startswith(ExportError.__name__) else 'n/a'


def export_lines(results: list) -> List[str]:
    """Markdown table of the onnxruntime results' exports: seconds, ONNX opset and the largest difference
    of ONNX Runtime's logits from PyTorch's, flagged above ``ORT_TOLERANCE``."""
    lines = ['| model | batch | size | export s | opset | max abs logits diff vs PyTorch |', '|---' * 6 + '|']
    for r in results:
        if 'opset' in r:
            flag = f' (above {ORT_TOLERANCE:g})' if r['max_abs_diff'] > ORT_TOLERANCE else ''
            lines.append(f"| {_row_label(r)} | {r['batch']} | {r['img']} | {r['export_s']:.1f} | {r['opset']} | "
                         f"{r['max_abs_diff']:.1e}{flag} |")
    return lines


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
    parser.add_argument('--modes', nargs='+', default=MODES, choices=MODES + EXPORT_MODES)
    parser.add_argument('--batch-size', type=int, nargs='+', default=[32])
    parser.add_argument('--img-size', type=int, nargs='+', default=[224])
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--threads', type=int, default=os.cpu_count())
    parser.add_argument('--min-seconds', type=float, default=5.0, help='timed duration per measurement')
    parser.add_argument('--amp', choices=list(AMP_DTYPES), default='none', help='autocast dtype on the device')
    parser.add_argument('--dwconv-impl', nargs='+', choices=['auto', 'torch', 'cuda'], default=['auto'],
                        help="FAT models: measure each with these MODEL.DWCONV_IMPL values")
    parser.add_argument('--share-process', action='store_true',
                        help='run every measurement in one worker process (peak RSS is then the process\'s)')
    parser.add_argument('--malloc', choices=['heap', 'system'], default='heap',
                        help="CPU: 'heap' keeps large freed blocks for reuse as main.py does (utils.keep_freed_memory) "
                             "for every model alike; 'system' leaves glibc's default")
    parser.add_argument('--repeat', type=int, default=1,
                        help='run every measurement this many times, interleaved; the table gives the median')
    parser.add_argument('--json', type=Path, help='also write the raw results here')
    parser.add_argument('--plot', type=Path, help='also draw throughput against the swept size to this PNG')
    parser.add_argument('--worker', metavar='SPECS_JSON', help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    if args.worker:
        if args.device == 'cuda':
            torch.backends.cudnn.benchmark = True
        _worker_loop(json.loads(args.worker), args.task, args.device, args.min_seconds, args.malloc, args.amp)
        return

    device_name = torch.cuda.get_device_name() if args.device == 'cuda' else cpu_name()
    task = 'inference' if args.task == 'infer' else 'training step (fwd+bwd+AdamW)'
    malloc = '' if args.device == 'cuda' else f'malloc {args.malloc}, '
    precision = 'fp32' if args.amp == 'none' else f'AMP {args.amp}'
    runtimes = f'torch {torch.__version__}'
    if 'onnxruntime' in args.modes:
        import onnxruntime
        runtimes += f', onnxruntime {onnxruntime.__version__}'
    title = (f'{time.strftime("%Y-%m-%d")}, {device_name}, {args.threads} threads, {runtimes}, '
             f'{precision}, {malloc}{task} img/s')
    print('# ' + title)
    modes = [m for m in args.modes if not (m in INFERENCE_MODES and args.task == 'train')]
    specs = measurement_specs(args.models, modes, args.batch_size, args.img_size, args.dwconv_impl) * args.repeat
    runs = []
    for r in run_measurements(specs, args.task, args.device, args.min_seconds, args.threads, args.malloc, args.amp,
                              args.share_process):
        runs.append(r)
        print(format_result(r), flush=True)
    results = median_runs(runs)
    print()
    print('\n'.join(table_lines(results, modes)))
    if any('opset' in r for r in results):
        print()
        print('\n'.join(export_lines(results)))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    if args.plot:
        plot(results, args.plot, title)


if __name__ == '__main__':
    main()
