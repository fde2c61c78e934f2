"""kernels/dwconv: it compiles here (JIT and setup.py), it falls back safely, its operators pass
torch.library's checks and stay in compiled graphs, and it matches fp64 F.conv2d: on CPU (our weight
gradient, built with the system C++ compiler) always, on a GPU (the CUDA kernels) when there is one.

The CUDA compile tests are the slow ones (about 40 s each on 2 cores, for sm_90 only): one real JIT
build per test run, shared by every test that needs the module, and one setup.py build. Without nvcc
they are skipped; without a GPU the CUDA kernels cannot run, so the comparisons with cuDNN are skipped
and the CPU tests check the builds, the fallback, the operators and the self-check logic.
GPU tests carry the ``gpu`` marker: ``pytest tests/test_kernels.py -m gpu``.
"""
import logging
import os
import shutil
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import kernels.dwconv as dwconv
from kernels.dwconv import build as dwconv_build
from kernels.dwconv import cpu as dwconv_cpu
from kernels.dwconv import toolchain

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
gpu = [pytest.mark.gpu, needs_gpu]
# Every (kernel size, stride) FAT's variants use: positional encoding / local branch 3, 5, 7, 9 at
# stride 1; FFN 5x5; shortcut, strided FFN and refined downsampling 5x5 at stride 2.
FAT_CASES = ((3, 1), (5, 1), (7, 1), (9, 1), (5, 2))
TEST_ARCH = '9.0'  # one architecture keeps the test builds to about 40 s


def nvcc_available() -> bool:
    from torch.utils.cpp_extension import CUDA_HOME
    return shutil.which('nvcc') is not None or bool(CUDA_HOME and os.path.exists(os.path.join(CUDA_HOME, 'bin', 'nvcc')))


@pytest.fixture(scope='session')
def extension(tmp_path_factory):
    """A real JIT build of kernels/dwconv with this machine's nvcc, once per test run: into a fresh
    folder, or into ``$FAT_KERNELS_BUILD_DIR`` where that is set (benchmarks/gpu_report.py sets it, so a
    build it has just made is reused). A fresh folder holds a ``lock`` file as a build killed under an
    older torch leaves it (torch < 2.12 marks a build by the file's existence and waits on it for ever)."""
    if not nvcc_available():
        pytest.skip('nvcc not found: the CUDA extension cannot be compiled here')
    patch = pytest.MonkeyPatch()
    if not os.environ.get('FAT_KERNELS_BUILD_DIR'):
        build_dir = tmp_path_factory.mktemp('fat_kernels_build')
        (build_dir / 'lock').write_text('')
        patch.setenv('FAT_KERNELS_BUILD_DIR', str(build_dir))
    if not torch.cuda.is_available():
        patch.setenv('TORCH_CUDA_ARCH_LIST', TEST_ARCH)
    patch.setitem(sys.modules, toolchain.EXTENSION_NAME, None)  # build these sources, not an installed copy
    dwconv_build._loaded.pop('cuda', None)
    start = time.perf_counter()
    try:
        module = dwconv.load_extension()
    finally:
        patch.undo()
    print(f'\nkernels/dwconv loaded (compiled unless already built there) in {time.perf_counter() - start:.0f} s')
    assert module is not None, 'the extension failed to compile (see the warning above)'
    return module


def reference_op(x, w, b, stride):
    """F.conv2d as autocast runs it: the parameters cast to the input's dtype."""
    return F.conv2d(x, w.to(x.dtype), None if b is None else b.to(x.dtype), stride, w.shape[-1] // 2, 1, x.shape[1])


def warnings_from(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == 'kernels.dwconv']


# --- on any machine ------------------------------------------------------------------------------

@pytest.mark.slow
def test_extension_compiles_with_this_machines_nvcc(extension):
    for name in ('forward', 'input_grad', 'weight_bias_grad'):
        assert callable(getattr(extension, name)), name
    assert extension.source_hash == toolchain.source_hash()


@pytest.mark.slow
def test_setup_py_builds_an_importable_extension_of_these_sources(tmp_path):
    """The ahead-of-time build (what ``pip install ./kernels/dwconv`` runs) works, and a new process
    with it on its path uses it, not a JIT build: it was built from the current sources."""
    if not nvcc_available():
        pytest.skip('nvcc not found: the CUDA extension cannot be compiled here')
    env = dict(os.environ, TORCH_CUDA_ARCH_LIST=TEST_ARCH, MAX_JOBS='2')
    result = subprocess.run([sys.executable, 'setup.py', 'build_ext', '--build-lib', str(tmp_path / 'lib'),
                             '--build-temp', str(tmp_path / 'tmp')], cwd=toolchain.HERE, env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    repo = os.path.dirname(os.path.dirname(toolchain.HERE))
    code = ('from kernels.dwconv import build; build._jit_build = None  # fails if called\n'
            'module = build.load_extension(); print(module.__file__, module.source_hash)')
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path / 'lib'), repo]))
    used = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert used.returncode == 0, used.stderr[-3000:]
    path, source_hash = used.stdout.split()
    assert os.path.samefile(os.path.dirname(path), tmp_path / 'lib') and source_hash == toolchain.source_hash()


