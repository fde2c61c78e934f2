"""MODEL.DWCONV_IMPL auto's measured choice (kernels/dwconv/autotune.py, models.dwconv.choose_kernels),
on CPU, where the decision has the GPU's shape: our weight-gradient kernel against oneDNN's."""
import json
import logging
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from kernels import dwconv
from kernels.dwconv import Case, autotune
import models
from helpers import ROOT, project_env

CPU = torch.device('cpu')
TINY = dict(embed_dims=(8, 16, 16, 16), depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1), num_classes=4)


@pytest.fixture
def tuning(fresh_state, monkeypatch, tmp_path):
    """``fresh_state`` with a fresh build folder (a test that refused a build folder leaves the CPU
    library unloaded for the process) and the default budget."""
    monkeypatch.setenv('FAT_KERNELS_BUILD_DIR', str(tmp_path))
    monkeypatch.delenv(autotune.BUDGET_VARIABLE, raising=False)
    return tmp_path


def counting(op):
    """``op`` with a count of its calls."""
    def call(*args):
        call.calls += 1
        return op(*args)
    call.calls = 0
    return call


def slowed(op, seconds=0.1):
    def call(*args):
        time.sleep(seconds)
        return op(*args)
    return call


def cheap(x, weight, bias, stride):
    """Much faster than any convolution of the case, with a gradient for all three."""
    return x[..., ::stride, ::stride] + weight.sum() + bias.sum()


# Large enough that the real conv is ~17x slower than `cheap` (1 thread): the choice holds on a loaded machine.
CASE = Case(5, 1, torch.float32, False, (2, 64, 28, 28), True)


def decide(case, ours, path=None, budget=5.0, table=False):
    tuner = autotune.Tuner(CPU, path, budget)
    return tuner.decide(case, ours, lambda: True, lambda: table), tuner


def test_the_faster_implementation_is_kept(tuning):
    assert decide(CASE, cheap)[0] is True
    assert decide(CASE, slowed(dwconv.depthwise_conv2d))[0] is False


def test_our_cpu_weight_gradient_against_onednn_where_each_wins(tuning):
    """The real kernels: ours wins the weight gradient of wide 5x5 convs on small maps by ~5x;
    oneDNN wins a tiny 3x3 case, where our per-call overhead (layout copies, the ctypes call)
    dominates, by ~1.6x (2-core AMD EPYC, 2026-12-07; 6.8x and 1.4x on one thread). One thread, so
    that the test's timing does not depend on the load of the other test worker."""
    assert dwconv.is_usable(CPU)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert dwconv.choose(CPU, Case(5, 1, torch.float32, False, (16, 1024, 2, 2), True))
        assert not dwconv.choose(CPU, Case(3, 1, torch.float32, False, (1, 4, 8, 8), True))
    finally:
        torch.set_num_threads(threads)
    # ours differs from PyTorch only in the weight gradient: inference and other dtypes are not timed
    assert not dwconv.choose(CPU, Case(5, 1, torch.float32, False, (16, 1024, 2, 2), False))
    assert not dwconv.choose(CPU, Case(5, 1, torch.bfloat16, False, (16, 1024, 2, 2), True))
    assert autotune.tuner(CPU).stats.timed == 2


def test_decisions_are_remembered_for_the_device_and_the_first_one_stands(tuning):
    first, tuner = decide(CASE, cheap, path=str(tuning / 'decisions.json'))
    assert first is True and tuner.stats.timed == 1
    saved = json.loads((tuning / 'decisions.json').read_text())
    assert saved['decisions'][CASE.key()]['ours'] is True and saved['identity']['torch'] == torch.__version__
    again = counting(slowed(dwconv.depthwise_conv2d))
    assert decide(CASE, again, path=str(tuning / 'decisions.json'))[0] is True and again.calls == 0
    # A process that timed the case while another wrote its decision adopts the file's.
    other = CASE.__class__(**{**CASE.__dict__, 'shape': (4, 64, 28, 28)})

    def racing(*args):
        if not racing.done:
            racing.done = True
            decide(other, cheap, path=str(tuning / 'decisions.json'))  # the other process, mid-way
        return slowed(dwconv.depthwise_conv2d)(*args)
    racing.done = False
    late, tuner = decide(other, racing, path=str(tuning / 'decisions.json'))
    assert tuner.stats.timed == 1 and late is True
    # the file of the device: its name follows what the timings depend on (here: the thread count)
    path = autotune.tuner(CPU).path
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)
    try:
        autotune.reset()
        assert autotune.tuner(CPU).path != path
    finally:
        torch.set_num_threads(threads)


