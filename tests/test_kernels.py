"""kernels/dwconv: it compiles here, it falls back safely, and it matches F.conv2d: on CPU (our weight
gradient, built with the system C++ compiler) always, on a GPU (the CUDA kernels) when there is one.

The CUDA compile test is the slow one (about 80 s on 2 cores): one real JIT build per test run, shared
by every test that needs the module. Without nvcc it is skipped; without a GPU the CUDA kernels cannot
run, so the comparisons with cuDNN are skipped and the CPU tests check the build, the fallback and the
self-check logic.
"""
import logging
import os
import shutil
import sys
import time

import pytest
import torch
import torch.nn.functional as F

import kernels.dwconv as dwconv
from kernels.dwconv import cpu as dwconv_cpu

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')


def nvcc_available() -> bool:
    from torch.utils.cpp_extension import CUDA_HOME
    return shutil.which('nvcc') is not None or bool(CUDA_HOME and os.path.exists(os.path.join(CUDA_HOME, 'bin', 'nvcc')))


@pytest.fixture(scope='session')
def extension(tmp_path_factory):
    """A real build of kernels/dwconv with this machine's nvcc into a fresh folder, once per test run."""
    if not nvcc_available():
        pytest.skip('nvcc not found: the CUDA extension cannot be compiled here')
    patch = pytest.MonkeyPatch()
    patch.setenv('FAT_KERNELS_BUILD_DIR', str(tmp_path_factory.mktemp('fat_kernels_build')))
    patch.setitem(sys.modules, dwconv.EXTENSION_NAME, None)  # build these sources, not an installed copy
    dwconv._extension.clear()
    start = time.perf_counter()
    try:
        module = dwconv.load_extension()
    finally:
        patch.undo()
    print(f'\nkernels/dwconv compiled in {time.perf_counter() - start:.0f} s')
    assert module is not None, 'the extension failed to compile (see the warning above)'
    return module


@pytest.fixture
def fresh_state(monkeypatch):
    """Forget the process-wide build and self-check results for the duration of a test."""
    monkeypatch.setattr(dwconv, '_extension', {})
    monkeypatch.setattr(dwconv, '_usable', {})