def test_an_installed_build_of_other_sources_is_not_used(fresh_state, monkeypatch, caplog):
    stale = types.ModuleType(toolchain.EXTENSION_NAME)
    stale.__file__, stale.source_hash = '/site-packages/fat_dwconv_cuda.so', 'from-older-sources'
    monkeypatch.setitem(sys.modules, toolchain.EXTENSION_NAME, stale)
    built = object()
    monkeypatch.setattr(dwconv_build, '_jit_build', lambda verbose: built)
    with caplog.at_level(logging.WARNING, logger='kernels.dwconv'):
        assert dwconv.load_extension() is built
    assert any('built from other sources' in m for m in warnings_from(caplog))


def test_source_hash_covers_every_source_file(tmp_path, monkeypatch):
    before = toolchain.source_hash()
    for name in toolchain.SOURCE_FILES:
        shutil.copytree(toolchain.HERE, tmp_path / name, ignore=shutil.ignore_patterns('__pycache__'))
        (tmp_path / name / name).write_text((tmp_path / name / name).read_text() + '\n// changed\n')
        monkeypatch.setattr(toolchain, 'HERE', str(tmp_path / name))
        assert toolchain.source_hash() != before, name


def test_build_folder_depends_on_the_gpu_architectures(monkeypatch, tmp_path):
    monkeypatch.delenv('FAT_KERNELS_BUILD_DIR', raising=False)
    monkeypatch.setenv('HOME', str(tmp_path))
    folders = set()
    for archs in ('8.0', '9.0', '8.0;9.0'):
        monkeypatch.setenv('TORCH_CUDA_ARCH_LIST', archs)
        folders.add(dwconv.build_directory())
    assert len(folders) == 3


def test_never_usable_on_other_devices():
    assert not dwconv.is_usable(torch.device('meta'))
    assert not dwconv.is_usable('not a device')


def test_failed_build_warns_once_and_returns_none(fresh_state, monkeypatch, tmp_path, caplog):
    bogus = tmp_path / 'bogus.cu'
    bogus.write_text('this is not C++;\n')
    monkeypatch.setattr(toolchain, 'SOURCES', [str(bogus)])
    monkeypatch.setattr(toolchain, 'EXTENSION_NAME', 'fat_dwconv_bogus')
    monkeypatch.setitem(sys.modules, 'fat_dwconv_bogus', None)  # no installed build either
    monkeypatch.setenv('FAT_KERNELS_BUILD_DIR', str(tmp_path / 'build'))
    with caplog.at_level(logging.WARNING, logger='kernels.dwconv'):
        assert dwconv.load_extension() is None
        assert dwconv.load_extension() is None  # cached: no second build, no second warning
    messages = warnings_from(caplog)
    assert len(messages) == 1, messages
    assert 'could not be built' in messages[0] and 'fat_dwconv_bogus' in messages[0]


def test_unbuildable_extension_is_not_usable_with_one_warning(fresh_state, monkeypatch, caplog):
    monkeypatch.setattr(dwconv, 'load_extension', lambda verbose=False: None)
    with caplog.at_level(logging.WARNING, logger='kernels.dwconv'):
        assert not dwconv.is_usable(torch.device('cuda', 0))
        assert not dwconv.is_usable(torch.device('cuda', 0))
    assert [m for m in warnings_from(caplog) if 'could not be built' in m and 'cuda:0' in m] == warnings_from(caplog)
    assert len(warnings_from(caplog)) == 1


CPU = torch.device('cpu')
FP32_CASES = tuple((k, s, torch.float32) for k, s in FAT_CASES)


