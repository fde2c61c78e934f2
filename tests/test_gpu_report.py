"""benchmarks/gpu_report.py: its --tiny run, as a user starts it, and its report.

Without a GPU the tiny run is what keeps the GPU report from rotting: every part that can run on CPU
runs (dwconv with our CPU kernel, infer, train, throughput, the sanitizer's case script without a
sanitizer) and the GPU-only parts say why they were skipped. On a GPU machine the kernels and sanitizer
parts are left out here (tests/test_kernels.py covers the kernels; the sanitizer takes minutes).
"""
import json
import math
import os
import subprocess
import sys
from collections import Counter

import pytest
import timm
import torch

from benchmarks import gpu_report
from benchmarks.bench_dwconv import TOLERANCES
from helpers import ROOT
import models

GPU = torch.cuda.is_available()
PARTS = [p for p in gpu_report.PARTS if not (GPU and p in ('kernels', 'sanitizer'))]


@pytest.fixture(scope='module')
def tiny_report(tmp_path_factory):
    """Run ``gpu_report.py --tiny`` once (about 40 s on 2 CPU cores); its folder and report.json."""
    out = tmp_path_factory.mktemp('gpu_report')
    env = dict(os.environ, OMP_NUM_THREADS='1')  # a 2-core machine shared with the rest of the suite
    proc = subprocess.run([sys.executable, '-m', 'benchmarks.gpu_report', '--tiny', '--out', str(out), '--part', *PARTS],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, json.loads((out / 'report.json').read_text())


def test_every_part_is_reported_with_its_time(tiny_report):
    out, report = tiny_report
    assert list(report['parts']) == PARTS
    for name, part in report['parts'].items():
        expected = 'skipped' if name in ('kernels', 'sanitizer') else 'ok'
        assert part['status'] == expected, (name, part)
        assert part['seconds'] >= 0 and part['note']
    if not GPU:
        assert 'needs a CUDA GPU' in report['parts']['kernels']['note']
        sanitizer = report['parts']['sanitizer']['data']
        assert sanitizer['rc'] == 0 and sanitizer['done'] == sanitizer['expected'] > 0
    markdown = (out / 'report.md').read_text()
    assert all(f'\n## {name}\n' in markdown for name in PARTS)
    assert f"| torch | {torch.__version__} |" in markdown and f"| timm | {timm.__version__} |" in markdown


def depthwise_convs_run(variant: str, img_size: int) -> Counter:
    """(channels, input size, kernel, stride) of every depthwise conv call of a forward pass, counted."""
    model = timm.create_model(variant).eval()
    seen = Counter()
    for module in model.modules():
        if isinstance(module, models.DepthwiseConv2d):
            module.register_forward_hook(lambda m, inputs, output: seen.update(
                [(m.in_channels, inputs[0].shape[-1], m.kernel_size[0], m.stride[0])]))
    with torch.no_grad():
        model(torch.randn(1, 3, img_size, img_size))
    return seen


def test_dwconv_rows_cover_every_depthwise_conv_of_the_model(tiny_report):
    out, report = tiny_report
    rows = [json.loads(line) for line in (out / 'dwconv.jsonl').read_text().splitlines()]
    img_size = gpu_report.TINY['img_size']
    expected = depthwise_convs_run('fat_b0', img_size)
    assert {(c, size, k, s) for c, size, k, s in expected if s == 2}  # the model has strided convs to miss
    for dtype in {row['dtype'] for row in rows}:
        for layout in ('nchw', 'channels_last'):
            measured = Counter({(r['channels'], r['size'], r['kernel'], r['stride']): r['layers']['fat_b0']
                                for r in rows if r['dtype'] == dtype and r['layout'] == layout and 'fat_b0' in r['layers']})
            assert measured == expected, (dtype, layout)
            large = {r['kernel'] for r in rows if r['dtype'] == dtype and r['layout'] == layout
                     and 'large kernel' in r['roles']}
            assert large == set(gpu_report.TINY['large_kernels'])
    assert report['parts']['dwconv']['data']['rows'] == len(rows)


def test_dwconv_rows_compare_outputs_and_gradients_with_pytorch(tiny_report):
    out, report = tiny_report
    rows = [json.loads(line) for line in (out / 'dwconv.jsonl').read_text().splitlines()]
    for row in rows:
        assert 'error' not in row, row
        assert set(row['difference']) == {'output', 'grad_input', 'grad_weight', 'grad_bias'}
        assert all(math.isfinite(d) for d in row['difference'].values())
        assert row['max_difference'] <= TOLERANCES[row['dtype']] and not row['mismatch']
        assert row['ratio'] > 0 and row['ours_ms'][2] > 0 and row['ref_ms'][2] > 0
    # Ours and PyTorch's weight gradients add in different orders: a comparison that always finds exactly
    # nothing compared a result with itself.
    assert any(row['difference']['grad_weight'] > 0 for row in rows)
    proposals = report['parts']['dwconv']['data']['proposals']
    name = 'PREFERRED_CASES' if GPU else 'PREFERRED_CPU_CASES'
    assert set(proposals) == {'all layouts', 'nchw', 'channels_last'}
    assert all(p.startswith(f'{name} = (') for p in proposals.values())


def test_infer_and_train_measure_every_requested_model(tiny_report):
    out, report = tiny_report
    models_asked = gpu_report.TINY['models']
    infer = report['parts']['infer']['data']['results']
    assert sorted(r['model'] for r in infer) == sorted(models_asked)
    train = report['parts']['train']['data']['results']
    assert sorted((r['model'], r['dwconv_impl']) for r in train) == sorted(
        [(m, impl) for m in models_asked if m.startswith('fat_') for impl in ('torch', 'cuda', 'auto')]
        + [(m, 'auto') for m in models_asked if not m.startswith('fat_')])
    for r in infer + train:
        assert 'error' not in r and r['img_s'] > 0, r
    assert {r['batch'] for r in infer} == {gpu_report.TINY['infer_batch']}
    assert {r['batch'] for r in train} == {gpu_report.TINY['train_batch']}
    assert [json.loads(line) for line in (out / 'train.jsonl').read_text().splitlines()] == train
    assert any(line.startswith('- fat_b0, channels_last: depthwise convs on ours (cuda)') and
               'auto (timed per case)' in line for line in (out / 'report.md').read_text().splitlines())


def test_throughput_part_keeps_main_py_throughput_lines(tiny_report):
    _, report = tiny_report
    lines = report['parts']['throughput']['data']['lines']
    assert any('inference' in line and 'img/s' in line for line in lines), lines


def test_a_failing_part_is_recorded_and_the_next_part_still_runs(tmp_path, monkeypatch):
    def broken(run):
        raise RuntimeError('boom in dwconv')

    def after(run):
        # the report on disk already holds the failed part when the next one starts
        on_disk = json.loads((tmp_path / 'report.json').read_text())
        assert on_disk['parts']['dwconv']['status'] == 'error'
        return gpu_report.Part('ok', 'ran after the failure', dict(figure=1.0), ['- 1.0'])

    monkeypatch.setitem(gpu_report.PART_FUNCTIONS, 'dwconv', broken)
    monkeypatch.setitem(gpu_report.PART_FUNCTIONS, 'infer', after)
    assert gpu_report.main(['--tiny', '--out', str(tmp_path), '--part', 'infer', 'dwconv']) == 0
    report = json.loads((tmp_path / 'report.json').read_text())
    assert list(report['parts']) == ['dwconv', 'infer']  # the canonical order, whatever --part said
    assert report['parts']['dwconv']['status'] == 'error' and 'boom in dwconv' in report['parts']['dwconv']['note']
    assert report['parts']['infer'] == dict(status='ok', seconds=report['parts']['infer']['seconds'],
                                            note='ran after the failure', data=dict(figure=1.0))
    assert 'RuntimeError: boom in dwconv' in (tmp_path / 'report.md').read_text()


def test_a_dying_worker_costs_only_the_measurement_it_was_on(tmp_path, monkeypatch):
    """With one worker process for all measurements (as the infer and train parts run them), a worker
    killed by a signal loses its current measurement, and a fresh worker takes the rest."""
    from benchmarks import bench_models

    fake = tmp_path / 'worker.py'  # reports its first spec, then dies the way a segfaulting kernel does
    fake.write_text('import json, os, signal, sys\n'
                    "specs = json.loads(sys.argv[sys.argv.index('--worker') + 1])\n"
                    "print('RESULT ' + json.dumps(dict(specs[0], img_s=1.0)), flush=True)\n"
                    'os.kill(os.getpid(), signal.SIGSEGV)\n')
    monkeypatch.setattr(bench_models, 'WORKER', [sys.executable, str(fake)])
    specs = [dict(model=name, mode='eager', batch=1, img=32, dwconv_impl='auto') for name in 'abcde']
    results = list(bench_models.run_measurements(specs, 'infer', 'cpu', 0, 1, 'heap', share_process=True))
    assert [r['model'] for r in results] == list('abcde')
    assert ['error' in r for r in results] == [False, True, False, True, False]
    assert 'worker exited with -11' in results[1]['error']


def test_proposed_preferred_cases_pick_exactly_the_cases_ours_won(monkeypatch):
    """The printed proposal, pasted into kernels/dwconv as PREFERRED_CASES, makes 'auto' pick ours
    exactly where ours was at least the margin faster at every shape of the case and nothing was flagged."""
    import kernels.dwconv as dwconv
    from benchmarks.bench_dwconv import DTYPES, format_cases, proposed_preferred_cases

    ratios = {  # (kernel, stride, dtype, layout): fwd+bwd ratio at each of its shapes
        (7, 1, 'fp16', 'channels_last'): [1.3, 1.6], (9, 1, 'fp16', 'channels_last'): [1.2],
        (7, 1, 'bf16', 'channels_last'): [1.4], (9, 1, 'bf16', 'channels_last'): [2.0, 1.04],  # one shape short
        (5, 2, 'bf16', 'channels_last'): [1.1], (5, 2, 'bf16', 'nchw'): [1.1], (3, 1, 'fp32', 'nchw'): [3.0],
        (7, 1, 'fp16', 'nchw'): [0.9], (11, 1, 'fp16', 'channels_last'): [2.0]}
    rows = [dict(kernel=k, stride=s, dtype=d, layout=layout, ratio=r, mismatch=k == 11)  # 11: flagged
            for (k, s, d, layout), rs in ratios.items() for r in rs]
    source = format_cases(proposed_preferred_cases(rows, ['nchw', 'channels_last']))
    namespace = {'torch': torch}
    exec(source, namespace)
    monkeypatch.setattr(dwconv, 'PREFERRED_CASES', namespace['PREFERRED_CASES'])
    winners = {(7, 1, 'fp16', 'channels_last'), (9, 1, 'fp16', 'channels_last'), (7, 1, 'bf16', 'channels_last'),
               (5, 2, 'bf16', 'channels_last'), (5, 2, 'bf16', 'nchw'), (3, 1, 'fp32', 'nchw')}
    for k in (3, 5, 7, 9, 11):
        for s in (1, 2):
            for d in DTYPES:
                for layout in ('nchw', 'channels_last'):
                    assert dwconv.preferred(k, s, DTYPES[d], 'cuda', layout == 'channels_last') == (
                        (k, s, d, layout) in winners), (k, s, d, layout, source)