def test_runs_on_one_machine_adopt_its_decisions_and_each_keeps_its_own(tuning):
    """A training run's tuner (its folder) adopts the machine's decisions and adds its timings there:
    two runs of a config on one machine then train with the same kernels, bit for bit, though timing
    on a loaded machine would flip close calls. What a run keeps in its folder rules its resumes."""
    first = autotune.tuner(CPU, str(tuning / 'run1'))
    assert first.decide(CASE, cheap, lambda: True, lambda: False) is True and first.stats.timed == 1
    slower = counting(slowed(dwconv.depthwise_conv2d))
    second = autotune.tuner(CPU, str(tuning / 'run2'))
    assert second.decide(CASE, slower, lambda: True, lambda: False) is True and slower.calls == 0
    for run in ('run1', 'run2'):
        assert json.loads(Path(first.path.replace('run1', run)).read_text())['decisions'][CASE.key()]['ours']
    (tuning / 'decisions' / Path(first.path).name).unlink()  # a resume on a node whose machine file differs
    assert autotune.tuner(CPU).decide(CASE, slower, lambda: True, lambda: False) is False
    autotune.reset()
    resumed, untimed = autotune.tuner(CPU, str(tuning / 'run1')), counting(cheap)
    assert resumed.decide(CASE, untimed, lambda: True, lambda: False) is True and untimed.calls == 0
    # a timing that failed (out of memory beside another job, say) is that run's: the machine times it again
    other = CASE.__class__(**{**CASE.__dict__, 'shape': (2, 32, 28, 28)})

    def failing(*args):
        raise RuntimeError('out of memory')
    assert autotune.tuner(CPU, str(tuning / 'run3')).decide(other, failing, lambda: True, lambda: False) is False
    later = counting(cheap)
    assert autotune.tuner(CPU, str(tuning / 'run4')).decide(other, later, lambda: True, lambda: False) is True
    assert later.calls > 0


def test_a_run_keeps_its_decisions_where_the_machine_cannot(tuning, monkeypatch, caplog):
    """The machine's folder cannot be made (a file stands in its way): a warning says which file is
    missing, and the run's folder still keeps what the run decided, for its resumes."""
    (tuning / 'blocked').write_text('')
    monkeypatch.setenv(autotune.FOLDER_VARIABLE, str(tuning / 'blocked' / 'decisions'))
    with caplog.at_level(logging.WARNING, logger='kernels.dwconv'):
        run = autotune.tuner(CPU, str(tuning / 'run'))
    assert [r.getMessage().split(' (')[0] for r in caplog.records] == [
        'depthwise-conv tuning decisions are not kept for this machine']
    assert run.decide(CASE, cheap, lambda: True, lambda: False) is True
    assert json.loads(Path(run.path).read_text())['decisions'][CASE.key()]['ours'] is True


def test_a_remembered_choice_of_ours_still_needs_this_process_self_check(tuning):
    path = str(tuning / 'decisions.json')
    decide(CASE, cheap, path=path)
    tuner = autotune.Tuner(CPU, path, 5.0)
    assert tuner.decide(CASE, cheap, lambda: False, lambda: True) is False


def test_a_malformed_file_is_ignored_with_one_warning_and_rewritten(tuning, caplog):
    path = tuning / 'decisions.json'
    path.write_text('{"decisions": {"k5s1": {"ours": "yes"}}}')
    with caplog.at_level(logging.WARNING, logger='kernels.dwconv'):
        assert decide(CASE, cheap, path=str(path))[1].stats.timed == 1
    assert sum('ignoring the depthwise-conv tuning file' in r.getMessage() for r in caplog.records) == 1
    assert json.loads(path.read_text())['decisions'][CASE.key()]['ours'] is True