def test_self_check_accepts_a_correct_op_and_names_a_wrong_one():
    assert dwconv.self_check(CPU, FP32_CASES, reference_op) is None
    problem = dwconv.self_check(CPU, FP32_CASES, lambda x, w, b, s: reference_op(x, w, b, s) * 1.01)
    assert problem.startswith('output differs') and 'kernel 3, stride 1' in problem
    wrong_stride2 = lambda x, w, b, s: reference_op(x, w, b, s) + (s == 2)  # noqa: E731
    assert 'kernel 5, stride 2' in dwconv.self_check(CPU, FP32_CASES, wrong_stride2)
    nan = lambda x, w, b, s: reference_op(x, w, b, s) * float('nan')  # noqa: E731
    assert 'output differs' in dwconv.self_check(CPU, FP32_CASES, nan)


def test_self_check_tolerance_is_in_units_of_the_dtype():
    """fp32: an error of 1e-5 of the result is far above fp32 rounding; bf16 rounding is accepted
    (PyTorch's own bf16 convolution passes), a 4% error is not."""
    assert 'output differs' in dwconv.self_check(CPU, ((5, 1, torch.float32),),
                                                 lambda x, w, b, s: reference_op(x, w, b, s) * (1 + 1e-5))
    bf16 = tuple((k, s, torch.bfloat16) for k, s in FAT_CASES)
    assert dwconv.self_check(CPU, bf16, reference_op) is None
    assert 'output differs' in dwconv.self_check(CPU, bf16, lambda x, w, b, s: reference_op(x, w, b, s) * 1.04)


@pytest.mark.parametrize('mode', ['no_grad', 'inference_mode'])
def test_self_check_does_not_depend_on_the_callers_grad_mode(mode):
    """The first use may come from --eval or --throughput, under no_grad or inference_mode."""
    with torch.no_grad() if mode == 'no_grad' else torch.inference_mode():
        assert dwconv.self_check(CPU, ((5, 2, torch.float32),), reference_op) is None


def test_self_check_covers_shapes_of_several_tiles_and_a_single_pixel():
    seen = []

    def recording(x, w, b, s):
        seen.append(tuple(x.shape))
        return reference_op(x, w, b, s)
    assert dwconv.self_check(CPU, ((7, 1, torch.float32),), recording) is None
    assert seen == [(2, 8, 70, 40), (5, 8, 7, 7), (1, 4, 1, 1)]


def test_wrong_gradients_are_caught():
    class WrongWeightGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, w, b, stride):
            ctx.save_for_backward(x, w)
            ctx.stride = stride
            return reference_op(x, w, b, stride)

        @staticmethod
        def backward(ctx, grad):
            x, w = ctx.saved_tensors
            with torch.enable_grad():
                x_, w_ = x.detach().requires_grad_(), w.detach().requires_grad_()
                gx, gw = torch.autograd.grad(reference_op(x_, w_, None, ctx.stride), (x_, w_), grad)
            return gx, gw.flip(-1), grad.sum((0, 2, 3)), None

    problem = dwconv.self_check(CPU, FP32_CASES, WrongWeightGrad.apply)
    assert problem is not None and problem.startswith('weight grad differs')


def test_self_check_mismatch_makes_the_extension_unusable_with_one_warning(fresh_state, monkeypatch, caplog):
    wrong = lambda x, w, b, s: reference_op(x, w, b, s) * 1.01  # noqa: E731
    real_self_check = dwconv.self_check
    monkeypatch.setattr(dwconv, 'load_extension', lambda verbose=False: object())
    monkeypatch.setattr(dwconv, 'self_check', lambda device, cases: real_self_check(CPU, cases, wrong))
    device = torch.device('cuda', 0)
    with caplog.at_level(logging.WARNING, logger='kernels.dwconv'):
        assert not dwconv.is_usable(device, 7, 1, torch.bfloat16)
        assert not dwconv.is_usable(device, 7, 1, torch.bfloat16)  # cached for the device and case
    messages = warnings_from(caplog)
    assert len(messages) == 1 and 'output differs from F.conv2d' in messages[0] and 'cuda:0' in messages[0]


def test_is_usable_checks_the_case_in_fp32_and_in_the_run_dtype(fresh_state, monkeypatch):
    checked = []
    monkeypatch.setattr(dwconv, 'load_extension', lambda verbose=False: object())
    monkeypatch.setattr(dwconv, 'self_check', lambda device, cases: checked.append(cases))
    assert dwconv.is_usable(torch.device('cuda', 0), 9, 1, torch.bfloat16)
    assert dwconv.is_usable(torch.device('cuda', 0), 5, 2, torch.float32)
    assert checked == [((9, 1, torch.float32), (9, 1, torch.bfloat16)), ((5, 2, torch.float32),)]


