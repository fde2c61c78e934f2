"""Everything a GPU can tell us about this project, measured by one command into one report.

    python -m benchmarks.gpu_report --out /tmp/report                    # every part
    python -m benchmarks.gpu_report --out /tmp/report --part kernels sanitizer dwconv train throughput
    python -m benchmarks.gpu_report --tiny --out /tmp/tiny              # without a GPU: tiny sizes on CPU

Parts, run in this order (``--part`` picks several; default all):

    kernels     JIT-build the CUDA extension (timed) and self-check it; tests/test_kernels.py -m gpu
    sanitizer   compute-sanitizer memcheck and racecheck, side by side, on forward + backward of our
                kernels for every (kernel, stride) FAT uses and kernels 11 and 31, fp16 and bf16, on the
                kernels' self-check shapes (kernels.dwconv.SELF_CHECK_SHAPES)
    dwconv      benchmarks/bench_dwconv.py: ours against cuDNN at every depthwise shape of --variants and
                a large-kernel sweep; times, output and gradient differences, the PREFERRED_CASES they support
    infer       benchmarks/bench_models.py: inference img/s and peak memory, batch 256, AMP bf16,
                channels_last eager and compiled, FAT beside timm peers
    train       the same for a training step (batch 128, fused AdamW), FAT's depthwise convs on PyTorch
                and on ours (--dwconv-impl)
    throughput  main.py --throughput end to end (FAT-B0, batch 256, channels_last)
    loaders     benchmarks/bench_loaders.py: data loaders' img/s and cores per GPU with FAT-B0's training
                transforms: ours (folder, shards), DALI on CPU and DALI 'mixed' (GPU decoding)

Each part catches its own failure: it is recorded and the next part runs. report.md and report.json in
--out are rewritten after every part, and the dwconv, infer and train parts append their rows to
<part>.jsonl there as they are measured, so a run cut short keeps what it finished. Every figure is
printed as it is produced. Without a GPU, ``--tiny`` runs what can run on CPU (fp32, tiny sizes) and
marks the GPU-only parts skipped, so that the script is exercised by the test suite.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
if not __package__:  # run as a file, the project's modules would not be importable
    sys.exit('run it from the repository root as: python -m benchmarks.gpu_report ...')

WORKER = [sys.executable, '-m', 'benchmarks.gpu_report']  # this script in a fresh process, from the root
PARTS = ['kernels', 'sanitizer', 'dwconv', 'infer', 'train', 'throughput', 'loaders']
# timm models beside FAT in infer and train (issue 14; bench_models.PEERS is the CPU tables' set)
REPORT_PEERS = ['fastvit_t8', 'fastvit_t12', 'repvit_m0_9', 'repvit_m1_1', 'efficientformerv2_s1', 'edgenext_small',
                'mobilevitv2_075', 'efficientvit_b1', 'mobilenetv4_conv_medium']
# --tiny: what runs in the test suite. On CPU it also runs fp32: bf16 autocast there made a FAT-B0
# training step about 7x slower.
TINY = dict(infer_batch=2, train_batch=2, img_size=32, dwconv_batch=2, dwconv_iters=1, min_seconds=0.0,
            models=['fat_b0', 'repvit_m0_9'], variants=['fat_b0'], large_kernels=[7, 31], modes=['channels_last'])
SANITIZER_EXTRA_KERNELS = (11, 31)  # the runtime-size path, at its smallest and largest
RESULT_PREFIX = 'RESULT '


@dataclass
class Part:
    """What a part found: ``status`` ok, attention (it ran and found something to look at), error (it
    failed) or skipped; a one-line ``note``; ``data`` for report.json; Markdown ``lines`` for report.md."""
    status: str = 'ok'
    note: str = ''
    data: dict = field(default_factory=dict)
    lines: List[str] = field(default_factory=list)


def run_streamed(cmd: List[str], timeout: Optional[float], prefix: str = '') -> dict:
    """Run ``cmd`` in the repository root, printing its output lines as they come; return its exit
    code, output lines, seconds and whether it timed out (then its process group is killed)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors='replace', start_new_session=True)
    lines: List[str] = []

    def pump() -> None:
        for line in proc.stdout:
            lines.append(line.rstrip('\n'))
            print(prefix + lines[-1], flush=True)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    timed_out = False
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    reader.join(10)
    return dict(cmd=' '.join(cmd), rc=proc.returncode, lines=lines, seconds=time.perf_counter() - start,
                timed_out=timed_out)