def test_the_budget_bounds_timing_and_then_the_tables_decide(tuning, monkeypatch, caplog):
    path = str(tuning / 'decisions.json')
    ours = counting(cheap)
    with caplog.at_level(logging.WARNING, logger='kernels.dwconv'):
        assert decide(CASE, ours, path=path, budget=0.0, table=False)[0] is False
    assert ours.calls == 0 and sum('spent its 0 s' in r.getMessage() for r in caplog.records) == 1
    assert json.loads(Path(path).read_text())['decisions'][CASE.key()] == {'ours': False, 'timed': False}
    # a second case is timed while budget is left, and the case after it is not
    tuner = autotune.Tuner(CPU, None, 1e-9)
    cases = [Case(5, 1, torch.float32, False, (n, 64, 28, 28), True) for n in (1, 2)]
    assert [tuner.decide(c, cheap, lambda: True, lambda: False) for c in cases] == [True, False]
    assert (tuner.stats.timed, tuner.stats.untimed) == (1, 1)
    monkeypatch.setenv(autotune.BUDGET_VARIABLE, 'lots')
    assert autotune.budget_seconds() == autotune.DEFAULT_BUDGET_SECONDS


def test_timing_leaves_the_global_random_state_alone(tuning):
    torch.manual_seed(3)
    before = torch.get_rng_state()
    decide(CASE, cheap)
    assert torch.equal(torch.get_rng_state(), before)


def test_choose_kernels_installs_a_choice_per_conv_from_its_recorded_case(tuning, monkeypatch):
    """One forward records each conv's case (batch size, layout, the run's dtype); each conv then
    runs what was decided for its case, and the model's modes and RNG are as they were."""
    monkeypatch.setenv(autotune.BUDGET_VARIABLE, '0')  # the tables decide: known answers
    monkeypatch.setattr(dwconv, 'PREFERRED_CPU_CASES', (((5,), (2,), (torch.float32,), ('channels_last',)),))
    torch.manual_seed(0)
    model = models.FAT(**TINY).train().to(memory_format=torch.channels_last)
    rng = torch.get_rng_state()
    line = models.choose_kernels(model, (3, 64, 48), 6, training=True, channels_last=True)
    assert model.training and torch.equal(torch.get_rng_state(), rng)
    convs = [m for m in model.modules() if isinstance(m, models.DepthwiseConv2d)]
    decisions = json.loads(Path(autotune.tuner(CPU).path).read_text())['decisions']
    assert all(key.split()[3].startswith('6x') for key in decisions), 'the batch size of the run'
    for conv in convs:
        assert conv.chosen['infer'] is False  # CPU inference never runs ours
    ours = [conv for conv in convs if conv.chosen['train']]
    assert ours and all((c.kernel_size[0], c.stride[0]) == (5, 2) for c in ours)
    assert any(key.startswith('k5s2 float32 channels_last') for key in decisions)
    assert f'ours in {len(ours)} of {len(convs)} for training, 0 of {len(convs)} for inference' in line
    # the ConvFFN's GELU + conv becomes the fused module where ours trains it, and only there
    fused = [conv for conv in convs if isinstance(conv, models.dwconv.FusedGeluDepthwiseConv2d)]
    assert fused and set(fused) == {conv for conv in ours if isinstance(conv, models.dwconv.GeluDepthwiseConv2d)}
    # the forward runs what was installed, also where the file now says otherwise for the case
    x = torch.randn(2, ours[0].in_channels, 9, 9, requires_grad=True).to(memory_format=torch.channels_last)
    assert ours[0]._use_extension(x)
    models.set_dwconv_impl(model, 'torch')
    assert not ours[0]._use_extension(x)
    models.set_dwconv_impl(model, 'auto')
    models.choose_kernels(model, (3, 64, 48), 6, training=False, channels_last=True)  # inference: never fused
    assert not any(isinstance(conv, models.dwconv.FusedGeluDepthwiseConv2d) for conv in convs)