def test_a_crashing_self_check_is_a_warning_not_an_exception(fresh_state, monkeypatch, caplog):
    def crash(device, cases):
        raise RuntimeError('CUDA error: an illegal memory access was encountered')

    monkeypatch.setattr(dwconv, 'load_extension', lambda verbose=False: object())
    monkeypatch.setattr(dwconv, 'self_check', crash)
    with caplog.at_level(logging.WARNING, logger='kernels.dwconv'):
        assert not dwconv.is_usable(torch.device('cuda', 1))
    assert len(warnings_from(caplog)) == 1 and 'illegal memory access' in warnings_from(caplog)[0]


def test_supported_and_preferred_cases():
    assert list(dwconv.SUPPORTED_KERNEL_SIZES) == list(range(3, 32, 2))
    assert dwconv.supports(3, 1) and dwconv.supports(31, 2)
    assert not dwconv.supports(4, 1) and not dwconv.supports(33, 1) and not dwconv.supports(5, 3)
    # On an H100, ours won every stride-1 case in bf16 NCHW (FAT's default training); cuDNN keeps the rest.
    assert all(dwconv.preferred(k, 1, torch.bfloat16) for k in range(3, 32, 2))
    assert not dwconv.preferred(5, 2, torch.bfloat16) and not dwconv.preferred(7, 1, torch.bfloat16, channels_last=True)
    assert not dwconv.preferred(5, 1, torch.float16) and dwconv.preferred(7, 1, torch.float16)
    # On CPU ours is measured faster for fp32 kernels >= 5 (bench_dwconv.py --device cpu).
    assert dwconv.preferred(5, 2, torch.float32, 'cpu') and dwconv.preferred(9, 1, torch.float32, 'cpu')
    assert not dwconv.preferred(3, 1, torch.float32, 'cpu') and not dwconv.preferred(5, 1, torch.bfloat16, 'cpu')


def test_preferred_follows_the_measured_table(monkeypatch):
    monkeypatch.setattr(dwconv, 'PREFERRED_CASES',
                        ((range(7, 32, 2), (1, 2), (torch.float16, torch.bfloat16), ('nchw',)),))
    assert dwconv.preferred(7, 1, torch.bfloat16) and dwconv.preferred(9, 2, torch.float16)
    assert not dwconv.preferred(5, 1, torch.float16) and not dwconv.preferred(9, 1, torch.float32)
    assert not dwconv.preferred(7, 1, torch.bfloat16, channels_last=True)


# --- the operators (torch.ops.fat), on CPU --------------------------------------------------------

@pytest.fixture(scope='module')
def cpu_build_dir(tmp_path_factory):
    return tmp_path_factory.mktemp('cpu_op_build')


@pytest.fixture
def cpu_op(fresh_state, monkeypatch, cpu_build_dir):
    """The operators with our CPU weight gradient, built into a fresh folder (once per module)."""
    monkeypatch.setenv('FAT_KERNELS_BUILD_DIR', str(cpu_build_dir))
    assert dwconv.load_cpu_library() is not None


def op_args(shape, k, stride, dtype=torch.float32, channels_last=False, bias=True, requires_grad=True):
    g = torch.Generator().manual_seed(k * 10 + stride)
    x = torch.randn(shape, generator=g, dtype=dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    w = torch.randn(shape[1], 1, k, k, generator=g)
    b = torch.randn(shape[1], generator=g) if bias else None
    return tuple(t.requires_grad_(requires_grad) if t is not None else None for t in (x, w, b)) + (stride,)


@pytest.mark.parametrize('k,stride,shape,dtype,channels_last,bias', [
    (5, 1, (2, 8, 9, 7), torch.float32, False, True),
    (5, 2, (2, 8, 9, 7), torch.float32, True, True),
    (3, 1, (1, 4, 6, 6), torch.float64, False, False),
    (7, 2, (2, 4, 11, 5), torch.bfloat16, True, True),
])
def test_operators_pass_opcheck(cpu_op, k, stride, shape, dtype, channels_last, bias):
    """torch.library's own test: schema, autograd registration, fake (meta) kernels against the real
    ones (shapes, strides, dtypes) and the compiled-autograd path, for all three operators."""
    args = op_args(shape, k, stride, dtype, channels_last, bias)
    torch.library.opcheck(torch.ops.fat.depthwise_conv2d.default, args)
    x, w, _, _ = args
    out = torch.ops.fat.depthwise_conv2d(*args).detach()
    torch.library.opcheck(torch.ops.fat.depthwise_conv2d_input_grad.default, (out, w.detach(), shape[2], shape[3], stride))
    torch.library.opcheck(torch.ops.fat.depthwise_conv2d_weight_bias_grad.default, (out, x.detach(), k, stride))


def test_compiled_graph_keeps_our_operator_and_matches_eager(cpu_op):
    """torch.compile (fullgraph) runs torch.ops.fat.depthwise_conv2d itself, forward and backward."""
    from models.dwconv import DepthwiseConv2d

    conv = DepthwiseConv2d(8, 5, 2, impl='auto')
    conv.chosen = {'train': True}  # as choose_kernels installs it (timing may prefer PyTorch at this size)
    targets = []

    def recording_backend(gm, example_inputs):
        targets.extend(str(n.target) for n in gm.graph.nodes if n.op == 'call_function')
        return gm.forward
    x = torch.randn(2, 8, 13, 11, requires_grad=True)
    eager = gradients_of(conv, x)
    compiled = gradients_of(torch.compile(conv, backend=recording_backend, fullgraph=True), x)
    assert 'fat.depthwise_conv2d.default' in targets and not any('convolution' in t for t in targets)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b)