def command_output(cmd: List[str]) -> Optional[str]:
    """Stripped stdout of a short command, or None where it is missing or fails."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=ROOT)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def sanitizer_path() -> Optional[str]:
    """compute-sanitizer on PATH, else in /usr/local/cuda/bin, else None."""
    found = shutil.which('compute-sanitizer')
    default = '/usr/local/cuda/bin/compute-sanitizer'
    return found or (default if os.path.exists(default) else None)


def machine_header(device: str) -> Dict[str, Optional[str]]:
    """GPU, driver, CUDA, cuDNN, torch, timm, Python, CPU, date and commit."""
    import timm
    import torch

    from benchmarks.bench_models import cpu_name

    nvcc = command_output(['nvcc', '--version'])
    sanitizer = sanitizer_path()
    sanitizer_version = command_output([sanitizer, '--version']) if sanitizer else None
    commit = command_output(['git', 'rev-parse', '--short', 'HEAD'])
    if commit and subprocess.run(['git', 'diff-index', '--quiet', 'HEAD', '--'], cwd=ROOT).returncode:
        commit += ' with uncommitted changes'
    return {
        'date': time.strftime('%Y-%m-%d %H:%M:%S %Z'),
        'gpu': torch.cuda.get_device_name() if device == 'cuda' else None,
        'nvidia-smi (name, driver, memory)': command_output(
            ['nvidia-smi', '--query-gpu=name,driver_version,memory.total', '--format=csv,noheader']),
        'CUDA (torch built with)': torch.version.cuda,
        'nvcc': next((line for line in nvcc.splitlines() if 'release' in line), None) if nvcc else None,
        'cuDNN': str(torch.backends.cudnn.version()) if torch.backends.cudnn.is_available() else None,
        'compute-sanitizer': sanitizer_version.splitlines()[-1] if sanitizer_version else None,
        'torch': torch.__version__,
        'timm': timm.__version__,
        'Python': platform.python_version(),
        'CPU': f'{cpu_name()}, {os.cpu_count()} cores',
        'commit': commit,
    }


class Run:
    """One invocation: its settings, the extension build shared by the parts that need it, and the
    report, written after every part."""

    def __init__(self, args: argparse.Namespace, sizes: dict, device: str, command: str):
        self.args, self.sizes, self.device, self.gpu, self.command = args, sizes, device, device == 'cuda', command
        self.out: Path = args.out
        self.extension: Optional[dict] = None
        self.header = machine_header(device)
        self.parts: Dict[str, dict] = {name: dict(status='pending') for name in args.part}
        self.lines: Dict[str, List[str]] = {}

    def ensure_extension(self) -> dict:
        """Build (or load the cached build of) the CUDA extension in a fresh process, once per run."""
        if self.extension is None:
            result = run_streamed([*WORKER, '--worker', 'extension'], self.args.part_timeout)
            found = [line for line in result['lines'] if line.startswith(RESULT_PREFIX)]
            self.extension = (json.loads(found[-1][len(RESULT_PREFIX):]) if found else
                              dict(built=False, usable=False, seconds=result['seconds'],
                                   problem=(result['lines'] or ['no output'])[-1]))
        return self.extension

    def jsonl(self, part: str) -> Path:
        return self.out / f'{part}.jsonl'

    def write(self) -> None:
        """report.json and report.md, each replaced in one step."""
        report = dict(header=self.header, command=self.command, parts=self.parts)
        md = [f"# GPU report, {self.header['date']}", '', '| | |', '|---|---|']
        md += [f'| {key} | {value if value is not None else "-"} |' for key, value in self.header.items()]
        md += ['', f"`{report['command']}`", '', '| part | status | seconds | note |', '|---|---|---|---|']
        for name, part in self.parts.items():
            seconds = f"{part['seconds']:.0f}" if 'seconds' in part else ''
            md.append(f"| {name} | {part['status']} | {seconds} | {part.get('note', '')} |")
        for name, lines in self.lines.items():
            md += ['', f'## {name}', ''] + lines
        from utils import atomic_write_text
        for file, text in (('report.json', json.dumps(report, indent=1)), ('report.md', '\n'.join(md) + '\n')):
            atomic_write_text(text, str(self.out / file))

    def run_part(self, name: str) -> None:
        print(f'\n=== {name} ===', flush=True)
        start = time.perf_counter()
        try:
            part = PART_FUNCTIONS[name](self)
        except Exception as error:  # a broken part must not lose the others
            traceback.print_exc()
            part = Part('error', f'{type(error).__name__}: {error}'.splitlines()[0],
                        dict(traceback=traceback.format_exc()),
                        ['```', *traceback.format_exc().strip().splitlines()[-12:], '```'])
        seconds = time.perf_counter() - start
        self.parts[name] = dict(status=part.status, seconds=seconds, note=part.note, data=part.data)
        self.lines[name] = part.lines or [part.note]
        self.write()
        print(f'=== {name}: {part.status} in {seconds:.0f} s{": " + part.note if part.note else ""}', flush=True)


def pytest_counts(lines: List[str]) -> Dict[str, int]:
    """The counts of pytest's final summary line ('3 passed, 1 skipped in 2.0s')."""
    summary = next((line for line in reversed(lines) if re.search(r'\bin [\d.]+s\b', line)), '')
    return {word: int(n) for n, word in re.findall(r'(\d+) (passed|failed|skipped|deselected|errors?|xfailed|xpassed)',
                                                   summary)}