def reference_op(x, w, b, stride):
    return F.conv2d(x, w, b, stride, w.shape[-1] // 2, 1, x.shape[1])


def warnings_from(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == 'kernels.dwconv']


# --- on any machine ------------------------------------------------------------------------------

@pytest.mark.slow
def test_extension_compiles_with_this_machines_nvcc(extension):
    for name in ('forward', 'input_grad', 'weight_bias_grad'):
        assert callable(getattr(extension, name)), name


def test_never_usable_on_other_devices():
    assert not dwconv.is_usable(torch.device('meta'))
    assert not dwconv.is_usable('not a device')


def test_failed_build_warns_once_and_returns_none(fresh_state, monkeypatch, tmp_path, caplog):
    bogus = tmp_path / 'bogus.cu'
    bogus.write_text('this is not C++;\n')
    monkeypatch.setattr(dwconv, 'SOURCES', [str(bogus)])
    monkeypatch.setattr(dwconv, 'EXTENSION_NAME', 'fat_dwconv_bogus')
    monkeypatch.setitem(sys.modules, 'fat_dwconv_cuda', None)  # no installed build either
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


def test_self_check_accepts_a_correct_op_and_names_a_wrong_one():
    cpu = torch.device('cpu')
    assert dwconv.self_check(cpu, reference_op) is None
    assert 'output differs' in dwconv.self_check(cpu, lambda x, w, b, s: reference_op(x, w, b, s) * 1.01)
    wrong_stride2 = lambda x, w, b, s: reference_op(x, w, b, s) + (s == 2)  # noqa: E731
    assert 'stride 2' in dwconv.self_check(cpu, wrong_stride2)
    nan = lambda x, w, b, s: reference_op(x, w, b, s) * float('nan')  # noqa: E731
    assert 'output differs' in dwconv.self_check(cpu, nan)


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

    problem = dwconv.self_check(torch.device('cpu'), WrongWeightGrad.apply)
    assert problem is not None and problem.startswith('weight grad differs')


def test_self_check_mismatch_makes_the_extension_unusable_with_one_warning(fresh_state, monkeypatch, caplog):
    wrong = lambda x, w, b, s: reference_op(x, w, b, s) * 1.01  # noqa: E731
    real_self_check = dwconv.self_check
    monkeypatch.setattr(dwconv, 'load_extension', lambda verbose=False: object())
    monkeypatch.setattr(dwconv, 'self_check', lambda device: real_self_check(torch.device('cpu'), wrong))
    device = torch.device('cuda', 0)
    with caplog.at_level(logging.WARNING, logger='kernels.dwconv'):
        assert not dwconv.is_usable(device)
        assert not dwconv.is_usable(device)  # cached for the device
    messages = warnings_from(caplog)
    assert len(messages) == 1 and 'output differs from F.conv2d' in messages[0] and 'cuda:0' in messages[0]


def test_a_crashing_self_check_is_a_warning_not_an_exception(fresh_state, monkeypatch, caplog):
    def crash(device):
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
    # 'auto' keeps cuDNN until a GPU benchmark lists cases in PREFERRED_CASES.
    assert not any(dwconv.preferred(k, s, d) for k in range(3, 32, 2) for s in (1, 2)
                   for d in (torch.float16, torch.bfloat16, torch.float32))
    # On CPU ours is measured faster for fp32 kernels >= 5 (bench_dwconv.py --device cpu).
    assert dwconv.preferred(5, 2, torch.float32, 'cpu') and dwconv.preferred(9, 1, torch.float32, 'cpu')
    assert not dwconv.preferred(3, 1, torch.float32, 'cpu') and not dwconv.preferred(5, 1, torch.bfloat16, 'cpu')


def test_preferred_follows_the_measured_table(monkeypatch):
    monkeypatch.setattr(dwconv, 'PREFERRED_CASES', ((range(7, 32, 2), (1, 2), (torch.float16, torch.bfloat16)),))
    assert dwconv.preferred(7, 1, torch.bfloat16) and dwconv.preferred(9, 2, torch.float16)
    assert not dwconv.preferred(5, 1, torch.float16) and not dwconv.preferred(9, 1, torch.float32)


# --- on CPU: our depthwise weight gradient ------------------------------------------------------

@pytest.fixture(scope='module')
def cpu_library(tmp_path_factory):
    """A real build of dwconv_cpu.cpp with this machine's C++ compiler, into a fresh folder."""
    start = time.perf_counter()
    function = dwconv_cpu.build_library(str(tmp_path_factory.mktemp('cpu_build')))  # raises if it fails
    print(f'\nkernels/dwconv CPU kernel compiled in {time.perf_counter() - start:.1f} s')
    assert callable(function)
    return function


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
def test_cpu_weight_gradient_matches_pytorch(cpu_library, kernel_size, stride, shape, channels_last):
    g = torch.Generator().manual_seed(kernel_size * 10 + stride)
    x = torch.randn(shape, generator=g)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    w = torch.randn(shape[1], 1, kernel_size, kernel_size, generator=g)
    b = torch.randn(shape[1], generator=g)
    ours = lambda x, w, b, s: dwconv_cpu.DepthwiseConv2dCPUFunction.apply(x, w, b, s, cpu_library)  # noqa: E731
    got = gradients(ours, x, w, b, stride)
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
        return dwconv_cpu.DepthwiseConv2dCPUFunction.apply(x, w, b, s, cpu_library, True, residual)

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


def test_cpu_path_is_fp32_only(cpu_library):
    x = torch.randn(1, 4, 8, 8, dtype=torch.float64)
    with pytest.raises(RuntimeError, match='fp32 CPU tensors outside autocast'):
        dwconv.depthwise_conv2d(x, torch.randn(4, 1, 5, 5, dtype=torch.float64), None, 1)


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

@needs_gpu
def test_gpu_self_check_passes(extension):
    assert dwconv.self_check(torch.device('cuda')) is None
    assert dwconv.is_usable(torch.device('cuda'))


@needs_gpu
@pytest.mark.parametrize('kernel_size', [3, 5])
@pytest.mark.parametrize('stride', [1, 2])
def test_gradcheck_float64(extension, kernel_size, stride):
    x = torch.randn(2, 3, 9, 11, device='cuda', dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 1, kernel_size, kernel_size, device='cuda', dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, device='cuda', dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: dwconv.depthwise_conv2d(x, w, b, stride), (x, w, b))


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


@needs_gpu
def test_model_runs_on_our_kernel_under_autocast(extension):
    import models
    kwargs = dict(embed_dims=(16, 24, 32, 48), depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 3), num_classes=10)
    model = models.FAT(**kwargs, dwconv_impl='cuda').cuda()
    reference = models.FAT(**kwargs, dwconv_impl='torch').cuda()
    reference.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 64, 64, device='cuda')
    with torch.autocast('cuda', dtype=torch.bfloat16):
        out, ref = model(x), reference(x)
    torch.testing.assert_close(out.float(), ref.float(), rtol=0.05, atol=0.05)
    out.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