def gradients_of(module, x):
    module.zero_grad()
    x = x.detach().requires_grad_()
    out = module(x)
    out.backward(torch.ones_like(out))
    return (out.detach(), x.grad, module.weight.grad.clone(), module.bias.grad.clone())


def test_export_sees_one_operator(cpu_op):
    class Conv(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(4, 1, 7, 7))

        def forward(self, x):
            return dwconv.depthwise_conv2d(x, self.weight, None, 1)
    program = torch.export.export(Conv(), (torch.randn(1, 4, 10, 10),))
    targets = [str(n.target) for n in program.graph.nodes if n.op == 'call_function']
    assert targets == ['fat.depthwise_conv2d.default']


def test_second_derivative_raises_rather_than_dropping_terms(cpu_op):
    x, w, b, stride = op_args((1, 4, 8, 8), 5, 1)
    out = dwconv.depthwise_conv2d(x, w, b, stride)
    (gx,) = torch.autograd.grad(out.square().sum(), (x,), create_graph=True)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(gx.sum(), (w,))


# --- on CPU: our depthwise weight gradient ------------------------------------------------------

@pytest.fixture(scope='module')
def cpu_library(tmp_path_factory):
    """A real build of dwconv_cpu.cpp with this machine's C++ compiler, into a fresh folder."""
    start = time.perf_counter()
    function = dwconv_cpu.build_library(str(tmp_path_factory.mktemp('cpu_build')))  # raises if it fails
    print(f'\nkernels/dwconv CPU kernel compiled in {time.perf_counter() - start:.1f} s')
    assert callable(function)
    return function


def plant_library(path: Path, marker: Path) -> None:
    """A library at ``path`` that creates ``marker`` when it is loaded."""
    source = path.parent / 'planted.c'
    source.write_text(f'#include <stdio.h>\n__attribute__((constructor)) static void planted(void) '
                      f'{{ fclose(fopen("{marker}", "w")); }}\n')
    subprocess.run(['cc', '-shared', '-fPIC', str(source), '-o', str(path)], check=True)


@pytest.mark.parametrize('danger', ['writable by others', 'owned by another user'])
def test_a_build_folder_others_could_write_to_is_refused_and_its_library_never_loaded(fresh_state, monkeypatch,
                                                                                     tmp_path, caplog, danger):
    # Mutation caught: no ownership / mode check (the planted library ran its code on load).
    if danger == 'owned by another user' and os.getuid() != 0:
        pytest.skip('making a folder of another user needs root')
    shared = tmp_path / 'shared'
    compiler = dwconv_cpu._compiler()
    library = Path(dwconv_cpu.library_path(str(shared), compiler))
    library.parent.mkdir(parents=True)
    marker = tmp_path / 'planted-code-ran'
    plant_library(library, marker)
    if danger == 'writable by others':
        shared.chmod(0o777)
    else:
        os.chown(shared, 65534, 65534)
    monkeypatch.setenv('FAT_KERNELS_BUILD_DIR', str(shared))
    with caplog.at_level(logging.WARNING, logger='kernels.dwconv'):
        assert dwconv_build.load_cpu_library() is None
    assert not marker.exists()
    expected = 'can be written by other users' if danger == 'writable by others' else 'belongs to another user'
    assert any(expected in message and str(shared) in message for message in warnings_from(caplog)), caplog.text


def gradients(op, x, w, b, stride, grad_seed=0):
    x, w, b = (t.detach().clone().requires_grad_() for t in (x, w, b))
    out = op(x, w, b, stride)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed)).to(memory_format=(
        torch.channels_last if out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
        else torch.contiguous_format))
    return (out, *torch.autograd.grad(out, (x, w, b), grad))