def part_kernels(run: Run) -> Part:
    if not run.gpu:
        return Part('skipped', 'needs a CUDA GPU; none is visible')
    ext = run.ensure_extension()
    lines = [f"- extension: {'built' if ext['built'] else 'NOT built'} in {ext['seconds']:.1f} s; self-check "
             f"{'passed' if ext['usable'] else 'FAILED or not run'}" + (f"; {ext['problem']}" if ext.get('problem') else '')]
    base = [sys.executable, '-m', 'pytest', 'tests/test_kernels.py', '-q', '-rfE', '-p', 'no:cacheprovider']
    tests = run_streamed(base + ['-m', 'gpu'], run.args.part_timeout)
    if tests['rc'] == 5:  # nothing carries the gpu marker yet
        tests = run_streamed(base + ['-k', 'gpu or cuda'], run.args.part_timeout)
    counts = pytest_counts(tests['lines'])
    failed = [line for line in tests['lines'] if line.startswith(('FAILED ', 'ERROR '))]
    lines += [f"- `{tests['cmd'].replace(sys.executable, 'python')}`: "
              + (', '.join(f'{n} {word}' for word, n in counts.items()) or 'no summary line')
              + f" in {tests['seconds']:.0f} s" + (' (timed out)' if tests['timed_out'] else '')]
    lines += [f'  - {line}' for line in failed]
    bad = not ext['usable'] or tests['rc'] != 0
    note = f"build {ext['seconds']:.0f} s; tests " + (', '.join(f'{n} {w}' for w, n in counts.items()) or f"rc {tests['rc']}")
    return Part('attention' if bad else 'ok', note, dict(extension=ext, tests=dict(counts, rc=tests['rc'], failed=failed,
                                                                                   seconds=tests['seconds'])), lines)


def sanitizer_cases(run: Run) -> List[List[int]]:
    """(kernel, stride) of every depthwise conv of --variants, and the runtime-size kernels at stride 1."""
    from benchmarks.bench_dwconv import fat_depthwise_convs

    cases = {(k, s) for variant in run.args.variants for *_, k, s in fat_depthwise_convs(variant, run.args.img_size)}
    return [list(case) for case in sorted(cases | {(k, 1) for k in SANITIZER_EXTRA_KERNELS})]