@pytest.mark.parametrize('chosen', [True, False])
def test_a_model_used_alone_follows_the_tables_when_compiled_or_exported(tuning, monkeypatch, chosen):
    """A conv no converter decided is timed at its first eager use; under torch.compile and
    torch.export its shape may be symbolic (a dynamic batch here), so the measured tables decide, as
    constants of the graph: it holds our operator exactly where they choose it. (Timing there failed:
    a symbolic size cannot be a constant argument or a key.)"""
    monkeypatch.setattr(dwconv, 'PREFERRED_CPU_CASES', ((range(3, 32, 2), (1, 2), (torch.float32,), ('nchw',)),)
                        if chosen else ())
    conv = models.DepthwiseConv2d(8, 5, 2)
    targets = []

    def recording_backend(gm, example_inputs):
        targets.extend(str(n.target) for n in gm.graph.nodes if n.op == 'call_function')
        return gm.forward
    compiled = torch.compile(conv, backend=recording_backend, fullgraph=True, dynamic=True)
    for batch in (2, 3):
        compiled(torch.randn(batch, 8, 13, 11, requires_grad=True)).sum().backward()
    assert ('fat.depthwise_conv2d.default' in targets) == chosen
    program = torch.export.export(conv, (torch.randn(2, 8, 13, 11, requires_grad=True),),
                                  dynamic_shapes={'x': {0: torch.export.Dim('batch', min=1, max=64)}})
    assert program.module()(torch.randn(5, 8, 13, 11)).shape == (5, 8, 7, 6)
    assert autotune.tuner(CPU).stats.timed == 0


RANKS = textwrap.dedent('''
    import json, os, sys
    import torch, torch.distributed as dist
    import models
    from kernels import dwconv
    dist.init_process_group('gloo')
    rank = dist.get_rank()
    os.environ['FAT_KERNELS_BUILD_DIR'] = os.path.join(sys.argv[1], f'rank{rank}')
    os.environ['FAT_DWCONV_TUNE_DIR'] = os.path.join(sys.argv[1], f'rank{rank}', 'decisions')
    # rank 0 would choose ours everywhere, rank 1 nowhere, if each decided for itself
    dwconv.PREFERRED_CPU_CASES = ((range(3, 32, 2), (1, 2), (torch.float32,), ('nchw',)),) if rank == 0 else ()
    torch.manual_seed(0)
    model = models.FAT(embed_dims=(8, 16, 16, 16), depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1), num_classes=4)
    models.choose_kernels(model.train(), (3, 32, 32), 2, training=True)
    chosen = [m.chosen['train'] for m in model.modules() if isinstance(m, models.DepthwiseConv2d)]
    with open(os.path.join(sys.argv[1], f'chosen{rank}.json'), 'w') as f:
        json.dump(chosen, f)
    if rank == 1:  # ours fails its self-check on this process only: every process runs PyTorch's
        dwconv.is_usable = lambda *args, **kwargs: False
    models.choose_kernels(model.train(), (3, 32, 32), 2, training=True)
    chosen = [m.chosen['train'] for m in model.modules() if isinstance(m, models.DepthwiseConv2d)]
    with open(os.path.join(sys.argv[1], f'vetoed{rank}.json'), 'w') as f:
        json.dump(chosen, f)
    dist.destroy_process_group()
''')


def test_every_process_runs_the_kernels_rank_0_chose(tmp_path):
    """Rank 0 decides for all; a case whose self-check fails on any process runs PyTorch's on all."""
    script = tmp_path / 'ranks.py'
    script.write_text(RANKS)
    env = project_env(OMP_NUM_THREADS='1', **{autotune.BUDGET_VARIABLE: '0'})
    proc = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
                           str(script), str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    chosen = {(what, rank): json.loads((tmp_path / f'{what}{rank}.json').read_text())
              for what in ('chosen', 'vetoed') for rank in (0, 1)}
    assert chosen['chosen', 0] == chosen['chosen', 1] and all(chosen['chosen', 1]), chosen
    assert not any(chosen['vetoed', 0]) and not any(chosen['vetoed', 1]), chosen