def assert_close_to(got, want, what):
    for name, a, r in zip(('output', 'input grad', 'weight grad', 'bias grad'), got, want):
        assert a.shape == r.shape, (what, name)
        assert torch.allclose(a, r, rtol=1e-4, atol=1e-4 * r.abs().max().item()), \
            f'{what}: {name} differs by {(a - r).abs().max().item():.3g}'


@pytest.mark.parametrize('kernel_size,stride,shape', [
    (5, 1, (4, 128, 14, 14)),   # FAT's FFN conv; two channel blocks of 64
    (5, 2, (3, 70, 13, 9)),     # odd sizes, a partial channel block, stride 2
    (3, 1, (2, 7, 5, 6)),
    (7, 2, (1, 5, 8, 11)),      # batch 1
    (9, 1, (2, 256, 7, 7)),     # kernel larger than half the map
    (31, 1, (1, 3, 4, 40)),     # kernel larger than the map
])
@pytest.mark.parametrize('channels_last', [False, True])
def test_cpu_weight_gradient_matches_pytorch(cpu_op, kernel_size, stride, shape, channels_last):
    g = torch.Generator().manual_seed(kernel_size * 10 + stride)
    x = torch.randn(shape, generator=g)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    w = torch.randn(shape[1], 1, kernel_size, kernel_size, generator=g)
    b = torch.randn(shape[1], generator=g)
    got = gradients(dwconv.depthwise_conv2d, x, w, b, stride)
    assert_close_to(got, gradients(reference_op, x, w, b, stride), f'k{kernel_size} s{stride} {shape}')
    assert got[0].is_contiguous(memory_format=torch.channels_last) == channels_last
    assert got[1].is_contiguous(memory_format=torch.channels_last) == channels_last


def test_cpu_threads_split_rows_exactly(cpu_library):
    """More threads than output rows, and a row count that does not divide: same sums."""
    x, go = torch.randn(1, 9, 3, 5), torch.randn(1, 9, 3, 5)
    want = torch.ops.aten.convolution_backward(go, x, torch.zeros(9, 1, 5, 5), [9], [1, 1], [2, 2], [1, 1], False,
                                               [0, 0], 9, [False, True, True])
    for threads in (1, 2, 3, 7):
        torch.set_num_threads(threads)
        try:
            got = dwconv_cpu.weight_bias_grad(cpu_library, go, x, 5, 1)
        finally:
            torch.set_num_threads(2)
        assert torch.allclose(got[0], want[1], atol=1e-5) and torch.allclose(got[1], want[2], atol=1e-5), threads


@pytest.mark.parametrize('residual,stride', [(True, 1), (False, 1), (False, 2)])
def test_gelu_depthwise_conv_matches_and_stores_only_its_input(cpu_library, saved_bytes, residual, stride):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 64, 12, 10, generator=g).to(memory_format=torch.channels_last)
    w, b = torch.randn(64, 1, 5, 5, generator=g), torch.randn(64, generator=g)

    def fused(x, w, b, s):
        return dwconv_cpu.DepthwiseConv2dCPUFunction.apply(x, w, b, s, cpu_library, residual)

    def unfused(x, w, b, s):
        a = F.gelu(x)
        return reference_op(a, w, b, s) + a if residual else reference_op(a, w, b, s)

    assert_close_to(gradients(fused, x, w, b, stride), gradients(unfused, x, w, b, stride), 'gelu + dwconv')

    def leaves():
        return (t.detach().clone().requires_grad_() for t in (x, w, b))
    # fused keeps x and the weight; unfused also keeps GELU's output for the conv
    assert saved_bytes(fused, *leaves(), stride) == x.numel() * 4 + w.numel() * 4
    assert saved_bytes(unfused, *leaves(), stride) >= 2 * x.numel() * 4


def test_gelu_depthwise_conv_rejects_a_strided_residual():
    x = torch.randn(1, 4, 8, 8)
    with pytest.raises(ValueError, match='residual depthwise conv needs stride 1'):
        dwconv.gelu_depthwise_conv2d(x, torch.randn(4, 1, 5, 5), None, 2, residual=True)


def test_fused_gelu_cpu_path_is_fp32_only(cpu_library):
    x = torch.randn(1, 4, 8, 8, dtype=torch.float64)
    with pytest.raises(RuntimeError, match='fp32 CPU tensors outside autocast'):
        dwconv.gelu_depthwise_conv2d(x, torch.randn(4, 1, 5, 5, dtype=torch.float64), None, 1)