def part_sanitizer(run: Run) -> Part:
    from kernels.dwconv import SELF_CHECK_SHAPES

    cases = sanitizer_cases(run)
    expected = len(cases) * (2 if run.gpu else 1) * len(SELF_CHECK_SHAPES)  # fp16 and bf16 on a GPU, else fp32
    worker = [*WORKER, '--worker', 'sanitizer-cases', '--cases', json.dumps(cases)]
    tool = sanitizer_path()
    if not run.gpu or not tool:
        # Still run the case script (on CPU in fp32, or on the GPU without a sanitizer) so it cannot rot.
        result = run_streamed(worker + ['--device', run.device], run.args.sanitizer_timeout)
        done = sum(line.startswith('case ') for line in result['lines'])
        why = 'needs a CUDA GPU' if not run.gpu else 'compute-sanitizer not found (PATH, /usr/local/cuda/bin)'
        note = f"{why}; the case script ran without it on {run.device}: {done}/{expected} cases, rc {result['rc']}"
        return Part('skipped', note, dict(cases=cases, done=done, expected=expected, rc=result['rc']))
    ext = run.ensure_extension()
    if not ext['built']:
        return Part('error', 'the CUDA extension could not be built (see kernels)', dict(extension=ext))
    results: Dict[str, dict] = {}

    def check(name: str) -> None:
        results[name] = run_streamed([tool, '--tool', name] + worker + ['--device', 'cuda'], run.args.sanitizer_timeout,
                                     prefix=f'[{name}] ')

    threads = [threading.Thread(target=check, args=(name,)) for name in run.args.sanitizer_tools]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    data, lines, bad = dict(cases=cases, shapes=SELF_CHECK_SHAPES), [], False
    for name, result in results.items():
        summary = [line.strip('= ') for line in result['lines'] if re.search(r'(ERROR|RACECHECK) SUMMARY', line)]
        errors = sum(int(n) for line in summary for n in re.findall(r'(\d+) errors?', line))
        reports = [line for line in result['lines'] if line.startswith('========= ') and 'SUMMARY' not in line
                   and not line.startswith('=========  ') and 'COMPUTE-SANITIZER' not in line]
        done = sum(line.startswith('case ') for line in result['lines'])
        bad |= errors > 0 or result['rc'] != 0 or result['timed_out'] or done < expected
        data[name] = dict(summary=summary, errors=errors, reports=reports[:20], cases_done=done, rc=result['rc'],
                          seconds=result['seconds'], timed_out=result['timed_out'])
        lines.append(f"- {name}: {'; '.join(summary) or 'no summary line'}; {done}/{expected} cases in "
                     f"{result['seconds']:.0f} s, rc {result['rc']}" + (' (timed out)' if result['timed_out'] else ''))
        lines += [f'  - `{line}`' for line in (reports[:10] if summary else result['lines'][-5:])]
    note = '; '.join(f"{name} {data[name]['errors']} errors, {data[name]['cases_done']}/{expected} cases"
                     for name in results)
    return Part('attention' if bad else 'ok', note, data, lines)


