"""kernels/dwconv: it compiles here, it falls back safely, and (on a GPU) it matches F.conv2d.

The compile test is the slow one (about 80 s on 2 cores): one real JIT build per test run, shared by
every test that needs the module. Without nvcc it is skipped; without a GPU the kernels cannot run,
so the comparisons with cuDNN are skipped and the CPU tests check the build, the fallback and the
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


def test_never_usable_on_cpu():
    assert not dwconv.is_usable(torch.device('cpu'))
    assert not dwconv.is_usable('cpu')


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


def test_preferred_follows_the_measured_table(monkeypatch):
    monkeypatch.setattr(dwconv, 'PREFERRED_CASES', ((range(7, 32, 2), (1, 2), (torch.float16, torch.bfloat16)),))
    assert dwconv.preferred(7, 1, torch.bfloat16) and dwconv.preferred(9, 2, torch.float16)
    assert not dwconv.preferred(5, 1, torch.float16) and not dwconv.preferred(9, 1, torch.float32)


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