def test_cpu_weight_gradient_does_not_follow_the_default_dtype(cpu_library):
    """The C function writes fp32 whatever torch's default dtype is."""
    x, go = torch.randn(2, 6, 9, 9), torch.randn(2, 6, 9, 9)
    want = torch.nn.grad.conv2d_weight(x, (6, 1, 5, 5), go, 1, 2, 1, 6)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        grad_w, grad_b = dwconv_cpu.weight_bias_grad(cpu_library, go, x, 5, 1)
    finally:
        torch.set_default_dtype(previous)
    assert grad_w.dtype == torch.float32
    torch.testing.assert_close(grad_w, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_b, go.sum((0, 2, 3)), rtol=1e-5, atol=1e-5)


def test_model_self_checks_every_case_it_runs_on_our_kernel(fresh_state, monkeypatch, tmp_path):
    """'auto' self-checks the (kernel, stride) of each conv it could run on ours before timing it, so
    the first-use check covers exactly what the model runs (here: FAT's CPU training path); a decision
    remembered from another process is checked again in this one."""
    import models
    monkeypatch.setenv('FAT_KERNELS_BUILD_DIR', str(tmp_path))
    kwargs = dict(embed_dims=(16, 24, 32, 48), depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 3), num_classes=10)
    for remembered in (False, True):
        dwconv._usable.clear()
        dwconv.autotune.reset()
        model = models.FAT(**kwargs, dwconv_impl='auto').train()
        model(torch.randn(1, 3, 64, 64)).sum().backward()
        checked = {(k, s) for _, cases in dwconv._usable for k, s, _ in cases}
        used = {(m.kernel_size[0], m.stride[0]) for m in model.modules() if isinstance(m, models.DepthwiseConv2d)}
        decided = dwconv.autotune.tuner(torch.device('cpu'))._decided
        assert len(decided) >= len(used) and all(case.backward for case in decided)
        ran_ours = {(case.kernel_size, case.stride) for case, ours in decided.items() if ours}
        assert checked == used if not remembered else ran_ours <= checked <= used
        assert all(dwconv._usable.values())


def test_cpu_kernel_is_usable_after_a_real_build(fresh_state, monkeypatch, tmp_path):
    monkeypatch.setenv('FAT_KERNELS_BUILD_DIR', str(tmp_path))
    assert dwconv.is_usable('cpu')
    assert [p.name for p in tmp_path.glob('cpu-*/*')] == [dwconv_cpu.LIBRARY_NAME]  # no temporary files left


def test_failed_cpu_build_warns_once_and_pytorch_is_used(fresh_state, monkeypatch, tmp_path, caplog):
    bogus = tmp_path / 'bogus.cpp'
    bogus.write_text('this is not C++;\n')
    monkeypatch.setattr(dwconv_cpu, 'SOURCE', str(bogus))
    monkeypatch.setenv('FAT_KERNELS_BUILD_DIR', str(tmp_path / 'build'))
    with caplog.at_level(logging.WARNING, logger='kernels.dwconv'):
        assert dwconv.load_cpu_library() is None
        assert dwconv.load_cpu_library() is None
        assert not dwconv.is_usable('cpu')
    messages = warnings_from(caplog)
    assert any('CPU kernel could not be built' in m and 'error' in m for m in messages), messages
    assert sum('could not be built' in m for m in messages) == 2, messages  # the build, then is_usable once
    assert not list((tmp_path / 'build').glob('cpu-*/*.so'))  # no half-written library left behind


# --- on a GPU ------------------------------------------------------------------------------------

@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16, torch.float16])
def test_gpu_self_check_passes_for_every_fat_case(extension, dtype):
    cases = tuple((k, s, dtype) for k, s in FAT_CASES + ((11, 1), (31, 1), (31, 2)))
    assert dwconv.self_check(torch.device('cuda'), cases) is None
    assert all(dwconv.is_usable(torch.device('cuda'), k, s, dtype) for k, s, _ in cases)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize('mode', ['no_grad', 'inference_mode'])
def test_first_gpu_use_under_no_grad_is_usable(extension, fresh_state, mode):
    """--eval and --throughput make their first forward without gradients."""
    dwconv_build._loaded['cuda'] = extension
    with torch.no_grad() if mode == 'no_grad' else torch.inference_mode():
        assert dwconv.is_usable(torch.device('cuda'), 7, 1, torch.bfloat16)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize('kernel_size', [3, 5])