def part_dwconv(run: Run) -> Part:
    from benchmarks import bench_dwconv

    args, sizes, rows_file = run.args, run.sizes, run.jsonl('dwconv')
    cmd = [sys.executable, '-m', 'benchmarks.bench_dwconv', '--device', run.device, '--img-size', str(args.img_size),
           '--batch', str(sizes['dwconv_batch']), '--iters', str(args.dwconv_iters), '--margin', str(args.margin),
           '--dtype', *args.dwconv_dtypes, '--layout', *args.dwconv_layouts, '--variants', *args.variants,
           '--large-kernels', *map(str, sizes['large_kernels']), '--json', str(rows_file)]
    result = run_streamed(cmd, args.part_timeout)
    rows = [json.loads(line) for line in rows_file.read_text().splitlines()] if rows_file.exists() else []
    dtypes = [d for d in args.dwconv_dtypes if run.gpu or d == 'fp32']
    expected = len(bench_dwconv.benchmark_shapes(args.variants, args.img_size, sizes['large_kernels'])) * len(dtypes) \
        * len(args.dwconv_layouts)
    reference = 'cuDNN' if run.gpu else 'oneDNN'
    name = 'PREFERRED_CASES' if run.gpu else 'PREFERRED_CPU_CASES'
    failed = [row for row in rows if 'error' in row]
    flagged = [row for row in rows if row.get('mismatch')]
    data = dict(rows=len(rows), expected_rows=expected, failed=len(failed), flagged=len(flagged), proposals={},
                cases={}, rc=result['rc'], timed_out=result['timed_out'])
    lines = [f'{len(rows)} of {expected} rows (shapes x dtypes x layouts) at batch {sizes["dwconv_batch"]}; '
             f'ratio = {reference} ms / ours ms, forward + backward (above 1: ours faster); difference = '
             f'max |ours - {reference}| / max |{reference}| over output and gradients, tolerances '
             f'{bench_dwconv.TOLERANCES}.', '']
    if len(rows) < expected:
        lines += [f"bench_dwconv.py ended with rc {result['rc']}" + (' (timed out)' if result['timed_out'] else '')
                  + ':', '', '```', *result['lines'][-5:], '```', '']
    if flagged or failed:
        lines += ['**Rows above tolerance or failed:**', ''] + bench_dwconv.table_header(reference)
        lines += [bench_dwconv.table_row(row) for row in flagged + failed] + ['']

    def proposal(layouts: List[str]) -> str:
        return bench_dwconv.format_cases(bench_dwconv.proposed_preferred_cases(rows, layouts, args.margin), name)

    data['proposals']['all layouts'] = proposal(args.dwconv_layouts)
    lines += [f'Proposed for all layouts (fwd+bwd at least {args.margin}x at every shape, nothing flagged; '
              'the model trains in channels_last):', '', f"    {data['proposals']['all layouts']}", '']
    for layout in args.dwconv_layouts:
        cases = bench_dwconv.case_summary(rows, layout)
        data['proposals'][layout] = proposal([layout])
        data['cases'][layout] = [dict(kernel=k, stride=s, dtype=d, **c) for (k, s, d), c in sorted(cases.items())]
        lines += [f'### {layout}', '', f"    {data['proposals'][layout]}", '',
                  '| kernel | stride | dtype | shapes | min ratio | max ratio | clean |', '|---|---|---|---|---|---|---|']
        lines += [f"| {k} | {s} | {d} | {c['shapes']} | {c['min_ratio']:.2f} | {c['max_ratio']:.2f} | "
                  f"{'yes' if c['clean'] else 'no'} |" for (k, s, d), c in sorted(cases.items())]
        lines.append('')
    lines += ['<details><summary>every row</summary>', ''] + bench_dwconv.table_header(reference)
    lines += [bench_dwconv.table_row(row) for row in rows] + ['', '</details>']
    bad = len(rows) < expected or failed or flagged or result['rc'] != 0
    note = (f"{len(rows)}/{expected} rows, {len(flagged)} above tolerance, {len(failed)} failed"
            + (' (timed out)' if result['timed_out'] else ''))
    return Part('attention' if bad else 'ok', note, data, lines)


def measure_models(run: Run, task: str) -> Part:
    import torch

    from benchmarks import bench_models

    args, sizes = run.args, run.sizes
    batch = sizes['infer_batch' if task == 'infer' else 'train_batch']
    impls = args.dwconv_impl if task == 'train' else ['auto']
    specs = bench_models.measurement_specs(args.models, args.modes, [batch], [args.img_size], impls)
    results = []
    with run.jsonl(task).open('w') as rows_file:
        for result in bench_models.run_measurements(specs, task, run.device, args.min_seconds, torch.get_num_threads(),
                                                    'heap', args.amp, share_process=True):
            print(bench_models.format_result(result), flush=True)
            results.append(result)
            rows_file.write(json.dumps(result) + '\n')
            rows_file.flush()
    failed = [r for r in results if 'error' in r]
    what = 'inference' if task == 'infer' else 'training step (forward + backward + AdamW)'
    lines = [f"{what} img/s, batch {batch}, {args.img_size}px, AMP {args.amp}, one worker process for all "
             f"(peak memory reset per measurement); mode channels_last is eager", ''] + \
        bench_models.table_lines(results, args.modes)
    if task == 'train':
        lines += ['']
        for model, mode in dict.fromkeys((r['model'], r['mode']) for r in results):
            speed = {r['dwconv_impl']: r['img_s'] for r in results
                     if (r['model'], r['mode']) == (model, mode) and 'error' not in r}
            if 'torch' in speed and 'cuda' in speed:
                lines.append(f"- {model}, {mode}: depthwise convs on ours (cuda) "
                             f"{speed['cuda'] / speed['torch']:.2f}x the img/s of PyTorch's (torch)"
                             + (f"; auto (timed per case) {speed['auto'] / max(speed['torch'], speed['cuda']):.2f}x "
                                "the better of the two" if 'auto' in speed else ''))
    lines += [f"- {r['model']} {r['mode']} [{r['dwconv_impl']}]: {r['error']}" for r in failed]
    note = f'{len(results) - len(failed)}/{len(specs)} measurements' + (f', {len(failed)} failed' if failed else '')
    return Part('attention' if failed or len(results) < len(specs) else 'ok', note, dict(results=results), lines)