@pytest.mark.parametrize('stride', [1, 2])
def test_gradcheck_float64(extension, kernel_size, stride):
    x = torch.randn(2, 3, 9, 11, device='cuda', dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 1, kernel_size, kernel_size, device='cuda', dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, device='cuda', dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: dwconv.depthwise_conv2d(x, w, b, stride), (x, w, b))


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize('dtype', [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize('kernel_size', [3, 5, 7, 9, 11, 31])
@pytest.mark.parametrize('stride', [1, 2])
@pytest.mark.parametrize('channels_last', [False, True])
@pytest.mark.parametrize('shape', [(1, 16, 13, 17), (3, 8, 56, 56), (2, 40, 7, 7)])
def test_matches_cudnn_forward_and_backward(extension, dtype, kernel_size, stride, channels_last, shape):
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(shape, device='cuda', dtype=dtype).to(memory_format=fmt).requires_grad_()
    w = torch.randn(shape[1], 1, kernel_size, kernel_size, device='cuda', dtype=dtype, requires_grad=True)
    b = torch.randn(shape[1], device='cuda', dtype=dtype, requires_grad=True)
    out = dwconv.depthwise_conv2d(x, w, b, stride)
    assert out.dtype == dtype and out.is_contiguous(memory_format=fmt)
    grad = torch.randn_like(out)
    got = (out, *torch.autograd.grad(out, (x, w, b), grad))
    assert got[1].is_contiguous(memory_format=fmt)
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    ref = reference_op(x64, w64, b64, stride)
    want = (ref, *torch.autograd.grad(ref, (x64, w64, b64), grad.double()))
    tol = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]
    for name, a, r in zip(('output', 'input grad', 'weight grad', 'bias grad'), got, want):
        assert a.dtype == dtype, name
        torch.testing.assert_close(a.double(), r, rtol=tol, atol=tol * r.abs().max().item(), msg=name)


@pytest.mark.gpu
@needs_gpu
def test_without_bias_and_without_input_grad(extension):
    x = torch.randn(2, 6, 15, 9, device='cuda')
    w = torch.randn(6, 1, 7, 7, device='cuda', requires_grad=True)
    out = dwconv.depthwise_conv2d(x, w, None, 2)
    (gw,) = torch.autograd.grad(out, (w,), torch.ones_like(out))
    ref = reference_op(x, w, None, 2)
    (ref_gw,) = torch.autograd.grad(ref, (w,), torch.ones_like(ref))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gw, ref_gw, rtol=1e-4, atol=1e-3)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_autocast_matches_cudnn_under_autocast(extension, dtype):
    x = torch.randn(2, 16, 28, 28, device='cuda', requires_grad=True)
    w = torch.randn(16, 1, 7, 7, device='cuda', requires_grad=True)
    b = torch.randn(16, device='cuda', requires_grad=True)
    with torch.autocast('cuda', dtype=dtype):
        out = dwconv.depthwise_conv2d(x, w, b, 1)
        ref = reference_op(x, w, b, 1)
    assert out.dtype == ref.dtype == dtype
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2 * ref.abs().max().item())
    got = torch.autograd.grad(out.float().sum(), (x, w, b))
    want = torch.autograd.grad(ref.float().sum(), (x, w, b))
    for a, r in zip(got, want):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, r, rtol=5e-2, atol=5e-2 * r.abs().max().item())


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize('compiled', [False, True])
def test_model_runs_on_our_kernel_under_autocast(extension, compiled):
    """impl 'cuda' runs our operator, also inside torch.compile (no silent switch to cuDNN)."""
    import models
    kwargs = dict(embed_dims=(16, 24, 32, 48), depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 3), num_classes=10)
    model = models.FAT(**kwargs, dwconv_impl='cuda').cuda()
    reference = models.FAT(**kwargs, dwconv_impl='torch').cuda()
    reference.load_state_dict(model.state_dict())
    targets = []

    def recording_backend(gm, example_inputs):
        targets.extend(str(n.target) for n in gm.graph.nodes if n.op == 'call_function')
        return gm.forward
    run = torch.compile(model, backend=recording_backend, fullgraph=True) if compiled else model
    x = torch.randn(2, 3, 64, 64, device='cuda')
    with torch.autocast('cuda', dtype=torch.bfloat16):
        out, ref = run(x), reference(x)
    torch.testing.assert_close(out.float(), ref.float(), rtol=0.05, atol=0.05)
    out.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    if compiled:
        assert targets.count('fat.depthwise_conv2d.default') == sum(
            isinstance(m, models.dwconv.DepthwiseConv2d) for m in model.modules())