def part_infer(run: Run) -> Part:
    return measure_models(run, 'infer')


def part_train(run: Run) -> Part:
    return measure_models(run, 'train')


def part_throughput(run: Run) -> Part:
    cmd = [sys.executable, 'main.py', '--cfg', 'configs/fat_b0_224.yaml', '--throughput', '--batch-size',
           str(run.sizes['infer_batch']), '--channels-last', '--device', run.device,
           '--output', str(run.out / 'throughput_run'), '--opts', 'DATA.IMG_SIZE', str(run.args.img_size)]
    result = run_streamed(cmd, run.args.part_timeout)
    figures = [line for line in result['lines'] if re.search('throughput|img/s', line, re.IGNORECASE)]
    lines = [f"`{result['cmd'].replace(sys.executable, 'python')}`: rc {result['rc']}, {result['seconds']:.0f} s"
             + (' (timed out)' if result['timed_out'] else ''), '', '```', *(figures or result['lines'][-10:]), '```']
    bad = result['rc'] != 0 or not figures
    return Part('attention' if bad else 'ok', f"rc {result['rc']}, {len(figures)} throughput lines",
                dict(lines=figures, rc=result['rc']), lines)


def part_loaders(run: Run) -> Part:
    cmd = [sys.executable, '-m', 'benchmarks.bench_loaders', '--json', str(run.out / 'loaders.json')]
    if run.args.tiny:  # the script's own paths, in seconds: the images, the shards, one loader
        cmd += ['--quick', '--images', '40', '--seconds', '1', '--workers', '1', '--loaders', 'shards', 'dali-mixed',
                '--cache', str(run.out / 'loader_data')]
    else:
        cmd += ['--seconds', '10', '--workers', str(min(8, os.cpu_count() or 1)), '--loaders', 'folder', 'shards',
                'dali-cpu', 'dali-mixed', 'dali-mixed-shards']
    result = run_streamed(cmd, run.args.part_timeout)
    table = [line for line in result['lines'] if line.startswith('|')]
    failed = [line for line in table if 'not available' in line]
    lines = [f"`{result['cmd'].replace(sys.executable, 'python')}`: rc {result['rc']}, {result['seconds']:.0f} s"
             + (' (timed out)' if result['timed_out'] else ''), '', *table]
    bad = result['rc'] != 0 or len(table) < 3 or failed
    return Part('attention' if bad else 'ok', f"rc {result['rc']}, {max(len(table) - 2, 0)} rows"
                + (f', {len(failed)} not available' if failed else ''), dict(table=table, rc=result['rc']), lines)


PART_FUNCTIONS: Dict[str, Callable[[Run], Part]] = dict(
    kernels=part_kernels, sanitizer=part_sanitizer, dwconv=part_dwconv, infer=part_infer, train=part_train,
    throughput=part_throughput, loaders=part_loaders)


def worker(args: argparse.Namespace) -> None:
    """What the parts run in a fresh process: the extension build, or the sanitizer's cases."""
    import torch

    import kernels.dwconv as dwconv

    if args.worker == 'extension':
        start = time.perf_counter()
        module = dwconv.load_extension()
        seconds = time.perf_counter() - start
        usable = module is not None and dwconv.is_usable(torch.device('cuda'))
        print(RESULT_PREFIX + json.dumps(dict(built=module is not None, seconds=seconds, usable=usable,
                                              module=getattr(module, '__file__', None))), flush=True)
        return
    dtypes = [torch.float16, torch.bfloat16] if args.device == 'cuda' else [torch.float32]
    generator = torch.Generator().manual_seed(0)
    for k, s in json.loads(args.cases):
        for dtype in dtypes:
            for shape in dwconv.SELF_CHECK_SHAPES:
                # made on the CPU and copied, so that only our kernels run on the device
                x, w, b = (torch.randn(size, generator=generator, dtype=dtype).to(args.device).requires_grad_()
                           for size in (shape, (shape[1], 1, k, k), (shape[1],)))
                out = dwconv.depthwise_conv2d(x, w, b, s)
                grad = torch.randn(out.shape, generator=generator, dtype=dtype).to(args.device)
                torch.autograd.grad(out, (x, w, b), grad)
                if args.device == 'cuda':
                    torch.cuda.synchronize()
                print(f'case k={k} s={s} {dtype} {shape} done', flush=True)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out', type=Path, help='folder for report.md, report.json and the raw rows')
    parser.add_argument('--part', nargs='+', choices=PARTS, default=PARTS, help='parts to run (default: all)')
    parser.add_argument('--tiny', action='store_true', help='tiny sizes; without a GPU, the CPU parts only')
    parser.add_argument('--models', nargs='+', help='infer/train models (default: fat_b0..fat_b3 and the peers)')
    parser.add_argument('--modes', nargs='+', choices=['eager', 'channels_last', 'compiled'],
                        help="infer/train modes of bench_models.py (default: channels_last compiled)")
    parser.add_argument('--amp', choices=['none', 'bf16', 'fp16'], help='infer/train autocast (default: bf16 on a GPU)')
    parser.add_argument('--min-seconds', type=float, help='infer/train: timed seconds per measurement (default 2)')
    parser.add_argument('--dwconv-impl', nargs='+', choices=['auto', 'torch', 'cuda'], default=['torch', 'cuda', 'auto'],
                        help="train: FAT's depthwise-conv implementations to measure")
    parser.add_argument('--variants', nargs='+', help='FAT variants whose depthwise shapes dwconv measures')
    parser.add_argument('--img-size', type=int, help='default 224 (--tiny: 32)')
    parser.add_argument('--dwconv-dtypes', nargs='+', choices=['fp16', 'bf16', 'fp32'], default=['fp16', 'bf16', 'fp32'])
    parser.add_argument('--dwconv-layouts', nargs='+', choices=['nchw', 'channels_last'],
                        default=['nchw', 'channels_last'])
    parser.add_argument('--dwconv-iters', type=int, help='timed iterations per dwconv measurement (default 20)')
    parser.add_argument('--margin', type=float, default=1.05, help='dwconv: ratio needed for PREFERRED_CASES')
    parser.add_argument('--sanitizer-tools', nargs='+', default=['memcheck', 'racecheck'],
                        choices=['memcheck', 'racecheck', 'initcheck', 'synccheck'])
    parser.add_argument('--sanitizer-timeout', type=float, default=150, help='seconds for each sanitizer tool')
    parser.add_argument('--part-timeout', type=float, default=300,
                        help='seconds for each subprocess of kernels, dwconv and throughput')
    parser.add_argument('--worker', choices=['extension', 'sanitizer-cases'], help=argparse.SUPPRESS)
    parser.add_argument('--cases', help=argparse.SUPPRESS)
    parser.add_argument('--device', help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    import torch

    device = 'cuda' if torch.cuda.is_available() else 'cpu'
    if device == 'cpu' and not args.tiny:
        print('gpu_report: no CUDA GPU is visible; run it on a GPU machine, or add --tiny for a quick run of the '
              'parts that work on CPU.')
        return 2
    if args.out is None:
        parser.error('--out DIR is required')
    from benchmarks.bench_dwconv import LARGE_KERNELS
    from benchmarks.bench_models import FAT_MODELS

    sizes = TINY if args.tiny else dict(
        infer_batch=256, train_batch=128, img_size=224, dwconv_batch=128, dwconv_iters=20, min_seconds=2.0,
        models=FAT_MODELS + REPORT_PEERS, variants=FAT_MODELS, large_kernels=list(LARGE_KERNELS),
        modes=['channels_last', 'compiled'])
    for key in ('models', 'variants', 'modes', 'min_seconds', 'dwconv_iters', 'img_size'):
        if getattr(args, key) is None:
            setattr(args, key, sizes[key])
    if args.amp is None:
        args.amp = 'bf16' if device == 'cuda' else 'none'
    args.out.mkdir(parents=True, exist_ok=True)
    args.part = [name for name in PARTS if name in args.part]
    run = Run(args, sizes, device, ' '.join(['python', '-m', 'benchmarks.gpu_report'] + (sys.argv[1:] if argv is None
                                                                                       else argv)))
    print('\n'.join(f'{key}: {value}' for key, value in run.header.items()), flush=True)
    run.write()
    for name in args.part:
        run.run_part(name)
    print('\n| part | status | seconds | note |\n|---|---|---|---|')
    for name, part in run.parts.items():
        print(f"| {name} | {part['status']} | {part['seconds']:.0f} | {part['note']} |")
    print(f'\nwrote {args.out / "report.md"} and {args.out / "report.json"}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
